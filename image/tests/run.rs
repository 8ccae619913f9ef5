//! End-to-end tests of `strata run` against QEMU with a tiny hand-made PVH
//! kernel that prints console lines and leaves through isa-debug-exit. They
//! need QEMU because what they check (console capture, exit-status mapping,
//! the accelerator choice, stopping QEMU) happens between the tool and a
//! real QEMU process; they are skipped when qemu-system-x86_64 is absent.

use image::tempdir::TempDir;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const LOAD_ADDR: u64 = 0x10_0000;
const EHDR_BYTES: usize = 64;
const PHDR_BYTES: usize = 56;
/// Xen ELF note type 18: XEN_ELFNOTE_PHYS32_ENTRY, the PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// A PVH ELF64 kernel that writes `console` to COM1 (0x3f8) and then, if
/// `exit` is given, writes it to isa-debug-exit (0xf4); otherwise halts.
fn pvh_kernel(console: &str, exit: Option<u8>) -> Vec<u8> {
    assert!(!console.is_empty(), "the print loop needs one byte");
    let note_off = EHDR_BYTES + 2 * PHDR_BYTES;
    let note_len = 12 + 4 + 8;
    let code_off = note_off + note_len;
    let entry = LOAD_ADDR + code_off as u64;

    // 32-bit protected mode code, entered with paging off (PVH).
    let mut code: Vec<u8> = vec![0xfc, 0xfa]; // cld; cli
    let msg_fixup = code.len() + 1;
    code.extend([0xbe, 0, 0, 0, 0]); // mov esi, msg
    code.push(0xb9); // mov ecx, len
    code.extend((console.len() as u32).to_le_bytes());
    code.extend([0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.extend([0xac, 0xee, 0xe2, 0xfc]); // 1: lodsb; out dx, al; loop 1b
    if let Some(v) = exit {
        code.extend([0xb0, v, 0xe6, 0xf4]); // mov al, v; out 0xf4, al
    }
    code.extend([0xf4, 0xeb, 0xfd]); // 2: hlt; jmp 2b
    let msg_addr = entry as u32 + code.len() as u32;
    code[msg_fixup..msg_fixup + 4].copy_from_slice(&msg_addr.to_le_bytes());

    let total = code_off + code.len() + console.len();
    let mut f = Vec::with_capacity(total);
    // ELF header (System V gABI, ELF-64 Object File Format).
    f.extend([0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend([0u8; 8]);
    f.extend(2u16.to_le_bytes()); // ET_EXEC
    f.extend(62u16.to_le_bytes()); // EM_X86_64
    f.extend(1u32.to_le_bytes());
    f.extend(entry.to_le_bytes());
    f.extend((EHDR_BYTES as u64).to_le_bytes()); // e_phoff
    f.extend(0u64.to_le_bytes()); // e_shoff
    f.extend(0u32.to_le_bytes()); // e_flags
    f.extend((EHDR_BYTES as u16).to_le_bytes());
    f.extend((PHDR_BYTES as u16).to_le_bytes());
    f.extend(2u16.to_le_bytes()); // e_phnum
    f.extend([0u8; 6]); // no sections
    let phdr = |f: &mut Vec<u8>, ty: u32, flags: u32, off: u64, len: u64, align: u64| {
        f.extend(ty.to_le_bytes());
        f.extend(flags.to_le_bytes());
        f.extend(off.to_le_bytes());
        f.extend((LOAD_ADDR + off).to_le_bytes()); // p_vaddr
        f.extend((LOAD_ADDR + off).to_le_bytes()); // p_paddr
        f.extend(len.to_le_bytes());
        f.extend(len.to_le_bytes());
        f.extend(align.to_le_bytes());
    };
    phdr(&mut f, 1, 7, 0, total as u64, 0x1000); // PT_LOAD, RWX, the whole file
    phdr(&mut f, 4, 4, note_off as u64, note_len as u64, 4); // PT_NOTE
    f.extend(4u32.to_le_bytes()); // namesz
    f.extend(8u32.to_le_bytes()); // descsz: QEMU reads the entry as 8 bytes
    f.extend(XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    f.extend(*b"Xen\0");
    f.extend(entry.to_le_bytes());
    assert_eq!(f.len(), code_off);
    f.extend(code);
    f.extend(console.as_bytes());
    assert_eq!(f.len(), total);
    f
}

fn have_qemu() -> bool {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("qemu-system-x86_64 not installed: test skipped");
    }
    ok
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Case {
    dir: TempDir,
    kernel: PathBuf,
    log: PathBuf,
}

impl Case {
    fn new(console: &str, exit: Option<u8>) -> Case {
        let dir = TempDir::new().unwrap();
        let kernel = dir.join("kernel.elf");
        std::fs::write(&kernel, pvh_kernel(console, exit)).unwrap();
        let log = dir.join("console.log");
        Case { dir, kernel, log }
    }

    fn command(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
        c.arg("run")
            .args(["--log"])
            .arg(&self.log)
            .args(["--nbd-port", &free_port().to_string()])
            .args(["--http-port", &free_port().to_string()])
            .args(["--memory", "64"])
            .args(extra)
            .env("STRATA_KERNEL", &self.kernel)
            .env_remove("STRATA_READY_TIMEOUT")
            .env_remove("STRATA_KVM_PROBE_MS")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, extra: &[&str]) -> Output {
        let mut c = self.command(extra);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let out = c.output().unwrap();
        eprintln!(
            "status {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Processes whose command line names this case's kernel.
    fn qemu_pids(&self) -> Vec<u32> {
        let needle = self.kernel.to_string_lossy().into_owned();
        let mut pids = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.starts_with("qemu-system-x86_64") && cmd.contains(&needle) {
                pids.push(pid);
            }
        }
        pids
    }

    fn wait_log(&self, needle: &str, within: Duration) {
        let until = Instant::now() + within;
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < until,
                "no {needle:?} in log: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn success_code_maps_to_zero_and_console_reaches_log() {
    if !have_qemu() {
        return;
    }
    let c = Case::new("strata: boot\r\nhello from the guest\r\n", Some(0x10));
    std::fs::write(&c.log, "earlier line\n").unwrap();
    let out = c.run(&["--accel", "tcg"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    // Appended, with line endings cleaned.
    assert_eq!(
        c.log_text(),
        "earlier line\nstrata: boot\nhello from the guest\n"
    );
}

#[test]
fn microvm_boots_and_exits_through_isa_debug_exit() {
    if !have_qemu() {
        return;
    }
    let c = Case::new("strata: boot\n", Some(0x10));
    let out = c.run(&["--accel", "tcg", "--machine", "microvm"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(c.log_text(), "strata: boot\n");
}

#[test]
fn console_without_log_goes_to_stderr() {
    if !have_qemu() {
        return;
    }
    let c = Case::new("strata: boot\nline two\n", Some(0x10));
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["run", "--accel", "tcg", "--memory", "64"])
        .args(["--nbd-port", &free_port().to_string()])
        .args(["--http-port", &free_port().to_string()])
        .env("STRATA_KERNEL", &c.kernel)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("strata: boot\nline two\n"));
}

#[test]
fn guest_config_error_is_reported_with_its_line() {
    if !have_qemu() {
        return;
    }
    let c = Case::new(
        "strata: boot\nstrata: config error: line 2, column 12: no provider 'vtbd3'\n",
        Some(0x11),
    );
    let conf = c.dir.join("s.conf");
    std::fs::write(&conf, "# ok for the host\nexport nbd vol vtbd3\n").unwrap();
    let out = c.run(&["--accel", "tcg", "--config", conf.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains(&format!(
        "strata: {}: line 2, column 12: no provider 'vtbd3'",
        conf.display()
    )));
}

#[test]
fn guest_failure_code_and_fatal_line() {
    if !have_qemu() {
        return;
    }
    let c = Case::new("strata: boot\nstrata: fatal: out of memory\n", Some(0x12));
    let out = c.run(&["--accel", "tcg"]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.contains("appliance failed: out of memory"), "{e}");
    assert!(e.contains("failure code 0x12"), "{e}");
    assert!(e.contains("last console lines:"), "{e}");
}

#[test]
fn not_ready_in_time_kills_qemu() {
    if !have_qemu() {
        return;
    }
    let c = Case::new("strata: boot\n", None);
    let t = Instant::now();
    let out = c
        .command(&["--accel", "tcg"])
        .env("STRATA_READY_TIMEOUT", "2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not ready within 2 s"),
        "{}",
        stderr(&out)
    );
    assert!(t.elapsed() < Duration::from_secs(15));
    assert!(c.qemu_pids().is_empty());
}

#[test]
fn sigterm_before_ready_stops_qemu() {
    if !have_qemu() {
        return;
    }
    let c = Case::new("strata: boot\n", None);
    let mut child = c
        .command(&["--accel", "tcg"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.wait_log("strata: boot", Duration::from_secs(20));
    assert_eq!(c.qemu_pids().len(), 1);
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let st = child.wait().unwrap();
    let mut e = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut e).unwrap();
    assert_eq!(st.code(), Some(1), "{e}");
    assert!(
        e.contains("interrupted before the appliance was ready"),
        "{e}"
    );
    assert!(c.qemu_pids().is_empty());
}

#[test]
fn qemu_dies_with_a_killed_tool() {
    if !have_qemu() {
        return;
    }
    let c = Case::new("strata: boot\n", None);
    let mut child = c
        .command(&["--accel", "tcg"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    c.wait_log("strata: boot", Duration::from_secs(20));
    assert_eq!(c.qemu_pids().len(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    while !c.qemu_pids().is_empty() {
        assert!(Instant::now() < until, "QEMU outlived the tool");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn auto_accel_ends_on_something_that_boots() {
    if !have_qemu() {
        return;
    }
    let c = Case::new("strata: boot\n", Some(0x10));
    let out = c
        .command(&["--accel", "auto"])
        .env("STRATA_KVM_PROBE_MS", "3000")
        .output()
        .unwrap();
    let e = stderr(&out);
    eprintln!("{e}");
    assert_eq!(out.status.code(), Some(0), "{e}");
    assert!(e.contains("strata: accel "), "{e}");
}

#[test]
fn auto_accel_falls_back_when_kvm_is_slow() {
    if !have_qemu() {
        return;
    }
    // A zero budget: KVM can never win, so the run must end on TCG (on a
    // kvm-pvm host, or one without /dev/kvm, it does so before trying).
    let c = Case::new("strata: boot\n", Some(0x10));
    let out = c
        .command(&["--accel", "auto"])
        .env("STRATA_KVM_PROBE_MS", "0")
        .output()
        .unwrap();
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{e}");
    assert!(e.contains("strata: accel tcg ("), "{e}");
    assert_eq!(c.log_text(), "strata: boot\n");
}

#[test]
fn bad_config_fails_before_qemu() {
    let dir = TempDir::new().unwrap();
    let conf = dir.join("bad.conf");
    std::fs::write(
        &conf,
        "md create -s 64m md0\nexport nbd vol md0\nfrobnicate now\n",
    )
    .unwrap();
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["run", "--config"])
        .arg(&conf)
        .env("STRATA_KERNEL", dir.join("no-kernel"))
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = stderr(&out);
    assert!(
        e.starts_with(&format!("strata: {}: line 3, column 1: ", conf.display())),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn missing_config_file() {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["run", "--config", "/nonexistent/strata.conf"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("/nonexistent/strata.conf"));
}

#[test]
fn missing_qemu_names_the_package() {
    let dir = TempDir::new().unwrap();
    let disk = dir.join("d.img");
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["run", "--disk"])
        .arg(format!("{},size=1M", disk.display()))
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("apt-get install -y qemu-system-x86"),
        "{}",
        stderr(&out)
    );
    // Nothing was created for a run that could not start.
    assert!(!disk.exists());
}

#[test]
fn bad_disk_spec_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["run", "--disk", "x.img,size=12Q"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown unit"), "{}", stderr(&out));
}

#[test]
fn kernel_arg_must_be_one_word() {
    for bad in ["two words", "", "tab\there"] {
        let out = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["run", "--kernel-arg", bad])
            .env("PATH", "/nonexistent")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(stderr(&out).contains("one word"), "{}", stderr(&out));
    }
}

#[test]
fn creates_disks_sparse_before_booting() {
    if !have_qemu() {
        return;
    }
    let c = Case::new("strata: boot\n", Some(0x10));
    let a = c.dir.join("a.img");
    let b = c.dir.join("b.img");
    std::fs::write(&b, vec![0u8; 4096]).unwrap();
    let out = c.run(&[
        "--accel",
        "tcg",
        "--disk",
        &format!("{},size=64M", a.display()),
        "--disk",
        &format!("{},size=1G", b.display()),
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(std::fs::metadata(&a).unwrap().len(), 64 << 20);
    assert_eq!(std::fs::metadata(&b).unwrap().len(), 4096);
    let e = stderr(&out);
    assert!(e.contains("created") && e.contains("64M"), "{e}");
    assert!(e.contains("size=1G ignored"), "{e}");
}

#[test]
fn listening_line_without_nbd_server_is_not_ready() {
    if !have_qemu() {
        return;
    }
    // hostfwd accepts the probe's connection, but no greeting ever comes.
    let c = Case::new(
        "strata: boot\nstrata: export vol size 1048576\nstrata: listening nbd 10809 http 8080\n",
        None,
    );
    let out = c
        .command(&["--accel", "tcg"])
        .env("STRATA_READY_TIMEOUT", "3")
        .output()
        .unwrap();
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(out.stdout.is_empty(), "no ready line may be printed");
    assert!(
        e.contains("not reachable") || e.contains("not ready"),
        "{e}"
    );
    assert!(c.qemu_pids().is_empty());
}

#[test]
fn sigterm_after_listening_falls_back_to_qmp() {
    if !have_qemu() {
        return;
    }
    // POST /shutdown gets no answer (5 s), then QMP quit stops QEMU.
    let c = Case::new(
        "strata: boot\nstrata: listening nbd 10809 http 8080\n",
        None,
    );
    let mut child = c
        .command(&["--accel", "tcg"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.wait_log("strata: listening", Duration::from_secs(20));
    let t = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let st = child.wait().unwrap();
    let mut e = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut e).unwrap();
    assert_eq!(st.code(), Some(1), "{e}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert!(c.qemu_pids().is_empty());
}
