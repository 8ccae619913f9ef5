//! Stopping the machine: QEMU's isa-debug-exit device, and the halt loop
//! used when there is no such device.
//!
//! isa-debug-exit (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`) makes
//! QEMU exit with status `(v << 1) | 1` when the guest writes `v` to its
//! port. The host tool reads status 33 as a clean shutdown and anything
//! else as a failure.

use x86_64::instructions::port::Port;

/// I/O port of QEMU's isa-debug-exit device.
pub const DEBUG_EXIT_PORT: u16 = 0xF4;
/// Value written for a clean shutdown: QEMU exits with status 33.
pub const EXIT_SUCCESS_VALUE: u32 = 0x10;
/// Host exit status that [`EXIT_SUCCESS_VALUE`] produces.
pub const EXIT_SUCCESS_STATUS: i32 = 33;
/// Value written on failure (panic, exception): QEMU exits with status 35.
pub const EXIT_FAILURE_VALUE: u32 = 0x11;
/// Host exit status that [`EXIT_FAILURE_VALUE`] produces.
pub const EXIT_FAILURE_STATUS: i32 = 35;

/// Stops QEMU: status 33 if `success`, 35 otherwise. Without an
/// isa-debug-exit device the CPU halts forever with interrupts off.
pub fn exit_qemu(success: bool) -> ! {
    let value = if success {
        EXIT_SUCCESS_VALUE
    } else {
        EXIT_FAILURE_VALUE
    };
    // SAFETY: port 0xF4 is isa-debug-exit under QEMU; elsewhere it is an
    // unused port and the write has no effect.
    unsafe { Port::<u32>::new(DEBUG_EXIT_PORT).write(value) };
    halt_forever()
}

/// Disables interrupts and halts for good.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Reports a panic on the console (bypassing a held console lock) and
/// stops QEMU with the failure status. For the kernel's `#[panic_handler]`.
pub fn panic_report(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::fmt::Write;
    x86_64::instructions::interrupts::disable();
    let mut c = super::serial::EmergencyConsole;
    let _ = write!(c, "\nstrata: PANIC");
    if let Some(loc) = info.location() {
        let _ = write!(c, " at {}:{}:{}", loc.file(), loc.line(), loc.column());
    }
    let _ = writeln!(c, ": {}", info.message());
    exit_qemu(false)
}
