//! Client scenarios run against both platforms: the same assertions for
//! the appliance in QEMU and for hosted Strata.

use crate::{
    client, qemu_img_create_luks, qemu_io, qemu_io_any, wait_for, Platform, Start, TempDir,
};
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
    // qemu-io refuses locally; the server must refuse too.
    crate::nbd_clients::assert_read_only_refuses(a.nbd_port, "scratch");
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
    assert!(
        err.contains("line 1, column 16") && err.contains("vtbd7"),
        "{err}"
    );
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

fn request(cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&cmd.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
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

/// The geoms in a `GET /geom` document, with their class names.
fn geoms(topo: &serde_json::Value) -> Vec<(String, &serde_json::Value)> {
    let mut out = Vec::new();
    for c in topo["classes"].as_array().into_iter().flatten() {
        let class = c["name"].as_str().unwrap_or("?").to_string();
        for g in c["geoms"].as_array().into_iter().flatten() {
            out.push((class.clone(), g));
        }
    }
    out
}

/// The geom named `name` in a `GET /geom` document.
fn find_geom<'a>(topo: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    geoms(topo)
        .into_iter()
        .find(|(_, g)| g["name"].as_str() == Some(name))
        .map(|(_, g)| g)
}

/// The health of geom `name`, lowercased: its class's own state (a
/// mirror's "complete" or "degraded") when it reports one, else the
/// geom's ("ok", "withering"); "" when there is no such geom.
fn geom_state(topo: &serde_json::Value, name: &str) -> String {
    find_geom(topo, name)
        .and_then(|g| g["config"]["state"].as_str().or(g["state"].as_str()))
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Names of the providers geom `name` consumes.
fn consumer_names(topo: &serde_json::Value, name: &str) -> Vec<String> {
    find_geom(topo, name)
        .and_then(|g| g["consumers"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|c| c["provider"].as_str())
        .map(str::to_string)
        .collect()
}

/// A mirror's members as (provider, state), from its status.
fn mirror_members(topo: &serde_json::Value, name: &str) -> Vec<(String, String)> {
    find_geom(topo, name)
        .and_then(|g| g["config"]["members"].as_array())
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["provider"].as_str().unwrap_or("").to_string(),
                m["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Every `strata_provider_<metric>_total` sample in `/metrics`, as
/// (provider, value).
fn provider_metric(metrics: &str, metric: &str) -> Vec<(String, u64)> {
    let prefix = format!("strata_provider_{metric}_total{{provider=\"");
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (name, v) = rest.split_once("\"} ")?;
            Some((name.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// Number of 512-byte sectors that differ between two files of the same
/// size.
fn differing_sectors(a: &std::path::Path, b: &std::path::Path) -> usize {
    let a = std::fs::read(a).unwrap();
    let b = std::fs::read(b).unwrap();
    assert_eq!(a.len(), b.len());
    a.chunks(512)
        .zip(b.chunks(512))
        .filter(|(x, y)| x != y)
        .count()
}

/// Every pattern the stacked scenario writes, as qemu-io read commands.
const STACK_PATTERNS: [&str; 7] = [
    "read -P 0x11 0 1M",
    "read -P 0x33 1M 1M",
    "read -P 0x22 5180k 320k",
    "read -P 0x44 9M 256k",
    "read -P 0x66 16M 2M",
    "read -P 0x55 12M 192k",
    "read -P 0 24M 64k",
];

/// The stacked config: a stripe over two mirrors, one of whose members is a
/// nop over a disk.
pub const STACK_CONFIG: &str = "\
nop create vtbd0
mirror label gm0 vtbd0.nop vtbd1
mirror label gm1 vtbd2 vtbd3
stripe label -s 64k st0 mirror/gm0 mirror/gm1
export nbd vol stripe/st0
";

/// Stripe over mirror over nop over five disks, served over NBD:
/// patterns written and verified while a nop member starts failing (after
/// a count of good requests, in the middle of one client run), the
/// mirror degrades and keeps the data; a fresh disk is added live and
/// resynced; after a clean restart whose config names only the nop and the
/// export, the labelled geoms reassemble from their metadata and the data
/// verifies. Along the way: `strata geom list`, `GET /geom`, `strata
/// gstat`, and 0 bytes mapped by every pass-through provider.
pub fn stacked_mirror_failover_resync_restart(p: Platform) {
    let dir = TempDir::new("stack");
    let disks: Vec<String> = (0..5)
        .map(|i| disk_spec(&dir, &format!("d{i}.img"), "16M"))
        .collect();
    let mut start = Start::new(p).config(STACK_CONFIG);
    for d in &disks {
        start = start.disk(d);
    }
    let a = start.spawn().expect("start");
    assert_eq!(a.ready, vec![a.uri("vol")]);
    let vol = a.uri("vol");

    // Healthy stack.
    qemu_io(&vol, &["write -P 0x11 0 1M", "write -P 0x22 5180k 320k"]);
    qemu_io(&vol, &["read -P 0x11 0 1M", "read -P 0x22 5180k 320k"]);
    let topo = a.topology();
    for g in ["st0", "gm0", "gm1", "vtbd0.nop"] {
        assert!(find_geom(&topo, g).is_some(), "geom {g} in {topo}");
    }
    let st0 = find_geom(&topo, "st0").unwrap();
    assert_eq!(st0["providers"][0]["name"], "stripe/st0", "{st0}");
    assert!(
        st0["providers"][0]["media_size"].as_u64() > Some(30 << 20),
        "{st0}"
    );
    assert_eq!(
        st0["providers"][0]["access"]["w"], 1,
        "the export writes: {st0}"
    );
    let c = consumer_names(&topo, "gm0");
    assert!(
        c.contains(&"vtbd0.nop".to_string()) && c.contains(&"vtbd1".to_string()),
        "gm0 consumers {c:?}"
    );

    // The nop member lets 2 more requests through (the stripe sends each
    // mirror one bio per client request), then fails every read and
    // write: failures start in the middle of one qemu-io run, whose writes
    // and reads must all succeed with the right data.
    a.geom(&["nop configure -w 100 -r 100 -c 2 vtbd0.nop"]);
    qemu_io(
        &vol,
        &[
            "write -P 0x33 1M 1M",
            "write -P 0x44 9M 256k",
            "write -P 0x66 16M 2M",
            "read -P 0x11 0 1M",
            "read -P 0x33 1M 1M",
            "read -P 0x22 5180k 320k",
            "read -P 0x44 9M 256k",
            "read -P 0x66 16M 2M",
        ],
    );
    let state = geom_state(&a.topology(), "gm0");
    assert!(state.contains("degraded"), "gm0 state: {state}");
    let st = a.status();
    let gm0 = st["mirrors"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "gm0").cloned())
        .unwrap_or_default();
    assert_eq!(gm0["state"], "degraded", "/status: {st}");
    assert!(gm0["dropped"].to_string().contains("vtbd0.nop"), "{gm0}");
    let metrics = a.http_get("/metrics");
    let errors = provider_metric(&metrics, "errors");
    assert!(
        errors.iter().any(|(n, v)| n == "vtbd0.nop" && *v > 0),
        "the nop must have failed requests: {errors:?}"
    );

    // A fresh disk joins the degraded mirror and is resynced while the
    // volume takes writes.
    a.geom(&["mirror", "insert", "gm0", "vtbd4"]);
    qemu_io(&vol, &["write -P 0x55 12M 192k"]);
    let mut seen_progress = Vec::new();
    wait_for(
        "gm0 to finish resyncing onto vtbd4",
        Duration::from_secs(40),
        || {
            let topo = a.topology();
            let gm0 = find_geom(&topo, "gm0").cloned().unwrap_or_default();
            if let Some(done) = gm0["config"]["resync"]["synced_bytes"].as_u64() {
                seen_progress.push(done);
            }
            let members = mirror_members(&topo, "gm0");
            let vtbd4_active = members.contains(&("vtbd4".into(), "active".into()));
            (geom_state(&topo, "gm0") == "complete"
                && vtbd4_active
                && gm0["config"]["resync"].is_null())
            .then_some(())
        },
    );
    // Progress, when the resync was slow enough to be seen, only grows.
    assert!(
        seen_progress.windows(2).all(|w| w[0] <= w[1]),
        "{seen_progress:?}"
    );
    qemu_io(&vol, &STACK_PATTERNS);
    let st = a.status();
    let mirrors = st["mirrors"].as_array().cloned().unwrap_or_default();
    let gm0 = mirrors.iter().find(|m| m["name"] == "gm0");
    assert!(
        gm0.is_some_and(|m| m["state"] == "complete" && m["resync"].is_null()),
        "/status shows the mirrors: {st}"
    );

    // The listing tools.
    let list = a.geom(&["list"]);
    for want in [
        "Geom name: st0",
        "Geom name: gm0",
        "Name: stripe/st0",
        "Name: mirror/gm0",
        "Name: vtbd0.nop",
        "Mode: r1w1e",
    ] {
        assert!(list.contains(want), "geom list lacks {want:?}:\n{list}");
    }
    let o = a.strata("gstat", &["-I", "0.2", "-n", "1"]);
    assert!(o.ok, "gstat: {}", o.stderr);
    assert!(
        o.stdout.contains("ops/s") && o.stdout.contains("stripe/st0"),
        "{}",
        o.stdout
    );

    // Routing classes never touch the data.
    let mapped = provider_metric(&a.http_get("/metrics"), "mapped_bytes");
    assert!(mapped.len() >= 9, "{mapped:?}");
    for (name, v) in &mapped {
        assert_eq!(*v, 0, "{name} mapped {v} bytes: {mapped:?}");
    }
    let st = a.stop();
    assert!(st.success(), "clean stop: {st:?}");
    // The resynced member holds what the surviving one holds (the
    // metadata sector aside).
    let diff = differing_sectors(&dir.path("d1.img"), &dir.path("d4.img"));
    assert!(diff <= 2, "vtbd1 and vtbd4 differ in {diff} sectors");

    // Restart: only the nop and the export are configured; the mirrors and
    // the stripe assemble themselves from their metadata.
    let mut start = Start::new(p).config("nop create vtbd0\nexport nbd vol stripe/st0\n");
    for d in &disks {
        start = start.disk(d);
    }
    let a = start.spawn().expect("restart");
    assert_eq!(a.ready, vec![a.uri("vol")]);
    qemu_io(&a.uri("vol"), &STACK_PATTERNS);
    let topo = a.topology();
    for g in ["st0", "gm0", "gm1"] {
        assert!(
            find_geom(&topo, g).is_some(),
            "geom {g} after restart: {topo}"
        );
    }
    assert!(
        consumer_names(&topo, "gm0").contains(&"vtbd4".to_string()),
        "{topo}"
    );
    let st = a.stop();
    assert!(st.success(), "clean stop: {st:?}");
}

/// Live changes: a nop and an export added by `strata geom` serve new
/// clients; errors name line and column and leave the stack as it was;
/// destroying the nop by force under its open export makes that export
/// answer EIO while the other export keeps serving.
pub fn live_changes_and_forced_destroy(p: Platform) {
    let dir = TempDir::new("live");
    let a = Start::new(p)
        .disk(disk_spec(&dir, "d0.img", "8M"))
        .disk(disk_spec(&dir, "d1.img", "8M"))
        .config("export nbd b vtbd1\n")
        .spawn()
        .expect("start");
    let (ua, ub) = (a.uri("a"), a.uri("b"));

    let out = a.geom(&["nop create vtbd0", "export nbd a vtbd0.nop"]);
    assert!(out.contains("created vtbd0.nop"), "{out}");
    qemu_io(&ua, &["write -P 0x61 0 64k", "read -P 0x61 0 64k"]);
    qemu_io(&ub, &["write -P 0x62 0 64k"]);
    let topo = a.topology();
    assert!(find_geom(&topo, "vtbd0.nop").is_some(), "{topo}");

    // A syntax error applies nothing and names its place.
    let o = a.strata("geom", &["md create -s 1m md1", "mirror frob gm0"]);
    assert!(!o.ok, "a bad line must fail: {}", o.stdout);
    assert!(o.stderr.contains("line 2, column 8"), "{}", o.stderr);
    assert!(find_geom(&a.topology(), "md1").is_none());
    // A line the stack refuses stops there, with its line number.
    let (code, body) = a.http_post("/geom", "md create -s 1m md1\nnop create vtbd9\n");
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("line 2, column 12") && body.contains("vtbd9"),
        "{body}"
    );
    assert!(body.contains("\"applied\":1"), "{body}");

    // A client connected to export a before the nop goes away.
    let mut s = raw(a.nbd_port);
    assert_eq!(handshake(&mut s, "a"), 8 << 20);
    s.write_all(&request(0, 1, 0, 512)).unwrap();
    let mut rep = [0u8; 16 + 512];
    s.read_exact(&mut rep).unwrap();
    assert_eq!(u32::from_be_bytes(rep[4..8].try_into().unwrap()), 0);
    assert!(rep[16..].iter().all(|&b| b == 0x61));

    // Without -f the open nop stays; with -f it goes.
    let o = a.strata("geom", &["nop destroy vtbd0.nop"]);
    assert!(!o.ok, "destroying an open nop needs -f: {}", o.stdout);
    a.geom(&["nop destroy -f vtbd0.nop"]);

    // The open connection gets EIO; so does a new client.
    s.write_all(&request(0, 2, 0, 512)).unwrap();
    let mut rep = [0u8; 16];
    s.read_exact(&mut rep).unwrap();
    assert_eq!(u32::from_be_bytes(rep[4..8].try_into().unwrap()), 5, "EIO");
    assert_eq!(u64::from_be_bytes(rep[8..16].try_into().unwrap()), 2);
    drop(s);
    let o = qemu_io_any(&ua, &["read 0 4k"]);
    let text = o.stdout.clone() + &o.stderr;
    assert!(
        !o.ok || text.contains("failed"),
        "a read through the destroyed nop must fail: {text}"
    );
    let st = a.status();
    let orphaned = st["orphaned"]["exports"].to_string();
    assert!(orphaned.contains("\"a\""), "{st}");
    assert!(
        st["orphaned"]["providers"]
            .to_string()
            .contains("vtbd0.nop"),
        "{st}"
    );

    // The other export is untouched.
    qemu_io(
        &ub,
        &[
            "read -P 0x62 0 64k",
            "write -P 0x63 64k 64k",
            "read -P 0x63 64k 64k",
        ],
    );
    let o = a.strata("gstat", &["-I", "0.2", "-n", "1"]);
    assert!(
        o.ok && o.stdout.contains("vtbd1"),
        "{}{}",
        o.stdout,
        o.stderr
    );
    // The forced destroy orphaned export a: writes it acknowledged may
    // not be on a disk, so the stop says it failed.
    let (st, out) = a.stop_with_output();
    assert!(
        !st.success(),
        "a stop that could not flush export a: {st:?}"
    );
    assert!(
        out.contains("shutdown failed") && out.contains("export a "),
        "the reason is printed: {out}"
    );
}

/// Partition tables made on the host are served: a disk partitioned by
/// `sfdisk` and one by `sgdisk` boot with their partitions as providers
/// (`vtbd0p1`, …, named as FreeBSD names them, with the tables' sizes);
/// exports over partitions land their writes at the partitions' offsets
/// in the image files; I/O past a partition's end is refused; a table is
/// made and a partition added live with `part create/add`; after a
/// restart the host-made tables come back, and the live one on vtbd2,
/// which the config exports raw, is refused and reported, never assembled.
pub fn partitions_from_host_tools(p: Platform) {
    let dir = TempDir::new("part");
    let (f0, f1) = (dir.path("sf.img"), dir.path("sg.img"));
    for f in [&f0, &f1] {
        std::fs::File::create(f)
            .and_then(|h| h.set_len(64 << 20))
            .unwrap();
    }
    // sfdisk: two partitions of 8 MiB and 16 MiB.
    let mut sf = std::process::Command::new("sfdisk")
        .arg(&f0)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk (Debian package fdisk)");
    sf.stdin
        .take()
        .unwrap()
        .write_all(
            b"label: gpt\nstart=2048, size=16384, name=one\nstart=18432, size=32768, name=two\n",
        )
        .unwrap();
    assert!(sf.wait().unwrap().success());
    // sgdisk: entries 1 and 3 (there is no vtbd1p2).
    let o = client(
        "sgdisk",
        &[
            "-n",
            "1:2048:+4M",
            "-n",
            "3:0:+12M",
            "-c",
            "3:gamma",
            f1.to_str().unwrap(),
        ],
    );
    assert!(o.ok, "sgdisk: {}{}", o.stdout, o.stderr);
    let config = "export nbd one vtbd0p1\nexport nbd two vtbd0p2\nexport nbd gamma vtbd1p3\nexport nbd raw vtbd2\n";
    let spare = disk_spec(&dir, "raw.img", "32M");
    let start = |dir: &TempDir| {
        Start::new(p)
            .disk(dir.path("sf.img").to_str().unwrap())
            .disk(dir.path("sg.img").to_str().unwrap())
            .disk(&spare)
            .config(config)
            .spawn()
            .expect("start")
    };
    let a = start(&dir);
    for (export, size) in [("one", 8u64 << 20), ("two", 16 << 20), ("gamma", 12 << 20)] {
        let o = client("nbdinfo", &["--size", &a.uri(export)]);
        assert_eq!(o.stdout.trim(), size.to_string(), "{export}: {}", o.stderr);
    }
    qemu_io(
        &a.uri("two"),
        &["write -P 0x2b 0 64k", "write -P 0x2c 16320k 64k"],
    );
    qemu_io(&a.uri("gamma"), &["write -P 0x3c 4k 4k"]);
    // One past the end of the partition: refused by the server.
    let o = qemu_io_any(&a.uri("two"), &["read 16384k 512"]);
    assert!(
        !o.ok || o.stdout.contains("error") || o.stderr.contains("error"),
        "{}{}",
        o.stdout,
        o.stderr
    );
    // Made live: a table on the spare disk and a partition in it.
    let out = a.geom(&[
        "part create vtbd2",
        "part add -t linux-data -s 8m -l live vtbd2",
    ]);
    assert!(out.contains("vtbd2p1"), "{out}");
    let topo = a.topology();
    let part = topo["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "part")
        .expect("part class in /geom");
    assert_eq!(part["geoms"].as_array().unwrap().len(), 3, "{part}");
    let list = a.strata("geom", &["list"]);
    assert!(list.stdout.contains("Name: vtbd1p3"), "{}", list.stdout);
    assert!(a.stop().success());

    // The writes are at the partitions' offsets in the image files.
    let img = std::fs::read(&f0).unwrap();
    let two = 18432 * 512;
    assert!(img[two..two + 65536].iter().all(|&b| b == 0x2b));
    let end = two + 16320 * 1024;
    assert!(img[end..end + 65536].iter().all(|&b| b == 0x2c));
    let img = std::fs::read(&f1).unwrap();
    let gamma = (2048 + 8192) * 512 + 4096;
    assert!(img[gamma..gamma + 4096].iter().all(|&b| b == 0x3c));

    // The host-made tables come back.
    let a = start(&dir);
    qemu_io(&a.uri("two"), &["read -P 0x2b 0 64k"]);
    let topo = a.topology();
    let names: Vec<String> = topo["classes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["geoms"].as_array().unwrap().iter())
        .flat_map(|g| g["providers"].as_array().unwrap().iter())
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    // vtbd2 is exported raw by the config: a table on it (made live here,
    // or written by a client) is not assembled at boot, but reported.
    assert!(!names.contains(&"vtbd2p1".to_string()), "{names:?}");
    assert!(names.contains(&"vtbd1p3".to_string()), "{names:?}");
    let taste = a.status()["taste"].clone();
    assert!(
        taste.as_array().is_some_and(|t| t
            .iter()
            .any(|r| r["provider"] == "vtbd2" && r["class"] == "part")),
        "{taste}"
    );
    qemu_io(&a.uri("raw"), &["read 0 4k"]);
    drop(a);
}

/// Control without stalls: while a mirror over two 1 GiB disks is
/// labelled live through `POST /geom` (its metadata going to a member
/// behind a nop that delays every request by 1.5 s, so the labelling
/// takes seconds), another client's reads and writes keep completing.
/// Labelling used to spin the event loop until the metadata was written,
/// and then no other client was served.
pub fn labelling_does_not_stall_other_clients(p: Platform) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    let dir = TempDir::new("nostall");
    let a = Start::new(p)
        .disk(disk_spec(&dir, "d0.img", "1G"))
        .disk(disk_spec(&dir, "d1.img", "1G"))
        .config("md create -s 16m md0\nexport nbd m md0\n")
        .spawn()
        .expect("start");
    let port = a.nbd_port;
    let done: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (done, stop) = (done.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut s = raw(port);
            handshake(&mut s, "m");
            let data = [0x5au8; 4096];
            let mut reply = [0u8; 16 + 4096];
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let at = (i % 4096) * 4096;
                let mut w = request(1, i, at, 4096);
                w.extend_from_slice(&data);
                s.write_all(&w).unwrap();
                s.read_exact(&mut reply[..16]).unwrap();
                assert_eq!(&reply[4..8], &[0; 4], "write {i}");
                s.write_all(&request(0, i, at, 4096)).unwrap();
                s.read_exact(&mut reply).unwrap();
                assert_eq!(&reply[4..8], &[0; 4], "read {i}");
                assert!(reply[16..].iter().all(|&b| b == 0x5a), "read {i} data");
                done.lock().unwrap().push(Instant::now());
                i += 1;
            }
        })
    };
    wait_for("the client to run", Duration::from_secs(20), || {
        (done.lock().unwrap().len() > 10).then_some(())
    });
    let t0 = Instant::now();
    let (code, body) = a.http_post(
        "/geom",
        "nop create -d 1500 vtbd1\nmirror label gm0 vtbd0 vtbd1.nop\n",
    );
    let t1 = Instant::now();
    stop.store(true, Ordering::SeqCst);
    client.join().expect("the client's I/O all succeeded");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("mirror/gm0"), "{body}");
    let took = t1 - t0;
    assert!(
        took > Duration::from_millis(2500),
        "the labelling waited for its delayed metadata I/O ({took:?})"
    );
    // Completions well inside the labelling's window, away from its edges.
    let (from, to) = (
        t0 + Duration::from_millis(300),
        t1 - Duration::from_millis(300),
    );
    let during = done
        .lock()
        .unwrap()
        .iter()
        .filter(|&&t| t > from && t < to)
        .count();
    assert!(
        during >= 20,
        "only {during} requests completed during {took:?} of labelling"
    );
}

/// Tasting never overrules the config: a client writes a genuine mirror
/// label (the last sector of a disk Strata labelled) into the last sector
/// of raw export `raw` (vtbd0); restarted on the same disk files, the
/// appliance serves the whole config, `raw` at full size with the
/// client's bytes intact, builds no mirror over vtbd0, and lists the
/// refused taste in `/status`.
pub fn forged_label_in_raw_export(p: Platform) {
    use crate::nbd_clients::{RawNbd, FLUSH, WRITE};
    let dir = TempDir::new("forge");
    let a = Start::new(p)
        .disk(disk_spec(&dir, "src.img", "8M"))
        .config("mirror label evil vtbd0\nexport nbd m mirror/evil\n")
        .spawn()
        .expect("label a source disk");
    assert!(a.stop().success());
    let src = std::fs::read(dir.path("src.img")).expect("source image");
    let label = src[src.len() - 512..].to_vec();
    assert!(label.starts_with(b"STRATA-GEOM-META"), "a label");

    let (d0, d1) = (
        disk_spec(&dir, "d0.img", "8M"),
        disk_spec(&dir, "d1.img", "8M"),
    );
    let config = "export nbd raw vtbd0\nexport nbd other vtbd1\n";
    let start = || Start::new(p).disk(&d0).disk(&d1).config(config);
    let a = start().spawn().expect("start");
    let mut c = RawNbd::connect(a.nbd_port, "raw", false).expect("connect raw");
    let size = c.size;
    assert_eq!(size, 8 << 20);
    assert_eq!(c.call(WRITE, 0, size - 512, 512, &label).error, 0);
    assert_eq!(c.call(FLUSH, 0, 0, 0, &[]).error, 0);
    c.disconnect();
    assert!(a.stop().success());

    let a = start().spawn().expect("restart over the forged label");
    assert_eq!(a.ready, vec![a.uri("raw"), a.uri("other")]);
    let mut c = RawNbd::connect(a.nbd_port, "raw", false).expect("connect raw again");
    assert_eq!(c.size, size, "the whole disk");
    assert_eq!(c.read(size - 512, 512), label, "the client's bytes");
    c.disconnect();
    let topo = a.topology();
    assert!(find_geom(&topo, "evil").is_none(), "{topo}");
    let st = a.status();
    let taste = st["taste"].as_array().cloned().unwrap_or_default();
    assert!(
        taste
            .iter()
            .any(|t| t["provider"] == "vtbd0" && t["class"] == "mirror"),
        "/status lists the refused taste: {st}"
    );
    assert!(a.stop().success());
}

/// Changes need the management token: without it (or with a wrong one)
/// `POST /geom` and `POST /shutdown` get 401 and change nothing; reads are
/// open; the token file is private; `strata geom` finds it by the port.
pub fn changes_need_the_token(p: Platform) {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("token");
    let a = Start::new(p)
        .disk(disk_spec(&dir, "d0.img", "16M"))
        .config("export nbd ro vtbd0 ro\n")
        .spawn()
        .expect("start");
    let port = a.http_port;
    let file = image::token::default_path(port);
    let mode = std::fs::metadata(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{}", file.display());
    let token = crate::token_for(port).expect("a token");
    assert!(token.len() >= 32);
    let before = a.http_get("/status");
    for bad in [None, Some("wrong"), Some(&token[1..])] {
        let (code, body) =
            crate::http_request_as(port, bad, "POST", "/geom", "export nbd rw2 vtbd0\n");
        assert_eq!(code, 401, "{body}");
        let (code, body) = crate::http_request_as(port, bad, "POST", "/shutdown", "");
        assert_eq!(code, 401, "{body}");
    }
    // Nothing changed, and the appliance still serves.
    let st = a.status();
    assert!(!st.to_string().contains("rw2"), "{st}");
    assert_eq!(a.http_get("/status").len(), before.len());
    let o = client(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read 0 4k", &a.uri("ro")],
    );
    assert!(o.ok, "{}{}", o.stdout, o.stderr);
    let o = client(
        "nbdinfo",
        &["--list", &format!("nbd://127.0.0.1:{}", a.nbd_port)],
    );
    assert!(
        o.ok && !o.stdout.contains("rw2"),
        "{}{}",
        o.stdout,
        o.stderr
    );
    // The host tool presents the token it finds from the port alone.
    a.geom(&["md create -s 1m md9", "export nbd scratch md9"]);
    qemu_io(&a.uri("scratch"), &["write -P 7 0 4k", "read -P 7 0 4k"]);
    drop(a);
}

/// A clean stop answers the writes it has received before it flushes and
/// exits: a client pipelines writes, `POST /shutdown` arrives behind them,
/// and every write is answered (done, or refused with ESHUTDOWN if it came
/// after the stop began); every one answered as done is in the disk file
/// after the exit, which is a success.
pub fn clean_stop_drains_writes(p: Platform) {
    let dir = TempDir::new("drain");
    let img = dir.path("d0.img");
    let a = Start::new(p)
        .disk(disk_spec(&dir, "d0.img", "16M"))
        .config("export nbd vol vtbd0\n")
        .spawn()
        .expect("start");
    let mut s = raw(a.nbd_port);
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    assert_eq!(handshake(&mut s, "vol"), 16 << 20);
    const N: u64 = 48;
    const LEN: usize = 64 << 10;
    let mut out = Vec::new();
    for i in 0..N {
        out.extend_from_slice(&request(1, i, i * LEN as u64, LEN as u32));
        out.extend_from_slice(&vec![(i as u8) | 0x80; LEN]);
    }
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&out);
    });
    let mut done = Vec::new();
    let mut answered = 0;
    while answered < N {
        if answered == 1 {
            // The stop arrives while the rest are on their way or in flight.
            let (code, body) = crate::http_request(a.http_port, "POST", "/shutdown", "");
            assert_eq!(code, 200, "{body}");
        }
        let mut rep = [0u8; 16];
        s.read_exact(&mut rep)
            .unwrap_or_else(|e| panic!("{answered} of {N} writes answered, then: {e}"));
        let err = u32::from_be_bytes(rep[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(rep[8..16].try_into().unwrap());
        assert!(err == 0 || err == 108, "write {cookie}: error {err}");
        if err == 0 {
            done.push(cookie);
        }
        answered += 1;
    }
    let _ = writer.join();
    let st = a.stop();
    assert!(st.success(), "the clean stop failed: {st:?}");
    let bytes = std::fs::read(&img).unwrap();
    for i in &done {
        let at = *i as usize * LEN;
        assert!(
            bytes[at..at + LEN].iter().all(|&b| b == (*i as u8) | 0x80),
            "write {i} was answered but is not on the disk"
        );
    }
    println!(
        "{} of {N} writes done before the stop, the rest refused",
        done.len()
    );
}

/// The raid5 scenario's first config: three members, the second behind a
/// nop the scenario makes fail; vtbd3 is a spare.
pub const RAID5_CONFIG: &str = "\
nop create vtbd1
raid5 label -s 16k r0 vtbd0 vtbd1.nop vtbd2
export nbd vol raid5/r0
";

/// raid5 `name`'s entry in `GET /status` (`Null` when it is not listed).
fn raid5_entry(a: &crate::Appliance, name: &str) -> serde_json::Value {
    let st = a.status();
    st["raid5"]
        .as_array()
        .and_then(|l| l.iter().find(|r| r["name"] == name).cloned())
        .unwrap_or_default()
}

/// What the export should hold, byte for byte, kept beside it in a file.
struct Image {
    bytes: Vec<u8>,
    path: std::path::PathBuf,
}

impl Image {
    /// `size` bytes of pseudo-random data (seeded: no two 4 KiB blocks
    /// alike, and no zeroes for anything on the way to skip).
    fn random(dir: &TempDir, size: usize) -> Image {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut bytes = Vec::with_capacity(size + 8);
        while bytes.len() < size {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.extend_from_slice(&(x | 0x0101_0101_0101_0101).to_le_bytes());
        }
        bytes.truncate(size);
        let path = dir.path("raid5-model.img");
        std::fs::write(&path, &bytes).unwrap();
        Image { bytes, path }
    }

    /// The qemu-io command that writes `pattern` at `off`, `len` bytes,
    /// recorded in the model.
    fn write(&mut self, pattern: u8, off: usize, len: usize) -> String {
        self.bytes[off..off + len].fill(pattern);
        format!("write -P {pattern:#x} {off} {len}")
    }

    /// The qemu-io commands that read back each of `writes` (as made by
    /// [`Image::write`]) with its pattern checked.
    fn reads(writes: &[String]) -> Vec<String> {
        writes
            .iter()
            .map(|w| w.replacen("write", "read", 1))
            .collect()
    }

    /// Reads the whole export with `nbdcopy` and compares every byte with
    /// the model; panics naming the first differing 4 KiB block.
    fn verify(&self, uri: &str, dir: &TempDir, when: &str) {
        let out = dir.path("raid5-read.img");
        let _ = std::fs::remove_file(&out);
        std::fs::File::create(&out)
            .and_then(|f| f.set_len(self.bytes.len() as u64))
            .unwrap();
        let o = client("nbdcopy", &[uri, out.to_str().unwrap()]);
        assert!(o.ok, "{when}: nbdcopy {uri}: {}{}", o.stdout, o.stderr);
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), self.bytes.len(), "{when}: size");
        let bad: Vec<usize> = got
            .chunks(4096)
            .zip(self.bytes.chunks(4096))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i * 4096)
            .collect();
        let first = bad.first().map_or(String::new(), |&at| {
            let what = |b: &[u8]| {
                if b.iter().all(|&x| x == b[0]) {
                    format!("all {:#04x}", b[0])
                } else {
                    format!("{:02x?}…", &b[..8])
                }
            };
            format!(
                "; at {at} it holds {}, expected {}",
                what(&got[at..at + 4096]),
                what(&self.bytes[at..at + 4096])
            )
        });
        assert!(
            bad.is_empty(),
            "{when}: {} blocks of 4 KiB differ, the first at bytes {:?}{first}",
            bad.len(),
            &bad[..bad.len().min(8)]
        );
    }
}

/// Members of raid5 entry `r` as (index, provider, state).
fn raid5_members(r: &serde_json::Value) -> Vec<(u64, Option<String>, String)> {
    r["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["index"].as_u64().unwrap_or(u64::MAX),
                m["provider"].as_str().map(str::to_string),
                m["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// A raid5 over three disks (16 KiB stripe unit) and a spare, served over
/// NBD. The whole export is written with `nbdcopy`, then patterns that
/// cover whole rows, part of a row and single blocks; a member (behind a
/// nop) starts failing in the middle of one `qemu-io` run whose writes
/// and reads must all succeed; the array says `degraded` and every byte
/// reads back as written. Restarted without the failed member's disk, it
/// assembles from the other two by tasting, serves degraded and every
/// byte verifies; a fresh disk is inserted live and rebuilt while the
/// volume takes writes, until the array is `complete`; restarted once
/// more without a different original disk, it serves degraded again from
/// the rebuilt member and every byte still verifies.
pub fn raid5_member_failure_rebuild_restart(p: Platform) {
    let dir = TempDir::new("raid5");
    let file = |i: usize| disk_spec(&dir, &format!("d{i}.img"), "16M");
    let start = |disks: &[usize], config: &str| {
        let mut s = Start::new(p).config(config);
        for &i in disks {
            s = s.disk(file(i));
        }
        s.spawn().expect("start")
    };
    let a = start(&[0, 1, 2, 3], RAID5_CONFIG);
    assert_eq!(a.ready, vec![a.uri("vol")]);
    let vol = a.uri("vol");
    // A new array computes its parity first (a resync job, `rebuilding`).
    let r0 = wait_for(
        "r0 to finish its first parity resync",
        Duration::from_secs(180),
        || {
            let r0 = raid5_entry(&a, "r0");
            (r0["state"] == "complete").then_some(r0)
        },
    );
    assert_eq!(r0["stripe_unit"], 16384, "{r0}");
    assert_eq!(r0["ppl"], true, "{r0}");
    assert_eq!(raid5_members(&r0).len(), 3, "{r0}");
    let size: usize = client("nbdinfo", &["--size", &vol])
        .stdout
        .trim()
        .parse()
        .expect("nbdinfo --size");
    // Two data members of 16 MiB, less their metadata.
    assert!(size > 30 << 20 && size <= 32 << 20, "export size {size}");
    assert_eq!(size % (32 << 10), 0, "whole rows: {size}");

    let mut img = Image::random(&dir, size);
    let o = client("nbdcopy", &[img.path.to_str().unwrap(), &vol]);
    assert!(o.ok, "nbdcopy to the array: {}{}", o.stdout, o.stderr);
    let healthy = vec![
        img.write(0x11, 0, 1 << 20),
        img.write(0x22, (1 << 20) + (4 << 10), 20 << 10),
        img.write(0x33, 3 << 20, 4 << 10),
        img.write(0x44, (5 << 20) + (8 << 10), 100 << 10),
    ];
    let cmds: Vec<&str> = healthy.iter().map(String::as_str).collect();
    qemu_io(&vol, &cmds);
    img.verify(&vol, &dir, "healthy");

    // The nop lets two more requests through, then fails every read and
    // write: the failure starts inside this qemu-io run.
    a.geom(&["nop configure -w 100 -r 100 -c 2 vtbd1.nop"]);
    let during = vec![
        img.write(0x55, 7 << 20, 256 << 10),
        img.write(0x66, (9 << 20) + (12 << 10), 8 << 10),
        img.write(0x77, 11 << 20, 1 << 20),
        img.write(0x88, size - (64 << 10), 64 << 10),
    ];
    let mut cmds: Vec<String> = during.clone();
    cmds.extend(Image::reads(&healthy));
    cmds.extend(Image::reads(&during));
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&vol, &cmds);
    let r0 = raid5_entry(&a, "r0");
    assert_eq!(r0["state"], "degraded", "{r0}");
    let members = raid5_members(&r0);
    assert!(
        members
            .iter()
            .any(|(i, _, s)| *i == 1 && (s == "failed" || s == "missing")),
        "member 1 is out: {r0}"
    );
    assert!(
        members
            .iter()
            .filter(|(i, _, _)| *i != 1)
            .all(|(_, _, s)| s == "active"),
        "the others serve: {r0}"
    );
    img.verify(&vol, &dir, "degraded by a failing member");
    // Writes while degraded: the failed member misses them.
    let degraded = img.write(0x99, (2 << 20) + (16 << 10), 48 << 10);
    qemu_io(&vol, &[degraded.as_str()]);
    let st = a.stop();
    assert!(st.success(), "clean stop: {st:?}");

    // Restart without the failed member's disk: d0, d2 and the spare are
    // vtbd0, vtbd1 and vtbd2; the array assembles from its labels.
    let a = start(&[0, 2, 3], "export nbd vol raid5/r0\n");
    assert_eq!(a.ready, vec![a.uri("vol")]);
    let vol = a.uri("vol");
    let r0 = raid5_entry(&a, "r0");
    assert_eq!(r0["state"], "degraded", "{r0}");
    assert!(
        raid5_members(&r0)
            .iter()
            .any(|(_, prov, s)| prov.is_none() && s == "missing"),
        "one member is missing: {r0}"
    );
    img.verify(&vol, &dir, "restarted with two of three members");

    // A fresh disk replaces it, rebuilt live while the volume takes
    // writes.
    a.geom(&["raid5 insert r0 vtbd2"]);
    let rebuilding = [
        img.write(0xaa, 4 << 20, 128 << 10),
        img.write(0xbb, (13 << 20) + (4 << 10), 4 << 10),
    ];
    let cmds: Vec<&str> = rebuilding.iter().map(String::as_str).collect();
    qemu_io(&vol, &cmds);
    let mut progress = Vec::new();
    let r0 = wait_for(
        "r0 to finish rebuilding onto vtbd2",
        Duration::from_secs(180),
        || {
            let r0 = raid5_entry(&a, "r0");
            if let Some(done) = r0["rebuild"]["done_bytes"].as_u64() {
                progress.push(done);
            }
            let all_active = raid5_members(&r0).iter().all(|(_, _, s)| s == "active");
            (r0["state"] == "complete" && r0["rebuild"].is_null() && all_active).then_some(r0)
        },
    );
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "rebuild progress only grows: {progress:?}"
    );
    assert!(
        raid5_members(&r0)
            .iter()
            .any(|(_, prov, _)| prov.as_deref() == Some("vtbd2")),
        "vtbd2 is a member: {r0}"
    );
    img.verify(&vol, &dir, "rebuilt onto a fresh disk");
    let st = a.stop();
    assert!(st.success(), "clean stop: {st:?}");

    // Lose a different original disk (d0): d2 and the rebuilt spare are
    // what is left, as vtbd0 and vtbd1.
    let a = start(&[2, 3], "export nbd vol raid5/r0\n");
    let vol = a.uri("vol");
    let r0 = raid5_entry(&a, "r0");
    assert_eq!(r0["state"], "degraded", "{r0}");
    img.verify(&vol, &dir, "without d0, from the rebuilt member");
    let st = a.stop();
    assert!(st.success(), "clean stop: {st:?}");
}

/// `qemu-io` through QEMU's own LUKS driver on a file (`--image-opts
/// driver=luks`), with the passphrase in `pass`.
fn luks_io(pass: &std::path::Path, file: &std::path::Path, cmds: &[&str]) -> crate::Output {
    let object = format!("secret,id=s0,file={}", pass.display());
    let opts = format!("driver=luks,key-secret=s0,file.filename={}", file.display());
    let mut args = vec!["--object", &object, "--image-opts", &opts];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    crate::client("qemu-io", &args)
}

/// True when a sector of `hay` is all `byte`.
fn has_sector_of(hay: &[u8], byte: u8) -> bool {
    hay.chunks_exact(512).any(|s| s.iter().all(|&b| b == byte))
}

/// eli volumes move between Strata and the rest of the world: one Strata
/// formats (the passphrase a `--secret`) opens in QEMU's LUKS driver and
/// passes `cryptsetup luksDump`, with no plaintext on the raw disk and
/// each byte enciphered once; one `qemu-img create -f luks` made attaches
/// in Strata and reads what QEMU wrote, gets a key slot added and the
/// old one removed live, as cryptsetup and QEMU then see them; a wrong
/// passphrase stops the boot naming the provider and the cause, and
/// writes nothing.
pub fn eli_volumes_move_between_strata_and_qemu(p: Platform) {
    let dir = TempDir::new("eli");
    let pass = dir.path("pass");
    std::fs::write(&pass, b"correct horse battery").unwrap();
    let disk = dir.path("strata.img");
    let secret = format!("vol={}", pass.display());
    let conf = "eli init -i 10 -k vol vtbd0\neli attach -k vol vtbd0\nexport nbd vol vtbd0.eli\n";
    let mut start = Start::new(p)
        .disk(format!("{},size=64M", disk.display()))
        .config(conf);
    start.extra.extend(["--secret".to_string(), secret.clone()]);
    let a = start.spawn().expect("start with eli");
    let u = a.uri("vol");
    qemu_io(&u, &["write -P 0x5a 0 1M", "write -P 0xa5 5M 64k"]);
    qemu_io(&u, &["read -P 0x5a 0 1M", "read -P 0xa5 5M 64k"]);
    let metrics = a.http_get("/metrics");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("strata_provider_encrypted_bytes_total{provider=\"vtbd0.eli\"}"))
        .unwrap_or_else(|| panic!("no encrypted bytes figure: {metrics}"));
    assert!(
        line.ends_with(&format!(" {}", (1 << 20) + (64 << 10))),
        "each byte written enciphered once: {line}"
    );
    let topo = a.http_get("/geom");
    assert!(topo.contains("\"cipher\":\"aes-xts-plain64\""), "{topo}");
    assert!(a.stop().success());

    let raw = std::fs::read(&disk).unwrap();
    assert!(
        !has_sector_of(&raw, 0x5a) && !has_sector_of(&raw, 0xa5),
        "plaintext on the raw disk"
    );
    let dump = client("cryptsetup", &["luksDump", disk.to_str().unwrap()]);
    assert!(dump.ok, "cryptsetup luksDump: {}", dump.stderr);
    for want in [
        "Version:       \t1",
        "xts-plain64",
        "sha256",
        "Key Slot 0: ENABLED",
        "Key Slot 1: DISABLED",
    ] {
        assert!(
            dump.stdout.contains(want),
            "luksDump lacks {want:?}: {}",
            dump.stdout
        );
    }
    let o = luks_io(&pass, &disk, &["read -P 0x5a 0 1M", "read -P 0xa5 5M 64k"]);
    assert!(
        o.ok && !o.stdout.contains("verification failed"),
        "QEMU's LUKS driver: {}{}",
        o.stdout,
        o.stderr
    );

    // QEMU's volume in Strata.
    let theirs = dir.path("qemu.img");
    let object = format!("secret,id=s0,file={}", pass.display());
    let o = qemu_img_create_luks(&object, &theirs, "32M");
    assert!(o.ok, "qemu-img create -f luks: {}", o.stderr);
    let o = luks_io(&pass, &theirs, &["write -P 0x33 4096 64k"]);
    assert!(o.ok, "{}", o.stderr);
    let conf = "eli attach -k vol vtbd0\nexport nbd vol vtbd0.eli\n";
    let mut start = Start::new(p)
        .disk(theirs.display().to_string())
        .config(conf);
    start.extra.extend(["--secret".to_string(), secret]);
    let a = start.spawn().expect("attach QEMU's volume");
    qemu_io(
        &a.uri("vol"),
        &["read -P 0x33 4096 64k", "write -P 0x44 1M 4k"],
    );
    // A second key slot, added live; then the first removed (the last
    // slot only with -f).
    a.geom(&["eli addkey -i 10 -n 3 -p second vtbd0"]);
    let removed = a.strata("geom", &["eli delkey -n 3 vtbd0"]);
    assert!(removed.ok, "{}", removed.stderr);
    let last = a.strata("geom", &["eli delkey -n 0 vtbd0"]);
    assert!(
        !last.ok && last.stderr.contains("last key slot"),
        "{}{}",
        last.stdout,
        last.stderr
    );
    a.geom(&[
        "eli addkey -i 10 -n 3 -p second vtbd0",
        "eli delkey -n 0 vtbd0",
    ]);
    assert!(a.stop().success());
    let dump = client("cryptsetup", &["luksDump", theirs.to_str().unwrap()]);
    assert!(
        dump.stdout.contains("Key Slot 3: ENABLED") && dump.stdout.contains("Key Slot 0: DISABLED"),
        "{}",
        dump.stdout
    );
    let second = dir.path("second");
    std::fs::write(&second, b"second").unwrap();
    let gone = luks_io(&pass, &theirs, &["read 0 512"]);
    assert!(
        !gone.ok,
        "the removed slot still opens the volume: {}",
        gone.stdout
    );
    let o = luks_io(
        &second,
        &theirs,
        &["read -P 0x44 1M 4k", "read -P 0x33 4096 64k"],
    );
    assert!(
        o.ok && !o.stdout.contains("verification failed"),
        "{}{}",
        o.stdout,
        o.stderr
    );

    // A wrong passphrase: the boot stops, naming the provider and why.
    let bad = dir.path("bad");
    std::fs::write(&bad, b"correct horse battery\n").unwrap();
    let before = std::fs::read(&disk).unwrap();
    let mut start = Start::new(p).disk(disk.display().to_string()).config(conf);
    start
        .extra
        .extend(["--secret".to_string(), format!("vol={}", bad.display())]);
    let e = start.run_to_exit(Duration::from_secs(120));
    assert_ne!(e.code, Some(0));
    let said = format!("{}{}{}", e.stdout, e.stderr, e.console);
    assert!(said.contains("vtbd0: wrong passphrase"), "{said}");
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "a refused attach wrote to the disk"
    );
}

/// gbde through real clients: a volume Strata formats (the passphrase a
/// `--secret`) serves what qemu-io writes, holds no plaintext on the raw
/// disk, counts each byte enciphered once, reopens at the next boot with
/// its data; a lock sector is set and another nuked live, after which
/// only the new passphrase opens it; a wrong passphrase stops the boot
/// naming the provider and the cause, and writes nothing.
pub fn gbde_volumes_keep_data_and_refuse_wrong_passphrases(p: Platform) {
    let dir = TempDir::new("gbde");
    let pass = dir.path("pass");
    std::fs::write(&pass, b"correct horse battery").unwrap();
    let disk = dir.path("gbde.img");
    let secret = format!("vol={}", pass.display());
    let conf = "gbde init -i 10 -k vol vtbd0\ngbde attach -k vol vtbd0\nexport nbd vol vtbd0.bde\n";
    let mut start = Start::new(p)
        .disk(format!("{},size=32M", disk.display()))
        .config(conf);
    start.extra.extend(["--secret".to_string(), secret.clone()]);
    let a = start.spawn().expect("start with gbde");
    let u = a.uri("vol");
    qemu_io(
        &u,
        &[
            "write -P 0x5a 0 1M",
            "write -P 0xa5 5M 64k",
            "write -P 0x77 4096 512",
        ],
    );
    qemu_io(
        &u,
        &[
            "read -P 0x5a 0 4096",
            "read -P 0x77 4096 512",
            "read -P 0x5a 4608 1043968",
            "read -P 0xa5 5M 64k",
        ],
    );
    let metrics = a.http_get("/metrics");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("strata_provider_encrypted_bytes_total{provider=\"vtbd0.bde\"}"))
        .unwrap_or_else(|| panic!("no encrypted bytes figure: {metrics}"));
    assert!(
        line.ends_with(&format!(" {}", (1 << 20) + (64 << 10) + 512)),
        "each byte written enciphered once: {line}"
    );
    let topo = a.http_get("/geom");
    assert!(topo.contains("\"kdf\":\"pbkdf2-sha512\""), "{topo}");
    // A second passphrase in lock sector 2, then lock sector 0 nuked.
    a.geom(&["gbde setkey -i 10 -n 2 -p second vtbd0"]);
    let last = a.strata("geom", &["gbde nuke -n 1 vtbd0"]);
    assert!(
        !last.ok && last.stderr.contains("not in use"),
        "{}{}",
        last.stdout,
        last.stderr
    );
    a.geom(&["gbde nuke -n 0 vtbd0"]);
    assert!(a.stop().success());
    let raw = std::fs::read(&disk).unwrap();
    assert!(
        !has_sector_of(&raw, 0x5a) && !has_sector_of(&raw, 0xa5) && !has_sector_of(&raw, 0x77),
        "plaintext on the raw disk"
    );

    // The old passphrase no longer opens it: the boot stops, naming the
    // provider and why, and the disk is not written.
    let conf = "gbde attach -k vol vtbd0\nexport nbd vol vtbd0.bde\n";
    let before = std::fs::read(&disk).unwrap();
    let mut start = Start::new(p).disk(disk.display().to_string()).config(conf);
    start.extra.extend(["--secret".to_string(), secret]);
    let e = start.run_to_exit(Duration::from_secs(120));
    assert_ne!(e.code, Some(0));
    let said = format!("{}{}{}", e.stdout, e.stderr, e.console);
    assert!(said.contains("vtbd0: wrong passphrase"), "{said}");
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "a refused attach wrote to the disk"
    );

    // The new one does, with the data.
    let conf = "gbde attach -p second vtbd0\nexport nbd vol vtbd0.bde\n";
    let a = Start::new(p)
        .disk(disk.display().to_string())
        .config(conf)
        .spawn()
        .expect("attach with the new passphrase");
    qemu_io(
        &a.uri("vol"),
        &[
            "read -P 0x5a 0 4096",
            "read -P 0x77 4096 512",
            "read -P 0xa5 5M 64k",
            "read -P 0 6M 4096",
        ],
    );
    assert!(a.stop().success());
}
