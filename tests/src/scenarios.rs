//! Client scenarios run against both platforms: the same assertions for
//! the appliance in QEMU and for hosted Strata.

use crate::{client, qemu_io, Platform, Start, TempDir};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn disk_spec(dir: &TempDir, name: &str, size: &str) -> String {
    format!("{},size={size}", dir.path(name).display())
}

/// Two disks: patterns written with `qemu-io` read back, on each disk,
/// `nbdinfo --json` reports the right sizes, `/status` lists both, and the
/// data is still there after a clean restart.
pub fn two_disks_round_trip_and_restart(p: Platform) {
    let dir = TempDir::new("two");
    let d0 = disk_spec(&dir, "d0.img", "64M");
    let d1 = disk_spec(&dir, "d1.img", "32M");
    let a = Start::new(p).disk(&d0).disk(&d1).spawn().expect("start");
    assert_eq!(a.ready.len(), 2, "ready lines: {:?}", a.ready);
    assert!(a.ready[0].ends_with("/vtbd0"), "{:?}", a.ready);
    let (u0, u1) = (a.uri("vtbd0"), a.uri("vtbd1"));

    qemu_io(&u0, &["write -P 0xab 0 1M", "write -P 0x5a 3M 64k"]);
    qemu_io(&u1, &["write -P 0xcd 512 4k"]);
    qemu_io(
        &u0,
        &[
            "read -P 0xab 0 1M",
            "read -P 0x5a 3M 64k",
            "read -P 0 1M 4k",
        ],
    );
    qemu_io(&u1, &["read -P 0xcd 512 4k", "read -P 0 0 512"]);

    for (u, size) in [(&u0, 64u64 << 20), (&u1, 32 << 20)] {
        let o = client("nbdinfo", &["--json", u]);
        assert!(o.ok, "nbdinfo: {}", o.stderr);
        let want = format!("\"export-size\": {size}");
        assert!(o.stdout.contains(&want), "nbdinfo --json: {}", o.stdout);
    }
    let status = a.http_get("/status");
    let platform = match p {
        Platform::Qemu => "\"platform\":\"unikernel\"",
        Platform::Hosted => "\"platform\":\"hosted\"",
    };
    assert!(status.contains(platform), "{status}");
    assert!(
        status.contains("\"name\":\"vtbd0\",\"size_bytes\":67108864"),
        "{status}"
    );
    assert!(
        status.contains("\"name\":\"vtbd1\",\"size_bytes\":33554432"),
        "{status}"
    );
    let metrics = a.http_get("/metrics");
    assert!(
        metrics.contains("strata_provider_mapped_bytes_total{provider=\"vtbd0\"} 0"),
        "the disk class must not map data: {metrics}"
    );
    let st = a.stop();
    assert!(st.success(), "clean stop: {st:?}");

    let a = Start::new(p).disk(&d0).disk(&d1).spawn().expect("restart");
    qemu_io(
        &a.uri("vtbd0"),
        &["read -P 0xab 0 1M", "read -P 0x5a 3M 64k"],
    );
    qemu_io(&a.uri("vtbd1"), &["read -P 0xcd 512 4k"]);
    drop(a);
}

/// No config and no disk: a 256 MiB md0 is served, and FUA writes work.
pub fn default_md(p: Platform) {
    let a = Start::new(p).spawn().expect("start");
    assert_eq!(a.ready, vec![a.uri("md0")]);
    let o = client("nbdinfo", &["--size", &a.uri("md0")]);
    assert_eq!(o.stdout.trim(), "268435456", "{}", o.stderr);
    qemu_io(
        &a.uri("md0"),
        &["write -f -P 0x11 1M 128k", "flush", "read -P 0x11 1M 128k"],
    );
}

/// A config that stacks an md next to a disk, read-only export included.
pub fn config_exports(p: Platform) {
    let dir = TempDir::new("cfg");
    let cfg =
        "# two exports\nmd create -s 16m md0\nexport nbd vol vtbd0\nexport nbd scratch md0 ro\n";
    let a = Start::new(p)
        .disk(disk_spec(&dir, "d0.img", "16M"))
        .config(cfg)
        .spawn()
        .expect("start");
    assert_eq!(a.ready, vec![a.uri("vol"), a.uri("scratch")]);
    qemu_io(
        &a.uri("vol"),
        &["write -P 0x42 0 64k", "read -P 0x42 0 64k"],
    );
    let o = client(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 4k", &a.uri("scratch")],
    );
    let text = o.stdout + &o.stderr;
    assert!(
        !o.ok
            || text.contains("ermission")
            || text.contains("read-only")
            || text.contains("failed"),
        "write to a read-only export must fail: {text}"
    );
}

/// A config error is refused with its line number; nothing starts.
pub fn config_error_refused(p: Platform) {
    let err = Start::new(p)
        .config("md create -s 16m md0\n\nexport nbd vol md0 sideways\n")
        .spawn()
        .err()
        .expect("a bad config must be refused");
    assert!(err.contains("line 3"), "error names the line: {err}");
    let err = Start::new(p)
        .config("export nbd vol vtbd7\n")
        .spawn()
        .err()
        .expect("a missing provider must be refused");
    assert!(err.contains("line 1") && err.contains("vtbd7"), "{err}");
}

fn raw(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads until EOF or timeout; returns what came.
fn drain(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// Does the handshake up to transmission with NBD_OPT_EXPORT_NAME.
fn handshake(s: &mut TcpStream, export: &str) -> u64 {
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    assert_eq!(&greet[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    s.write_all(&opt).unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).unwrap();
    u64::from_be_bytes(reply[..8].try_into().unwrap())
}

fn request(cmd: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&cmd.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// Garbage, truncated handshakes and requests, bad magic and out-of-range
/// offsets: each gets an error reply or a clean disconnect, and afterwards
/// another client still reads the data intact.
pub fn malformed_input(p: Platform) {
    let dir = TempDir::new("bad");
    let a = Start::new(p)
        .disk(disk_spec(&dir, "d0.img", "8M"))
        .spawn()
        .expect("start");
    let uri = a.uri("vtbd0");
    qemu_io(&uri, &["write -P 0x77 0 256k"]);

    // Garbage instead of client flags.
    let mut s = raw(a.nbd_port);
    s.write_all(&[0xff; 64]).unwrap();
    drain(&mut s);
    // Truncated: connect, half a flags word, hang up.
    let mut s = raw(a.nbd_port);
    s.write_all(&[0, 0]).unwrap();
    drop(s);
    // Option with an absurd length.
    let mut s = raw(a.nbd_port);
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    let mut b = 3u32.to_be_bytes().to_vec();
    b.extend_from_slice(b"IHAVEOPT");
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    s.write_all(&b).unwrap();
    drain(&mut s);
    // An unknown export name gets a disconnect.
    let mut s = raw(a.nbd_port);
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&4u32.to_be_bytes());
    opt.extend_from_slice(b"nope");
    s.write_all(&opt).unwrap();
    assert!(drain(&mut s).is_empty(), "unknown export must be refused");

    // Transmission-phase abuse.
    let mut s = raw(a.nbd_port);
    let size = handshake(&mut s, "vtbd0");
    assert_eq!(size, 8 << 20);
    // Read past the end: EINVAL (22) in a simple reply.
    s.write_all(&request(0, 1, size, 4096)).unwrap();
    let mut rep = [0u8; 16];
    s.read_exact(&mut rep).unwrap();
    assert_eq!(&rep[..4], &0x6744_6698u32.to_be_bytes());
    assert_eq!(u32::from_be_bytes(rep[4..8].try_into().unwrap()), 22);
    assert_eq!(u64::from_be_bytes(rep[8..16].try_into().unwrap()), 1);
    // Write past the end: ENOSPC (28); its payload is consumed.
    let mut w = request(1, 2, size - 512, 4096);
    w.extend_from_slice(&[0xee; 4096]);
    s.write_all(&w).unwrap();
    s.read_exact(&mut rep).unwrap();
    assert_eq!(u32::from_be_bytes(rep[4..8].try_into().unwrap()), 28);
    // Misaligned read: EINVAL.
    s.write_all(&request(0, 3, 100, 512)).unwrap();
    s.read_exact(&mut rep).unwrap();
    assert_eq!(u32::from_be_bytes(rep[4..8].try_into().unwrap()), 22);
    // Unknown command: an error, not a hang.
    s.write_all(&request(99, 4, 0, 0)).unwrap();
    s.read_exact(&mut rep).unwrap();
    assert_ne!(u32::from_be_bytes(rep[4..8].try_into().unwrap()), 0);
    // Bad magic: disconnect.
    let mut bad = request(0, 5, 0, 512);
    bad[0] = 0;
    s.write_all(&bad).unwrap();
    drain(&mut s);
    // A truncated request, then hang up.
    let mut s = raw(a.nbd_port);
    handshake(&mut s, "vtbd0");
    s.write_all(&request(1, 6, 0, 65536)[..20]).unwrap();
    drop(s);
    // A write whose payload never fully arrives.
    let mut s = raw(a.nbd_port);
    handshake(&mut s, "vtbd0");
    let mut w = request(1, 7, 0, 65536);
    w.extend_from_slice(&[0x99; 1000]);
    s.write_all(&w).unwrap();
    drop(s);

    // Another client is served and the data is unchanged.
    qemu_io(&uri, &["read -P 0x77 0 256k"]);
    let st = a.http_get("/status");
    assert!(st.contains("\"version\""), "{st}");
}
