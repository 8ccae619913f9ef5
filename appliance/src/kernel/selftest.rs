//! Boot-time self-tests of the platform, chosen on the command line with
//! `strata.selftest=NAME[,NAME...]`. They check in the real machine what
//! host tests cannot: sleeping with `hlt`, the heap over the memory map,
//! and that faults and panics are reported and stop QEMU with status 35.
//!
//! - `idle`: `idle_wait` with deadlines sleeps about as long as asked;
//! - `heap`: large and page-aligned allocations, growth into more ranges;
//! - `pagefault`: writes through a null pointer (expects the fault report);
//! - `ud`: executes `ud2` (expects the invalid-opcode report);
//! - `stackoverflow`: recurses until the boot stack's guard page (expects
//!   the double-fault report, taken on its own IST stack);
//! - `panic`: panics (expects the panic report).
//!
//! Passing tests log `selftest NAME: ok`; a failing check panics.

use alloc::vec::Vec;

use super::{interrupts, mem, time};

/// Runs the self-tests the command line asks for (none by default).
pub fn run(cmdline: &str) {
    let Some(list) = cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("strata.selftest="))
    else {
        return;
    };
    for name in list.split(',') {
        match name {
            "idle" => idle(),
            "heap" => heap(),
            "pagefault" => page_fault(),
            "ud" => invalid_opcode(),
            "stackoverflow" => stack_overflow(),
            "panic" => panic!("selftest panic requested"),
            other => log::warn!("selftest {other}: unknown"),
        }
    }
}

fn idle() {
    for want_ms in [1u64, 10, 50] {
        let before = interrupts::irq_stats();
        let start = time::now_ns();
        let deadline = start + want_ms * 1_000_000;
        let mut wakeups = 0;
        while time::now_ns() < deadline {
            interrupts::idle_wait(Some(deadline));
            wakeups += 1;
        }
        let took = time::now_ns() - start;
        let after = interrupts::irq_stats();
        let slept = after.sleep_ns - before.sleep_ns;
        log::info!(
            "selftest idle: asked {} ms, took {} us, halted {} us, {} wake-ups, {} timer irqs",
            want_ms,
            took / 1000,
            slept / 1000,
            wakeups,
            after.timer_irqs - before.timer_irqs
        );
        assert!(took >= want_ms * 1_000_000, "woke before the deadline");
        assert!(slept * 2 >= took, "idle_wait did not halt");
    }
    log::info!("selftest idle: ok");
}

fn heap() {
    let before = mem::memory_stats();
    let mut v: Vec<u64> = Vec::new();
    for i in 0..100_000u64 {
        v.push(i);
    }
    assert_eq!(v.iter().sum::<u64>(), 100_000 * 99_999 / 2);
    let f = mem::alloc_frames(16).expect("16 frames");
    assert_eq!(f % 4096, 0);
    // SAFETY: fresh frames from alloc_frames(16), not used afterwards.
    unsafe { mem::free_frames(f, 16) };
    // Take most of the usable memory in 8 MiB pieces, which makes the heap
    // claim every usable range, then give it back.
    let chunk = 8 << 20;
    let mut big: Vec<Vec<u8>> = Vec::new();
    while (mem::memory_stats().used_bytes + 2 * chunk as u64) < before.total_bytes * 3 / 4 {
        let mut b = Vec::new();
        if b.try_reserve_exact(chunk).is_err() {
            break;
        }
        b.resize(chunk, 0xA5);
        big.push(b);
    }
    let peak = mem::memory_stats();
    let held = big.len() * chunk;
    drop(big);
    drop(v);
    let after = mem::memory_stats();
    log::info!(
        "selftest heap: held {} MiB at peak, claimed {} of {} MiB usable, used {} KiB -> {} KiB",
        held >> 20,
        peak.heap_claimed_bytes >> 20,
        peak.total_bytes >> 20,
        before.used_bytes >> 10,
        after.used_bytes >> 10
    );
    assert!(
        held as u64 >= before.total_bytes / 2,
        "heap did not grow over RAM"
    );
    assert_eq!(after.used_bytes, before.used_bytes);
    log::info!("selftest heap: ok");
}

fn page_fault() {
    log::info!("selftest pagefault: writing through a null pointer");
    // SAFETY: deliberately unsound: the write must fault (page 0 is not
    // mapped), and the fault handler stops the machine.
    unsafe { core::ptr::write_volatile(core::ptr::null_mut::<u64>(), 1) };
    panic!("selftest pagefault: the write did not fault");
}

fn invalid_opcode() {
    log::info!("selftest ud: executing ud2");
    // SAFETY: raises #UD; the handler stops the machine.
    unsafe { core::arch::asm!("ud2") };
    panic!("selftest ud: ud2 returned");
}

#[inline(never)]
fn recurse(depth: u64) -> u64 {
    if depth == u64::MAX {
        return 0;
    }
    let frame = core::hint::black_box([depth; 512]);
    recurse(depth + 1).wrapping_add(frame[(depth % 512) as usize])
}

fn stack_overflow() {
    log::info!("selftest stackoverflow: recursing");
    let r = recurse(0);
    panic!("selftest stackoverflow: recursion returned {r}");
}
