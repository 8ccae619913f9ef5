//! `/status` lists iSCSI sessions while they are logged in, and
//! `/metrics` counts each LUN's requests, through a real initiator
//! (QEMU's iscsi driver) against hosted Strata.

use std::process::{Command, Stdio};
use std::time::Duration;
use strata_tests::iscsi_clients::start_strata;
use strata_tests::{wait_for, Platform};

/// The value of the `/metrics` line that starts with `key`.
fn metric(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn sessions_and_lun_counters_are_reported() {
    let config = "md create -s 16m md0\n\
                  md create -s 16m md1\n\
                  export iscsi iqn.2026-12.org.strata:status md0\n\
                  export iscsi iqn.2026-12.org.strata:status md1 lun 1\n";
    let (a, luns) = start_strata(Platform::Hosted, config).expect("start hosted");
    let lun1 = luns
        .iter()
        .find(|l| l.lun == 1)
        .expect("a ready line for LUN 1");
    assert!(a.status()["sessions"]
        .as_array()
        .is_some_and(|s| s.is_empty()));
    // A client that writes 1 MiB to LUN 1, then stays logged in a while.
    // (Killed below; its own sleep bounds it otherwise.)
    let mut client = Command::new("qemu-io")
        .args(["-f", "raw", &lun1.url()])
        .args(["-c", "write -P 0x61 0 1M", "-c", "sleep 30000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run qemu-io");
    let sessions = wait_for("the session in /status", Duration::from_secs(20), || {
        let s = a.status()["sessions"].clone();
        s.as_array().filter(|v| !v.is_empty()).cloned()
    });
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0]["protocol"], "iscsi");
    assert_eq!(sessions[0]["export"], "iqn.2026-12.org.strata:status");
    assert!(sessions[0]["client"]
        .as_str()
        .is_some_and(|c| c.starts_with("iqn.")));
    assert!(sessions[0]["session"]
        .as_str()
        .is_some_and(|s| s.contains("tsih")));
    let key = |what: &str, lun: u32| {
        format!(
            "strata_export_{what}_total{{protocol=\"iscsi\",export=\"iqn.2026-12.org.strata:status/{lun}\"}}"
        )
    };
    let written = wait_for("LUN 1's written bytes", Duration::from_secs(20), || {
        let m = a.http_get("/metrics");
        metric(&m, &key("written_bytes", 1)).filter(|&n| n >= 1 << 20)
    });
    assert_eq!(written, 1 << 20, "exactly the megabyte written");
    let m = a.http_get("/metrics");
    assert_eq!(
        metric(&m, &key("written_bytes", 0)),
        Some(0),
        "LUN 0 untouched"
    );
    assert!(metric(&m, &key("writes", 1)).is_some_and(|n| n >= 1));
    let _ = client.kill();
    let _ = client.wait();
    wait_for(
        "the session gone from /status",
        Duration::from_secs(20),
        || {
            a.status()["sessions"]
                .as_array()
                .filter(|s| s.is_empty())
                .map(|_| ())
        },
    );
    a.stop();
}
