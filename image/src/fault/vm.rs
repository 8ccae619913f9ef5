//! The appliance under test: one QEMU process per boot, its console in a
//! file, cut with SIGKILL or stopped through its management endpoint.

use crate::control::http_shutdown;
use crate::qemu::{QemuConfig, QemuExit, QEMU_BINARY};
use crate::runner::die_with_parent;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A booted appliance.
pub struct Vm {
    child: Option<Child>,
    /// Where its console goes.
    pub console: PathBuf,
    http_port: u16,
    token_file: Option<PathBuf>,
}

/// How a boot ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The power was cut.
    Cut,
    /// A clean stop: the appliance flushed and exited with success.
    Clean,
    /// Asked to stop, it exited with this failure (a flush failed, …).
    Failed(String),
    /// It did not stop when asked; the power was cut.
    NoStop,
}

impl Vm {
    /// Boots `cfg` with its console appended to `console`.
    pub fn boot(cfg: &QemuConfig, console: PathBuf) -> io::Result<Vm> {
        let out = File::options().create(true).append(true).open(&console)?;
        let mut cmd = Command::new(QEMU_BINARY);
        cmd.args(cfg.args())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        die_with_parent(&mut cmd);
        let child = cmd.spawn()?;
        Ok(Vm {
            child: Some(child),
            console,
            http_port: cfg.http_port,
            token_file: cfg.token_file.clone(),
        })
    }

    /// The exit status, if QEMU has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Cuts the power: SIGKILL, so nothing more reaches the disks from
    /// the guest.
    pub fn cut(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Asks the appliance to stop (`POST /shutdown`) and waits up to
    /// `limit` for it to exit; cuts the power if it does not.
    pub fn stop(&mut self, limit: Duration) -> End {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.http_port));
        let token = self
            .token_file
            .as_deref()
            .and_then(|f| crate::token::read(f).ok());
        let asked = http_shutdown(addr, token.as_deref(), Duration::from_secs(5));
        if !matches!(asked, Ok(200..=299)) {
            self.cut();
            return End::NoStop;
        }
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(st) = self.exited() {
                self.child = None;
                return match QemuExit::from_status(st) {
                    QemuExit::GuestSuccess => End::Clean,
                    other => End::Failed(other.to_string()),
                };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.cut();
        End::NoStop
    }

    /// Console lines that say the appliance crashed.
    pub fn crash_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.console)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("PANIC") || l.contains("panicked"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.cut();
    }
}
