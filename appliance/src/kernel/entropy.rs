//! The host's entropy: the virtio-rng device [`drivers::probe_all`]
//! found, kept here after probing so the boot path (or a later reseed)
//! can read from it by a plain call, [`host_entropy`].
//!
//! The device is optional: without one (QEMU given no `virtio-rng-*`)
//! [`host_entropy`] returns 0 and the key generator relies on the CPU's
//! entropy instructions.

use alloc::vec::Vec;
use drivers::{Probed, RngDevice};

/// How long one [`host_entropy`] call waits for the device at most.
pub const TIMEOUT_NS: u64 = 1_000_000_000;

/// The entropy device, once [`keep`] has been given one.
static HOST_RNG: spin::Mutex<Option<HostRng>> = spin::Mutex::new(None);

/// The device, movable into the static.
struct HostRng(Probed<RngDevice>);

// SAFETY: the kernel runs on one CPU and only its main flow (never an
// interrupt handler) touches the device, always through `HOST_RNG`'s
// lock; the virtio-mmio transport is not `Send` only because it holds a
// pointer to its register block, which is identity-mapped for the life
// of the kernel.
unsafe impl Send for HostRng {}

/// Keeps the first entropy device of `rngs` for [`host_entropy`]; any
/// further ones are dropped (reset). Called once, after probing.
pub fn keep(rngs: Vec<Probed<RngDevice>>) {
    let mut it = rngs.into_iter();
    let Some(first) = it.next() else {
        log::info!("entropy: no virtio-rng device");
        return;
    };
    log::info!("{}: {} (virtio-rng)", first.name, first.location);
    for extra in it {
        log::info!(
            "{}: {} not used (one entropy device is enough)",
            extra.name,
            extra.location
        );
    }
    *HOST_RNG.lock() = Some(HostRng(first));
}

/// Fills the front of `out` with entropy from the host's virtio-rng
/// device, waiting at most [`TIMEOUT_NS`]; returns how many bytes it
/// wrote (0 when there is no device or it did not answer in time).
pub fn host_entropy(out: &mut [u8]) -> usize {
    let mut g = HOST_RNG.lock();
    let Some(rng) = g.as_mut() else {
        return 0;
    };
    let n = rng.0.device.read(out, TIMEOUT_NS, &mut super::now_ns);
    if n < out.len() {
        log::warn!(
            "{}: {n} of {} bytes within {} ms",
            rng.0.name,
            out.len(),
            TIMEOUT_NS / 1_000_000
        );
    }
    n
}
