//! Pieces shared by the virtio drivers: device-independent feature bits,
//! the initialisation handshake (virtio 1.2 §3.1.1) and init errors.
//!
//! virtio-drivers' `Transport::begin_init` neither waits for the reset to
//! finish nor checks that the device kept FEATURES_OK, which §3.1.1 step 6
//! requires; [`negotiate`] does both.

use virtio_drivers::transport::{DeviceStatus, Transport};

/// VIRTIO_F_RING_INDIRECT_DESC (virtio 1.2 §6): indirect descriptor tables.
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_F_RING_EVENT_IDX (virtio 1.2 §6): used/avail event suppression.
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
/// VIRTIO_F_ANY_LAYOUT (virtio 1.2 §2.7.4.3, legacy): any descriptor layout.
pub const F_ANY_LAYOUT: u64 = 1 << 27;
/// VIRTIO_F_VERSION_1 (virtio 1.2 §6): a modern (non-legacy) device.
pub const F_VERSION_1: u64 = 1 << 32;

/// Why a virtio device could not be brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitError {
    /// The transport is for another kind of device.
    WrongDeviceType,
    /// The device cleared FEATURES_OK: it refused the feature set
    /// (virtio 1.2 §3.1.1 step 6).
    FeaturesRejected,
    /// The device is modern-only and lacks something the driver needs.
    MissingFeature(&'static str),
    /// A virtqueue could not be set up (too small, already in use, no memory).
    Queue(virtio_drivers::Error),
    /// The device configuration space could not be read.
    Config(virtio_drivers::Error),
    /// Memory for buffers could not be allocated.
    NoMemory,
}

/// The features to accept: those the device offers that the driver wants.
///
/// A device that offers VERSION_1 must get it back (virtio 1.2 §6.1), so
/// it is always accepted when offered.
pub fn select_features(device: u64, wanted: u64) -> u64 {
    (device & wanted) | (device & F_VERSION_1)
}

/// Runs the device initialisation sequence of virtio 1.2 §3.1.1 up to and
/// including FEATURES_OK: reset, ACKNOWLEDGE, DRIVER, feature negotiation.
/// Returns the negotiated features. The caller then sets up its queues and
/// calls `transport.finish_init()` (DRIVER_OK).
pub fn negotiate<T: Transport>(transport: &mut T, wanted: u64) -> Result<u64, InitError> {
    // Step 1: reset, and wait until the device reads back 0 (§4.1.4.3.2).
    transport.set_status(DeviceStatus::empty());
    let mut spins = 0u32;
    while transport.get_status() != DeviceStatus::empty() && spins < 1_000_000 {
        core::hint::spin_loop();
        spins += 1;
    }
    transport.set_status(DeviceStatus::ACKNOWLEDGE);
    transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    let offered = transport.read_device_features();
    let accepted = select_features(offered, wanted);
    transport.write_driver_features(accepted);
    let ok = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
    transport.set_status(ok);
    // Step 6: re-read status; a device that cannot work with the subset
    // clears FEATURES_OK. Legacy devices have no FEATURES_OK bit at all.
    if accepted & F_VERSION_1 != 0 && !transport.get_status().contains(DeviceStatus::FEATURES_OK) {
        transport.set_status(DeviceStatus::FAILED);
        return Err(InitError::FeaturesRejected);
    }
    // Only the legacy MMIO transport uses it (virtio 1.2 §4.2.4).
    transport.set_guest_page_size(virtio_drivers::PAGE_SIZE as u32);
    log::debug!("virtio: offered {offered:#x} accepted {accepted:#x}");
    Ok(accepted)
}

/// Reads a little-endian `u32` from device config space, or `None` when the
/// field lies past the end of the space the device exposes (config space
/// grows with features; virtio 1.2 §2.5).
pub fn config_u32<T: Transport>(transport: &T, offset: usize) -> Option<u32> {
    transport.read_config_space::<u32>(offset).ok()
}

/// Reads a `u16` from device config space (see [`config_u32`]).
pub fn config_u16<T: Transport>(transport: &T, offset: usize) -> Option<u16> {
    transport.read_config_space::<u16>(offset).ok()
}

/// Reads a byte from device config space (see [`config_u32`]).
pub fn config_u8<T: Transport>(transport: &T, offset: usize) -> Option<u8> {
    transport.read_config_space::<u8>(offset).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_is_always_taken_when_offered() {
        assert_eq!(
            select_features(F_VERSION_1 | 0b110, 0b010),
            F_VERSION_1 | 0b010
        );
        assert_eq!(select_features(0b110, F_VERSION_1 | 0b100), 0b100);
    }

    #[test]
    fn never_accepts_what_was_not_offered() {
        assert_eq!(select_features(0, u64::MAX), 0);
    }
}
