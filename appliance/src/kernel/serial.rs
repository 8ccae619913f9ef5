//! COM1 serial console (16550 UART at I/O port 0x3F8): the kernel's only
//! output, used by the logger, by fault reports and by the panic handler.
//!
//! Normal output goes through a spin lock. Fault paths (exceptions, panic)
//! use [`emergency_write`], which takes the lock if it can and otherwise
//! writes anyway: a report interleaved with a half-written line is better
//! than a dead lock with no report.

use core::fmt;
use spin::Mutex;
use uart_16550::backend::PioBackend;
use uart_16550::{Config, Uart16550};

/// I/O port base of COM1.
pub const COM1_PORT: u16 = 0x3F8;

static CONSOLE: Mutex<Option<Uart16550<PioBackend>>> = Mutex::new(None);

/// Initialises COM1 at 115200 8N1. Safe to call more than once.
pub fn init() {
    // SAFETY: 0x3F8..0x3FF is COM1 on every PC-compatible machine QEMU
    // models (q35, pc, microvm's isa-serial); this module is its only user.
    let Ok(mut uart) = (unsafe { Uart16550::new_port(COM1_PORT) }) else {
        return;
    };
    let config = Config {
        baud_rate: uart_16550::BaudRate::Baud115200,
        ..Config::DEFAULT
    };
    // A machine without COM1 simply has no console.
    if uart.init(config).is_ok() {
        *CONSOLE.lock() = Some(uart);
    }
}

fn write_to(uart: &mut Uart16550<PioBackend>, s: &str) {
    uart.send_bytes_exact(s.as_bytes());
}

/// Writes `s` to the serial console (nothing happens before [`init`]).
pub fn console_write(s: &str) {
    if let Some(uart) = CONSOLE.lock().as_mut() {
        write_to(uart, s);
    }
}

/// Writes `s` even if the console lock is held (fault and panic paths).
pub fn emergency_write(s: &str) {
    if let Some(mut guard) = CONSOLE.try_lock() {
        if let Some(uart) = guard.as_mut() {
            write_to(uart, s);
        }
        return;
    }
    // The lock is held by the code that faulted. Write around it with a
    // fresh handle on the same (already initialised) UART.
    // SAFETY: COM1 exists (the lock is only ever held with an initialised
    // UART inside), and the holder of the lock will never run again: we
    // are on the way to stopping the machine.
    if let Ok(mut uart) = unsafe { Uart16550::new_port(COM1_PORT) } {
        write_to(&mut uart, s);
    }
}

/// `fmt::Write` adapter over [`console_write`].
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        console_write(s);
        Ok(())
    }
}

/// `fmt::Write` adapter over [`emergency_write`].
pub struct EmergencyConsole;

impl fmt::Write for EmergencyConsole {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        emergency_write(s);
        Ok(())
    }
}
