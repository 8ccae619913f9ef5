//! The kernel's boot-time self-tests (`strata.selftest=NAME[,NAME...]` on
//! the kernel command line, passed with `strata run --kernel-arg`). They
//! need QEMU: they check what only the booted kernel does — sleeping with
//! `hlt`, the heap over the memory map, and that faults and panics are
//! reported on the console and stop QEMU with the failure status (35),
//! which `strata run` turns into its exit code 1.

use std::time::Duration;
use strata_tests::{Exited, Platform, Start};

/// How long a boot that ends by itself may take (it takes about a second).
const LIMIT: Duration = Duration::from_secs(30);

/// Boots with `strata.selftest=name` and waits for the tool to exit.
fn boot_with(name: &str) -> Exited {
    let mut s = Start::new(Platform::Qemu).kernel_arg(format!("strata.selftest={name}"));
    s.extra.extend(["--memory".into(), "64".into()]);
    s.run_to_exit(LIMIT)
}

/// The run ended with the appliance's failure: the tool exits with 1 and
/// says the guest wrote the failure value (0x11, QEMU status 35) after
/// printing `fatal`; the boot never got as far as serving.
fn assert_failed_with(e: &Exited, fatal: &str) {
    let all = format!("{e:#?}");
    assert_eq!(e.code, Some(1), "{all}");
    assert!(
        e.stderr
            .contains(&format!("strata: appliance failed: {fatal}")),
        "{all}"
    );
    assert!(
        e.stderr
            .contains("(the appliance stopped with failure code 0x11)"),
        "{all}"
    );
    assert!(e.stdout.is_empty(), "{all}");
    assert!(!e.console.contains("strata: listening"), "{all}");
}

#[test]
fn idle_and_heap_pass_and_the_boot_goes_on() {
    let mut s = Start::new(Platform::Qemu).kernel_arg("strata.selftest=idle,heap");
    s.extra.extend(["--memory".into(), "128".into()]);
    let a = s.spawn().expect("boots after the self-tests and serves");
    assert_eq!(a.ready, vec![a.uri("md0")]);
    let console = std::fs::read_to_string(&a.log).unwrap_or_default();
    for want in [
        "selftest idle: asked 1 ms",
        "selftest idle: asked 50 ms",
        "selftest idle: ok",
        "selftest heap: held ",
        "selftest heap: ok",
    ] {
        assert!(console.contains(want), "no {want:?} in console: {console}");
    }
    assert!(
        console.find("selftest heap: ok") < console.find("strata: listening"),
        "{console}"
    );
    assert!(a.stop().success());
}

#[test]
fn page_fault_is_reported_and_fails_the_run() {
    let e = boot_with("pagefault");
    assert!(
        e.console
            .contains("selftest pagefault: writing through a null pointer"),
        "{e:#?}"
    );
    assert_failed_with(&e, "EXCEPTION page fault (#PF) (vector 14)");
    assert!(e.console.contains("cr2=0x0000000000000000"), "{e:#?}");
}

#[test]
fn invalid_opcode_is_reported_and_fails_the_run() {
    let e = boot_with("ud");
    assert!(e.console.contains("selftest ud: executing ud2"), "{e:#?}");
    assert_failed_with(&e, "EXCEPTION invalid opcode (#UD) (vector 6)");
}

#[test]
fn stack_overflow_hits_the_guard_page_and_fails_the_run() {
    // The page fault on the guard page cannot push its frame on the dead
    // stack: the CPU raises a double fault, taken on its own IST stack.
    // Without it QEMU would see a triple fault and stop with status 0.
    let e = boot_with("stackoverflow");
    assert!(
        e.console.contains("selftest stackoverflow: recursing"),
        "{e:#?}"
    );
    assert_failed_with(&e, "EXCEPTION double fault (#DF) (vector 8)");
}

#[test]
fn panic_is_reported_and_fails_the_run() {
    let e = boot_with("panic");
    assert_failed_with(&e, "PANIC at appliance/src/kernel/selftest.rs:");
    assert!(e.console.contains(": selftest panic requested"), "{e:#?}");
}
