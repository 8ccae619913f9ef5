//! Persistent reservations with APTPL survive a restart of the appliance
//! when the LUN keeps its state (`aptpl PROVIDER`), through libiscsi's
//! PERSISTENT RESERVE commands (tests/c/iscsi-pr.c), hosted and in QEMU.
//! The appliance is killed, not stopped, between runs.

use strata_tests::iscsi_clients::{pr, Lun};
use strata_tests::{Appliance, Platform, Start, TempDir};

const IQN: &str = "iqn.2026-12.org.strata:pr";

/// LUN 0 keeps its reservations on vtbd1; LUN 1 keeps none.
const CONFIG: &str = "export iscsi iqn.2026-12.org.strata:pr vtbd0 aptpl vtbd1\n\
                      export iscsi iqn.2026-12.org.strata:pr vtbd2 lun 1\n";

fn start(p: Platform, dir: &TempDir, config: &str) -> Result<(Appliance, [String; 2]), String> {
    let a = Start::new(p)
        .config(config)
        .disk(format!("{},size=16M", dir.path("d0.img").display()))
        .disk(format!("{},size=128K", dir.path("state.img").display()))
        .disk(format!("{},size=16M", dir.path("d2.img").display()))
        .spawn()?;
    let url = |lun| {
        a.ready
            .iter()
            .filter_map(|u| Lun::parse(u))
            .find(|l| l.iqn == IQN && l.lun == lun)
            .map(|l| l.url())
            .unwrap_or_else(|| panic!("no ready line for LUN {lun}: {:?}", a.ready))
    };
    let urls = [url(0), url(1)];
    Ok((a, urls))
}

/// READ KEYS: the keys, without the generation line.
fn keys(url: &str) -> Vec<String> {
    let mut k = pr(url, &["keys"]).expect("READ KEYS");
    assert!(k.first().is_some_and(|l| l.starts_with("generation ")));
    k.remove(0);
    k.sort();
    k
}

fn reservation(url: &str) -> String {
    pr(url, &["reservation"])
        .expect("READ RESERVATION")
        .join(" ")
}

fn survives_a_restart(p: Platform) {
    let dir = TempDir::new("pr");
    let (a, [lu0, lu1]) = start(p, &dir, CONFIG).expect("start");
    assert_eq!(pr(&lu0, &["caps"]).unwrap(), ["ptpl_c=1"]);
    assert_eq!(pr(&lu1, &["caps"]).unwrap(), ["ptpl_c=0"]);
    // LUN 1 keeps nothing: APTPL is refused (ILLEGAL REQUEST, INVALID
    // FIELD IN PARAMETER LIST), a registration without it is taken.
    assert_eq!(
        pr(&lu1, &["register", "123", "aptpl"]),
        Err("status 2 sense 5/2600".into())
    );
    assert!(
        keys(&lu1).is_empty(),
        "the refused APTPL registered nothing"
    );
    pr(&lu1, &["register", "123"]).unwrap();
    assert_eq!(keys(&lu1), ["123"]);
    // LUN 0: a reservation and a second registration, with APTPL.
    pr(&lu0, &["reserve", "abc", "1", "aptpl"]).unwrap();
    pr(&lu0, &["register", "def", "aptpl"]).unwrap();
    assert_eq!(keys(&lu0), ["abc", "def"]);
    assert_eq!(reservation(&lu0), "abc 1");
    drop(a);

    let (a, [lu0, lu1]) = start(p, &dir, CONFIG).expect("restart");
    assert_eq!(keys(&lu0), ["abc", "def"], "APTPL registrations kept");
    assert_eq!(reservation(&lu0), "abc 1", "APTPL reservation kept");
    assert!(keys(&lu1).is_empty(), "LUN 1 forgot its registration");
    // The reservation is enforced after the restart too: a nexus that is
    // not registered cannot take another one.
    assert_eq!(
        pr(&lu0, &["reserve", "999", "3"]),
        Err("status 24 sense 0/0000".into()),
        "RESERVATION CONFLICT"
    );
    // A registration without APTPL: the LU's state no longer persists.
    let after_conflict = keys(&lu0);
    assert!(after_conflict.contains(&"999".to_string()));
    pr(&lu0, &["register", "777"]).unwrap();
    drop(a);

    let (a, [lu0, _]) = start(p, &dir, CONFIG).expect("restart again");
    assert!(keys(&lu0).is_empty(), "APTPL cleared: nothing kept");
    assert_eq!(reservation(&lu0), "none");
    drop(a);
}

#[test]
fn aptpl_reservations_survive_a_restart_hosted() {
    survives_a_restart(Platform::Hosted);
}

#[test]
fn aptpl_reservations_survive_a_restart_in_qemu() {
    survives_a_restart(Platform::Qemu);
}

/// A state provider holding something else is refused at boot, with a
/// message naming it, and left as it was.
#[test]
fn a_state_provider_with_data_on_it_is_refused() {
    let dir = TempDir::new("pr-foreign");
    let state = dir.path("state.img");
    let junk: Vec<u8> = (0..128u32 << 10).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&state, &junk).unwrap();
    let err = match start(Platform::Hosted, &dir, CONFIG) {
        Ok(_) => panic!("a state store over data was taken"),
        Err(e) => e,
    };
    assert!(
        err.contains("vtbd1") && err.contains("not a Strata state store"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&state).unwrap(),
        junk,
        "the provider unchanged"
    );
    // Too small a provider is refused too.
    let small = "md create -s 64k md9\n\
                 export iscsi iqn.2026-12.org.strata:pr vtbd0 aptpl md9\n";
    let err = match start(Platform::Hosted, &dir, small) {
        Ok(_) => panic!("a 64 KiB state store was taken"),
        Err(e) => e,
    };
    assert!(err.contains("md9") && err.contains("128 KiB"), "{err}");
}
