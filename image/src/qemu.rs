//! QEMU command lines as a typed value, and what QEMU's exit status means.

use std::fmt;
use std::path::PathBuf;
use std::process::ExitStatus;

/// Name of the QEMU binary looked up in `PATH`.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// Guest NBD port; the host port is forwarded to it.
pub const GUEST_NBD_PORT: u16 = 10809;
/// Guest management (HTTP) port; the host port is forwarded to it.
pub const GUEST_HTTP_PORT: u16 = 8080;
/// Guest iSCSI port; the host port, when there is one, is forwarded to it.
pub const GUEST_ISCSI_PORT: u16 = 3260;

/// I/O port of QEMU's isa-debug-exit device.
pub const DEBUG_EXIT_IOBASE: u16 = 0xf4;
/// Value the appliance writes to isa-debug-exit when it stops cleanly.
pub const GUEST_SUCCESS_CODE: u32 = 0x10;
/// QEMU's exit status for a guest value `v` is `(v << 1) | 1`, so the
/// success value 0x10 becomes 33.
pub const QEMU_SUCCESS_STATUS: i32 = ((GUEST_SUCCESS_CODE << 1) | 1) as i32;

/// The virtual machine type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Machine {
    /// PC with PCIe (SeaBIOS boots the PVH kernel); devices are virtio-pci.
    Q35,
    /// Minimal machine without firmware or PCI; devices are virtio-mmio.
    Microvm,
}

impl Machine {
    /// The `-machine` value.
    pub fn name(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Microvm => "microvm",
        }
    }
}

/// The accelerator a QEMU process runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// QEMU's portable emulator.
    Tcg,
}

impl Accel {
    /// The `-accel` value.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// The `-cpu` model used with this accelerator: the host CPU under KVM
    /// (without arch-capabilities, whose MSR 0x10a some nested hosts do
    /// not emulate), and TCG's richest model otherwise so that the guest
    /// finds the instructions (AES-NI, SSE4.2 CRC32) it selects by CPUID.
    pub fn cpu(self) -> &'static str {
        match self {
            Accel::Kvm => "host,-arch-capabilities",
            Accel::Tcg => "max",
        }
    }
}

/// Everything that decides one QEMU command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuConfig {
    /// The PVH ELF kernel (`-kernel`).
    pub kernel: PathBuf,
    /// The configuration file handed over as PVH module 0 (`-initrd`).
    pub initrd: Option<PathBuf>,
    /// Words of the kernel command line (`-append`, joined by spaces),
    /// such as `loglevel=debug` or `strata.selftest=idle,heap`.
    pub kernel_args: Vec<String>,
    /// Machine type.
    pub machine: Machine,
    /// Accelerator.
    pub accel: Accel,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Disks, in order: the guest sees them as vtbd0, vtbd1, …
    pub disks: Vec<Drive>,
    /// Host port on 127.0.0.1 forwarded to the guest's NBD port.
    pub nbd_port: u16,
    /// Host port on 127.0.0.1 forwarded to the guest's HTTP port.
    pub http_port: u16,
    /// Host port on 127.0.0.1 forwarded to the guest's iSCSI port
    /// (`None`: not forwarded).
    pub iscsi_port: Option<u16>,
    /// Unix socket for QMP, if any.
    pub qmp_socket: Option<PathBuf>,
    /// A file holding the management token, handed to the guest as the
    /// fw_cfg file `opt/strata/token` (never on the command line).
    pub token_file: Option<PathBuf>,
    /// Secrets for the config's `-k NAME`, each handed to the guest as
    /// the fw_cfg file `opt/strata/secret/NAME` (never on the command
    /// line): name and the file holding it.
    pub secrets: Vec<(String, PathBuf)>,
}

/// Where a disk's blocks live on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Drive {
    /// A raw image file.
    File(PathBuf),
    /// An NBD server on a Unix socket (its default export): a disk whose
    /// backend another process owns, so it can fail, hang or vanish.
    NbdUnix(PathBuf),
}

impl From<PathBuf> for Drive {
    fn from(p: PathBuf) -> Drive {
        Drive::File(p)
    }
}

impl Drive {
    /// The `-drive` value for the drive with id `id`.
    ///
    /// werror/rerror=report: a host error (ENOSPC, EIO) completes the
    /// request with an error status the appliance handles, instead of
    /// QEMU's default of pausing the whole VM on ENOSPC.
    fn arg(&self, id: &str) -> String {
        let common = "if=none,format=raw,cache=writeback,discard=unmap,werror=report,rerror=report";
        match self {
            Drive::File(p) => format!(
                "file={},id={id},{common},aio=threads",
                qemu_escape(&p.to_string_lossy())
            ),
            Drive::NbdUnix(sock) => format!(
                "file.driver=nbd,file.server.type=unix,file.server.path={},id={id},{common}",
                qemu_escape(&sock.to_string_lossy())
            ),
        }
    }
}

/// Escapes a value for QEMU's comma-separated option syntax (`,` → `,,`).
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

impl QemuConfig {
    /// The arguments after the program name.
    ///
    /// `-display none` rather than `-nographic`: with `-nographic` QEMU
    /// tells SeaBIOS to use the serial port as its console, and the
    /// firmware's banner and escape sequences would mix with the
    /// appliance's console lines.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        push(&["-machine", self.machine.name()]);
        push(&["-accel", self.accel.name(), "-cpu", self.accel.cpu()]);
        push(&["-m", &self.memory_mib.to_string()]);
        push(&["-nodefaults", "-display", "none", "-no-reboot"]);
        push(&["-serial", "stdio"]);
        // microvm keeps an ISA bus, so isa-debug-exit works on both machines.
        push(&[
            "-device",
            &format!("isa-debug-exit,iobase={DEBUG_EXIT_IOBASE:#x},iosize=0x04"),
        ]);
        if let Some(q) = &self.qmp_socket {
            push(&[
                "-qmp",
                &format!(
                    "unix:{},server=on,wait=off",
                    qemu_escape(&q.to_string_lossy())
                ),
            ]);
        }
        push(&["-kernel", &self.kernel.to_string_lossy()]);
        if let Some(i) = &self.initrd {
            push(&["-initrd", &i.to_string_lossy()]);
        }
        if let Some(t) = &self.token_file {
            push(&[
                "-fw_cfg",
                &format!(
                    "name=opt/strata/token,file={}",
                    qemu_escape(&t.to_string_lossy())
                ),
            ]);
        }
        for (name, file) in &self.secrets {
            push(&[
                "-fw_cfg",
                &format!(
                    "name=opt/strata/secret/{},file={}",
                    qemu_escape(name),
                    qemu_escape(&file.to_string_lossy())
                ),
            ]);
        }
        let mut kernel_args = self.kernel_args.clone();
        if let Some(p) = self.iscsi_port {
            // SendTargets names the address initiators reach, the
            // forwarded one.
            kernel_args.push(format!("strata.iscsi_portal=127.0.0.1:{p}"));
        }
        if !kernel_args.is_empty() {
            push(&["-append", &kernel_args.join(" ")]);
        }
        if self.machine == Machine::Microvm {
            // Modern (virtio 1.x) virtio-mmio, like disable-legacy=on on PCI
            // (virtio 1.2 §4.2.2 rather than the legacy §4.2.4 layout).
            push(&["-global", "virtio-mmio.force-legacy=false"]);
        }
        for (n, disk) in self.disks.iter().enumerate() {
            push(&["-drive", &disk.arg(&format!("d{n}"))]);
            let dev = match self.machine {
                Machine::Q35 => format!("virtio-blk-pci,drive=d{n},disable-legacy=on"),
                Machine::Microvm => format!("virtio-blk-device,drive=d{n}"),
            };
            push(&["-device", &dev]);
        }
        let mut netdev = format!(
            "user,id=n0,hostfwd=tcp:127.0.0.1:{}-:{GUEST_NBD_PORT},hostfwd=tcp:127.0.0.1:{}-:{GUEST_HTTP_PORT}",
            self.nbd_port, self.http_port
        );
        if let Some(p) = self.iscsi_port {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{p}-:{GUEST_ISCSI_PORT}"));
        }
        push(&["-netdev", &netdev]);
        let nic = match self.machine {
            Machine::Q35 => "virtio-net-pci,netdev=n0,romfile=,disable-legacy=on",
            Machine::Microvm => "virtio-net-device,netdev=n0",
        };
        push(&["-device", nic]);
        // The host's entropy for the appliance's keys (virtio-rng), read
        // from the host's /dev/urandom; last, so the disks and the NIC
        // keep their PCI slots and virtio-mmio transports.
        push(&["-object", "rng-random,id=rng0,filename=/dev/urandom"]);
        let rng = match self.machine {
            Machine::Q35 => "virtio-rng-pci,rng=rng0,disable-legacy=on",
            Machine::Microvm => "virtio-rng-device,rng=rng0",
        };
        push(&["-device", rng]);
        a
    }
}

/// What a QEMU exit status means for the appliance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuExit {
    /// The guest wrote the success value to isa-debug-exit.
    GuestSuccess,
    /// The guest wrote another value to isa-debug-exit.
    GuestFailure(u32),
    /// Status 0: QEMU was told to quit (QMP) or the guest reset, which
    /// `-no-reboot` turns into an exit (a triple fault ends this way).
    Stopped,
    /// Status 1: QEMU itself failed (bad option, missing file, port in use)
    /// or the guest wrote 0 to isa-debug-exit.
    QemuError,
    /// Another status.
    Other(i32),
    /// QEMU was killed by a signal.
    Signal(i32),
}

impl QemuExit {
    /// Classifies a QEMU exit status.
    pub fn from_status(status: ExitStatus) -> QemuExit {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) => QemuExit::from_code(c),
            (None, Some(s)) => QemuExit::Signal(s),
            (None, None) => QemuExit::Other(-1),
        }
    }

    /// Classifies a QEMU exit code.
    pub fn from_code(code: i32) -> QemuExit {
        match code {
            QEMU_SUCCESS_STATUS => QemuExit::GuestSuccess,
            0 => QemuExit::Stopped,
            1 => QemuExit::QemuError,
            c if c & 1 == 1 && c > 1 => QemuExit::GuestFailure((c as u32) >> 1),
            c => QemuExit::Other(c),
        }
    }
}

impl fmt::Display for QemuExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QemuExit::GuestSuccess => write!(f, "the appliance stopped cleanly"),
            QemuExit::GuestFailure(v) => {
                write!(f, "the appliance stopped with failure code {v:#x}")
            }
            QemuExit::Stopped => write!(
                f,
                "QEMU stopped without a guest exit code (guest reset or triple fault, or quit)"
            ),
            QemuExit::QemuError => write!(f, "QEMU failed (exit status 1)"),
            QemuExit::Other(c) => write!(f, "QEMU exited with status {c}"),
            QemuExit::Signal(s) => write!(f, "QEMU was killed by signal {s}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(machine: Machine, accel: Accel) -> QemuConfig {
        QemuConfig {
            kernel: PathBuf::from("/k/strata-kernel"),
            initrd: None,
            kernel_args: Vec::new(),
            machine,
            accel,
            memory_mib: 512,
            disks: vec![
                Drive::File(PathBuf::from("/d/a.img")),
                Drive::NbdUnix(PathBuf::from("/t/d,1.sock")),
            ],
            nbd_port: 10809,
            http_port: 8080,
            iscsi_port: None,
            qmp_socket: None,
            token_file: None,
            secrets: Vec::new(),
        }
    }

    /// The value following `flag`, for every occurrence.
    fn values(args: &[String], flag: &str) -> Vec<String> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    }

    #[test]
    fn q35_tcg() {
        let a = base(Machine::Q35, Accel::Tcg).args();
        assert_eq!(values(&a, "-machine"), ["q35"]);
        assert_eq!(values(&a, "-accel"), ["tcg"]);
        assert_eq!(values(&a, "-cpu"), ["max"]);
        assert_eq!(values(&a, "-m"), ["512"]);
        for f in ["-nodefaults", "-no-reboot"] {
            assert!(a.iter().any(|x| x == f), "{f} missing");
        }
        assert!(!a.iter().any(|x| x == "-nographic"));
        assert_eq!(values(&a, "-display"), ["none"]);
        assert_eq!(values(&a, "-serial"), ["stdio"]);
        assert_eq!(values(&a, "-kernel"), ["/k/strata-kernel"]);
        assert!(values(&a, "-initrd").is_empty());
        assert!(values(&a, "-append").is_empty());
        assert!(values(&a, "-qmp").is_empty());
        assert!(values(&a, "-fw_cfg").is_empty());
        assert_eq!(
            values(&a, "-drive"),
            [
                "file=/d/a.img,id=d0,if=none,format=raw,cache=writeback,discard=unmap,werror=report,rerror=report,aio=threads",
                "file.driver=nbd,file.server.type=unix,file.server.path=/t/d,,1.sock,id=d1,if=none,format=raw,cache=writeback,discard=unmap,werror=report,rerror=report",
            ]
        );
        assert_eq!(
            values(&a, "-device"),
            [
                "isa-debug-exit,iobase=0xf4,iosize=0x04",
                "virtio-blk-pci,drive=d0,disable-legacy=on",
                "virtio-blk-pci,drive=d1,disable-legacy=on",
                "virtio-net-pci,netdev=n0,romfile=,disable-legacy=on",
                "virtio-rng-pci,rng=rng0,disable-legacy=on",
            ]
        );
        assert_eq!(
            values(&a, "-object"),
            ["rng-random,id=rng0,filename=/dev/urandom"]
        );
        assert_eq!(
            values(&a, "-netdev"),
            ["user,id=n0,hostfwd=tcp:127.0.0.1:10809-:10809,hostfwd=tcp:127.0.0.1:8080-:8080"]
        );
        assert!(values(&a, "-global").is_empty());
    }

    #[test]
    fn q35_kvm_with_config_and_qmp() {
        let mut c = base(Machine::Q35, Accel::Kvm);
        c.initrd = Some(PathBuf::from("/t/strata.conf"));
        c.qmp_socket = Some(PathBuf::from("/t/qmp.sock"));
        c.token_file = Some(PathBuf::from("/t/a,b.token"));
        c.nbd_port = 20000;
        c.http_port = 20001;
        c.iscsi_port = Some(20002);
        c.memory_mib = 1024;
        let a = c.args();
        assert_eq!(values(&a, "-accel"), ["kvm"]);
        assert_eq!(values(&a, "-cpu"), ["host,-arch-capabilities"]);
        assert_eq!(values(&a, "-m"), ["1024"]);
        assert_eq!(values(&a, "-initrd"), ["/t/strata.conf"]);
        assert_eq!(values(&a, "-qmp"), ["unix:/t/qmp.sock,server=on,wait=off"]);
        // The token travels as a file, never as text on the command line.
        assert_eq!(
            values(&a, "-fw_cfg"),
            ["name=opt/strata/token,file=/t/a,,b.token"]
        );
        assert_eq!(
            values(&a, "-netdev"),
            ["user,id=n0,hostfwd=tcp:127.0.0.1:20000-:10809,hostfwd=tcp:127.0.0.1:20001-:8080,hostfwd=tcp:127.0.0.1:20002-:3260"]
        );
    }

    #[test]
    fn kernel_args_become_one_append() {
        let mut c = base(Machine::Q35, Accel::Tcg);
        c.kernel_args = vec!["strata.selftest=idle,heap".into(), "loglevel=debug".into()];
        let a = c.args();
        // One argument, commas kept: -append is not QEMU's option syntax.
        assert_eq!(
            values(&a, "-append"),
            ["strata.selftest=idle,heap loglevel=debug"]
        );
    }

    #[test]
    fn microvm_uses_virtio_mmio() {
        let a = base(Machine::Microvm, Accel::Tcg).args();
        assert_eq!(values(&a, "-machine"), ["microvm"]);
        assert_eq!(values(&a, "-global"), ["virtio-mmio.force-legacy=false"]);
        assert_eq!(
            values(&a, "-device"),
            [
                "isa-debug-exit,iobase=0xf4,iosize=0x04",
                "virtio-blk-device,drive=d0",
                "virtio-blk-device,drive=d1",
                "virtio-net-device,netdev=n0",
                "virtio-rng-device,rng=rng0",
            ]
        );
        assert_eq!(
            values(&a, "-object"),
            ["rng-random,id=rng0,filename=/dev/urandom"]
        );
        assert!(!a.iter().any(|x| x.contains("-pci")));
    }

    #[test]
    fn microvm_kvm() {
        let a = base(Machine::Microvm, Accel::Kvm).args();
        assert_eq!(values(&a, "-accel"), ["kvm"]);
        assert_eq!(values(&a, "-cpu"), ["host,-arch-capabilities"]);
    }

    #[test]
    fn no_disks_still_has_nic_and_rng() {
        let mut c = base(Machine::Q35, Accel::Tcg);
        c.disks.clear();
        let a = c.args();
        assert!(values(&a, "-drive").is_empty());
        assert_eq!(
            values(&a, "-device"),
            [
                "isa-debug-exit,iobase=0xf4,iosize=0x04",
                "virtio-net-pci,netdev=n0,romfile=,disable-legacy=on",
                "virtio-rng-pci,rng=rng0,disable-legacy=on",
            ]
        );
    }

    #[test]
    fn exit_codes() {
        assert_eq!(QEMU_SUCCESS_STATUS, 33);
        assert_eq!(QemuExit::from_code(33), QemuExit::GuestSuccess);
        assert_eq!(QemuExit::from_code(0), QemuExit::Stopped);
        assert_eq!(QemuExit::from_code(1), QemuExit::QemuError);
        assert_eq!(QemuExit::from_code(35), QemuExit::GuestFailure(0x11));
        assert_eq!(QemuExit::from_code(3), QemuExit::GuestFailure(1));
        assert_eq!(QemuExit::from_code(2), QemuExit::Other(2));
    }
}
