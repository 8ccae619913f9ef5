//! Boot variants of the appliance in QEMU (TCG): the microvm machine with
//! virtio-mmio devices, and DHCP instead of the static address. Both need
//! QEMU: they exercise the kernel's device discovery and network set-up.

use strata_tests::{qemu_io, Platform, Start, TempDir};

#[test]
fn microvm_serves_virtio_mmio_disks() {
    let dir = TempDir::new("microvm");
    let mut s = Start::new(Platform::Qemu)
        .disk(format!("{},size=16M", dir.path("a.img").display()))
        .disk(format!("{},size=8M", dir.path("b.img").display()));
    s.extra = vec!["--machine".into(), "microvm".into()];
    let a = s.spawn().expect("microvm boots and serves");
    assert_eq!(a.ready, vec![a.uri("vtbd0"), a.uri("vtbd1")]);
    qemu_io(
        &a.uri("vtbd0"),
        &["write -P 0x3c 0 256k", "read -P 0x3c 0 256k"],
    );
    qemu_io(
        &a.uri("vtbd1"),
        &["write -P 0x4d 4k 4k", "read -P 0x4d 4k 4k"],
    );
    let st = a.http_get("/status");
    assert!(
        st.contains("\"size_bytes\":16777216") && st.contains("\"size_bytes\":8388608"),
        "{st}"
    );
}

#[test]
fn dhcp_configures_the_nic() {
    let a = Start::new(Platform::Qemu)
        .config("net dhcp\nmd create -s 8m md0\nexport nbd m md0\n")
        .spawn()
        .expect("boots with DHCP");
    qemu_io(&a.uri("m"), &["write -P 0x21 0 64k", "read -P 0x21 0 64k"]);
    let log = std::fs::read_to_string(&a.log).unwrap_or_default();
    assert!(log.contains("dhcp: address 10.0.2.15"), "console: {log}");
}
