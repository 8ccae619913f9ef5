//! Memory scenarios for both platforms: many clients whose requests
//! together want far more memory than the appliance has, management
//! connections that send nothing, memory disks larger than the memory.

use crate::nbd_clients::{noise, tcp, RawNbd, READ, WRITE};
use crate::{Platform, Start, TempDir};
use std::io::Read;
use std::time::{Duration, Instant};

/// Clients in the flood.
const FLOOD_CLIENTS: usize = 24;
/// Writes each flood client sends before it reads a reply.
const FLOOD_WRITES: usize = 3;
/// Bytes of each flood write (the largest payload NBD accepts).
const FLOOD_WRITE: u32 = 32 << 20;

fn flood_offset(client: usize, k: usize) -> u64 {
    ((client * FLOOD_WRITES + k) as u64) * u64::from(FLOOD_WRITE)
}

fn flood_seed(client: usize, k: usize) -> u64 {
    0xf100d + (client * FLOOD_WRITES + k) as u64
}

/// Twenty-four clients, all started together, each pipeline three 32 MiB
/// writes (2.25 GiB in all, several times the appliance's memory in
/// QEMU) and then read their replies. The appliance keeps serving
/// throughout (a 25th client's reads and `GET /status` are answered
/// while the writes are in), every write succeeds, reading back returns
/// what was written, and nothing panics. `extra` goes to `strata`
/// (hosted runs it with a small payload budget).
pub fn flood(p: Platform, extra: &[&str]) {
    let dir = TempDir::new("flood");
    let disk_bytes = flood_offset(FLOOD_CLIENTS, 0) + (64 << 20);
    let mut start = Start::new(p).disk(format!(
        "{},size={}M",
        dir.path("d0.img").display(),
        disk_bytes >> 20
    ));
    start.extra.extend(extra.iter().map(|s| s.to_string()));
    let a = start.spawn().expect("start");
    let port = a.nbd_port;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(FLOOD_CLIENTS + 1));
    let writers: Vec<_> = (0..FLOOD_CLIENTS)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = RawNbd::connect(port, "vtbd0", false)
                    .unwrap_or_else(|e| panic!("client {i}: handshake: {e}"));
                // Replies may wait behind every other client's writes.
                c.s.set_read_timeout(Some(Duration::from_secs(600)))
                    .unwrap();
                barrier.wait();
                for k in 0..FLOOD_WRITES {
                    let data = noise(FLOOD_WRITE as usize, flood_seed(i, k));
                    c.send(WRITE, 0, k as u64, flood_offset(i, k), FLOOD_WRITE, &data);
                }
                let mut seen = Vec::new();
                for _ in 0..FLOOD_WRITES {
                    let r = c
                        .recv()
                        .unwrap_or_else(|e| panic!("client {i}: write reply: {e}"));
                    assert_eq!(r.error, 0, "client {i}: write {} failed", r.cookie);
                    seen.push(r.cookie);
                }
                seen.sort_unstable();
                assert_eq!(seen, [0, 1, 2], "client {i}: one reply per write");
                c
            })
        })
        .collect();
    let mut probe = RawNbd::connect(port, "vtbd0", false).expect("probe client");
    probe
        .s
        .set_read_timeout(Some(Duration::from_secs(600)))
        .unwrap();
    barrier.wait();
    // The appliance serves while the flood is in: a small read and the
    // management endpoint, over and over until every writer is done.
    let mut probes = 0;
    let console = |a: &crate::Appliance| {
        std::fs::read_to_string(&a.log).unwrap_or_default()
            + &std::fs::read_to_string(a.log.with_extension("stderr")).unwrap_or_default()
    };
    while writers.iter().any(|w| !w.is_finished()) {
        probe.send(READ, 0, 1, flood_offset(FLOOD_CLIENTS, 0), 4096, &[]);
        match probe.recv() {
            Ok(r) => assert_eq!(
                (r.error, r.data.len()),
                (0, 4096),
                "a read during the flood"
            ),
            Err(e) => panic!("a read during the flood: {e}; console:\n{}", console(&a)),
        }
        let status = a.status();
        assert!(status["exports"].is_array(), "{status}");
        probes += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let conns: Vec<RawNbd> = writers
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.join()
                .unwrap_or_else(|_| panic!("client {i} failed; console:\n{}", console(&a)))
        })
        .collect();
    eprintln!("flood: {probes} probes answered while the writes were in");
    let metrics = a.http_get("/metrics");
    for l in metrics.lines() {
        if l.starts_with("strata_payload_") {
            eprintln!("flood: {l}");
        }
    }
    for m in [
        "strata_payload_budget_bytes ",
        "strata_payload_in_use_bytes ",
        "strata_payload_waits_total ",
    ] {
        assert!(metrics.contains(m), "no {m:?} in /metrics:\n{metrics}");
    }
    let status = a.status();
    let budget = &status["memory"]["payload_budget_bytes"];
    assert!(budget.as_u64().is_some_and(|b| b > 0), "{status}");
    // Every client reads back its own writes (the clients read in
    // parallel, each on its own connection).
    let readers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            std::thread::spawn(move || {
                for k in 0..FLOOD_WRITES {
                    c.send(READ, 0, 9, flood_offset(i, k), FLOOD_WRITE, &[]);
                    let r = c.recv().expect("read reply");
                    assert_eq!(r.error, 0, "client {i}: read {k}");
                    assert!(
                        r.data == noise(FLOOD_WRITE as usize, flood_seed(i, k)),
                        "client {i}: write {k} reads back"
                    );
                }
                c.disconnect();
            })
        })
        .collect();
    for (i, t) in readers.into_iter().enumerate() {
        t.join()
            .unwrap_or_else(|_| panic!("client {i}: read back failed"));
    }
    probe.disconnect();
    let log = console(&a);
    assert!(!log.contains("PANIC"), "the appliance panicked:\n{log}");
    assert!(a.stop().success(), "a clean stop after the flood");
}

/// True if the peer closed `s` within `limit`, having sent nothing or a
/// `408 Request Timeout`.
fn timed_out_by_peer(s: &mut std::net::TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => got.is_empty() || got.starts_with(b"HTTP/1.1 408 "),
        Err(e) => {
            got.is_empty()
                && matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                )
        }
    }
}

/// A management connection that sends nothing, and one that sends half
/// a request, lose their slots once the request timeout (set short with
/// `timeout_arg`) passes: with every slot taken by such clients, the
/// server closes them, and a request on a fresh connection is answered.
/// `/metrics` counts the timeouts.
pub fn http_request_timeout(p: Platform, timeout_arg: &[&str]) {
    let mut start = Start::new(p);
    start
        .extra
        .extend(timeout_arg.iter().map(|s| s.to_string()));
    let a = start.spawn().expect("start");
    let limit = crate::nbd_clients::HTTP_CONNECTION_LIMIT;
    let mut idle: Vec<std::net::TcpStream> = (0..limit).map(|_| tcp(a.http_port)).collect();
    use std::io::Write;
    write!(idle[0], "GET /status HTTP/1.1\r\nHo").unwrap();
    let t = Instant::now();
    for (i, s) in idle.iter_mut().enumerate() {
        assert!(
            timed_out_by_peer(s, Duration::from_secs(60)),
            "idle management client {i} is closed by the server"
        );
    }
    eprintln!("idle management clients closed after {:?}", t.elapsed());
    let (code, body) = crate::http_request(a.http_port, "GET", "/metrics", "");
    assert_eq!(code, 200, "{body}");
    let timeouts = body
        .lines()
        .find_map(|l| l.strip_prefix("strata_http_timeouts_total "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(
        timeouts.is_some_and(|n| n >= limit as u64),
        "timeouts counted: {body}"
    );
}

/// `md create` with a size beyond the memory the appliance can give memory
/// disks is refused with an error that says so, through `POST /geom`
/// (and `strata geom`); a size that fits is created.
pub fn md_too_large(p: Platform, extra: &[&str]) {
    let mut start = Start::new(p);
    start.extra.extend(extra.iter().map(|s| s.to_string()));
    let a = start.spawn().expect("start");
    let (code, body) = a.http_post("/geom", "md create -s 1t big");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("memory"), "the error names memory: {body}");
    let o = a.strata("geom", &["md create -s 1t big"]);
    assert!(!o.ok, "strata geom refuses it");
    assert!(o.stderr.contains("memory"), "{}", o.stderr);
    let status = a.status();
    let md = &status["memory"]["md_limit_bytes"];
    assert!(md.as_u64().is_some_and(|b| b > 0), "{status}");
    a.geom(&["md create -s 16m small"]);
    assert!(
        a.http_get("/geom").contains("\"small\""),
        "a memory disk that fits is created"
    );
}
