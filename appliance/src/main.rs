//! Kernel entry: `kernel_start` brings the platform up in order, runs the
//! self-tests the command line asks for, and hands over to the appliance
//! (`appliance::kernel::serve::serve`).
//!
//! On the host this binary is only a stub: the kernel is built with
//! `cargo build --release -p appliance --bin strata-kernel --target
//! x86_64-unknown-none` and booted with `qemu-system-x86_64 -kernel`.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![deny(unsafe_code)]

#[cfg(not(target_os = "none"))]
fn main() {
    println!(
        "strata-kernel is the Strata unikernel image: build it for \
         x86_64-unknown-none and boot it with qemu-system-x86_64 -kernel"
    );
}

#[cfg(target_os = "none")]
#[allow(unsafe_code, reason = "the kernel's entry point and panic handler")]
mod entry {
    use appliance::kernel::start_info::StartInfo;
    use appliance::kernel::{
        self, acpi, apic, exit, gdt, interrupts, logger, mem, paging, selftest, serial, time,
        BootInfo,
    };

    /// Called by the PVH boot code in 64-bit mode with the physical address
    /// of `hvm_start_info` (from `%ebx` at entry).
    #[unsafe(no_mangle)]
    pub extern "C" fn kernel_start(start_info_paddr: u64) -> ! {
        time::mark_entry();
        serial::init();
        let info = match StartInfo::parse(start_info_paddr) {
            Ok(info) => info,
            Err(e) => {
                serial::emergency_write("strata: not booted through PVH (bad hvm_start_info)\n");
                let _ = e;
                exit::exit_qemu(false)
            }
        };
        logger::init(logger::level_from_cmdline(info.cmdline));
        let selectors = gdt::init();
        interrupts::init(selectors.code.0);
        log::info!("strata: boot");

        let rsdp = acpi::init(info.rsdp_paddr);
        let memory = mem::init(&info);
        // Unmap page 0 (null guard) unless data still referenced after
        // parsing (command lines, modules) lies there; the start info, the
        // module list and the memory map were copied by `parse`.
        let in_page0 = |a: u64| a != 0 && a < 4096;
        let page0_used = in_page0(info.cmdline_paddr)
            || info
                .modules()
                .any(|m| in_page0(m.paddr) || in_page0(m.cmdline_paddr));
        for (s, e) in info.reserved_ranges().into_iter().flatten() {
            log::debug!("loader data: {s:#x}-{e:#x}");
        }
        paging::init(page0_used);
        log_memory(&info, &memory);

        let source = time::init(info.cmdline);
        apic::init();
        interrupts::enable();
        let hz = time::tsc_hz();
        log::info!(
            "time: TSC {}.{:03} MHz ({}), LAPIC timer {}.{:03} MHz, {} I/O APIC inputs",
            hz / 1_000_000,
            (hz / 1000) % 1000,
            source.name(),
            apic::timer_hz() / 1_000_000,
            (apic::timer_hz() / 1000) % 1000,
            apic::gsi_count()
        );

        let machine = kernel::detect_machine(info.cmdline);
        let config = info.initrd();
        log::info!("cmdline: \"{}\"", info.cmdline);
        match config {
            Some(c) => log::info!("config: module 0, {} bytes", c.len()),
            None => log::info!("config: none (no -initrd module)"),
        }
        log::info!("machine: {}, ACPI RSDP at {:#x}", machine.name(), rsdp);

        selftest::run(info.cmdline);

        kernel::serve::serve(BootInfo {
            cmdline: info.cmdline,
            config,
            rsdp,
            machine,
            tsc_hz: hz,
            memory,
        })
    }

    fn log_memory(info: &StartInfo, memory: &mem::MemorySummary) {
        for e in info.memory_map() {
            log::debug!(
                "memmap: {:#012x}-{:#012x} type {}",
                e.addr,
                e.addr.saturating_add(e.size),
                e.kind
            );
        }
        let stats = mem::memory_stats();
        log::info!(
            "memory: {} MiB RAM in {} map entries (top {:#x}), {} MiB usable in {} ranges, kernel image {} KiB",
            memory.ram_bytes >> 20,
            info.memmap_len,
            memory.ram_end,
            memory.usable_bytes >> 20,
            memory.regions,
            stats.kernel_bytes >> 10
        );
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
        exit::panic_report(info)
    }
}
