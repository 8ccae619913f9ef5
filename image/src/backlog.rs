//! A deeper accept queue for QEMU's forwarded ports.
//!
//! QEMU's user networking (libslirp) listens on each `hostfwd` port with a
//! backlog of 1 and accepts one connection per turn of its main loop. When
//! more clients connect in the same instant than that queue holds, the
//! host kernel completes their handshakes (with SYN cookies) and then drops
//! them on the floor: each client believes it is connected and waits
//! forever for a greeting that never comes (seen with eight or more fio
//! jobs starting together).
//!
//! A listening socket's backlog can be changed by calling `listen(2)` on it
//! again, and a parent may borrow its child's descriptors with
//! `pidfd_getfd(2)` (Linux 5.6). So once QEMU is up, the host tool takes a
//! copy of each of QEMU's listening sockets on the forwarded ports, calls
//! `listen` with a deep backlog, and closes its copy. QEMU keeps the very
//! same socket; only its queue is longer.

use rustix::fd::{AsFd, OwnedFd};
use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};
use std::net::SocketAddr;

/// The accept queue asked for (the kernel caps it at `net.core.somaxconn`).
pub const BACKLOG: i32 = 1024;

/// Deepens the accept queue of every socket process `pid` listens on at one
/// of `ports`; returns the ports it deepened. Fails when the process's
/// descriptors cannot be borrowed (an old kernel, or no permission).
pub fn deepen(pid: u32, ports: &[u16]) -> Result<Vec<u16>, String> {
    let raw = i32::try_from(pid).map_err(|_| format!("pid {pid} out of range"))?;
    let pid_ref = Pid::from_raw(raw).ok_or_else(|| format!("pid {pid} is not a process"))?;
    let pidfd = pidfd_open(pid_ref, PidfdFlags::empty()).map_err(|e| format!("pidfd_open: {e}"))?;
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
    let mut done = Vec::new();
    let mut last_error = None;
    for entry in entries.flatten() {
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let Some(target) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if !is_socket {
            continue;
        }
        let fd = match pidfd_getfd(&pidfd, target, PidfdGetfdFlags::empty()) {
            Ok(fd) => fd,
            Err(e) => {
                last_error = Some(format!("pidfd_getfd: {e}"));
                continue;
            }
        };
        if let Some(port) = listening_port(&fd).filter(|p| ports.contains(p)) {
            match rustix::net::listen(fd.as_fd(), BACKLOG) {
                Ok(()) => done.push(port),
                Err(e) => last_error = Some(format!("listen: {e}")),
            }
        }
    }
    if done.is_empty() {
        if let Some(e) = last_error {
            return Err(e);
        }
    }
    done.sort_unstable();
    done.dedup();
    Ok(done)
}

/// The local port of a listening TCP socket, or `None` for anything else.
fn listening_port(fd: &OwnedFd) -> Option<u16> {
    if !rustix::net::sockopt::socket_acceptconn(fd).ok()? {
        return None;
    }
    let addr = SocketAddr::try_from(rustix::net::getsockname(fd).ok()?).ok()?;
    Some(addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::process::{Command, Stdio};

    /// The backlog of the socket listening on `port`, as `ss` (iproute2)
    /// shows it: the Send-Q column of its LISTEN line.
    fn backlog_of(port: u16) -> u32 {
        let out = Command::new("ss")
            .args(["-ltnH", &format!("sport = :{port}")])
            .output()
            .expect("ss (iproute2)");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().next().expect("a LISTEN line");
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    }

    #[test]
    fn deepens_a_childs_listener() {
        // A child that listens with a backlog of 1, as libslirp does.
        let mut child = Command::new("python3")
            .args([
                "-c",
                "import socket,sys,time\ns=socket.socket()\ns.bind(('127.0.0.1',0))\ns.listen(1)\nprint(s.getsockname()[1],flush=True)\ntime.sleep(30)",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let port: u16 = line.trim().parse().unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let other_port = other.local_addr().unwrap().port();
        let before = backlog_of(port);
        let r = deepen(child.id(), &[port, other_port]);
        let after = backlog_of(port);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(r, Ok(vec![port]), "only the child's listener on the port");
        assert_eq!(before, 1);
        assert!(after > 1, "backlog {after}");
    }
}
