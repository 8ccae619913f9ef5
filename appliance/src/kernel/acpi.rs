//! Just enough ACPI to find tables: the RSDP (from the PVH start info, or
//! the BIOS area scan of ACPI 6.5 §5.2.5.1), the RSDT/XSDT, and a table by
//! signature; plus the MADT's I/O APIC entries (ACPI 6.5 §5.2.12).
//!
//! Tables live in firmware-reserved RAM below 4 GiB, which the boot page
//! tables identity-map; every read is bounds-checked against the table's
//! own length and a sanity cap.

use core::sync::atomic::{AtomicU64, Ordering};

static RSDP: AtomicU64 = AtomicU64::new(0);

/// Largest table length we believe (corrupt lengths must not walk memory).
const MAX_TABLE_LEN: u32 = 1 << 20;

/// Sets up table lookup from the RSDP address the loader gave (0 = none:
/// the BIOS area 0xE0000..0x100000 is scanned). Returns the RSDP address
/// in use (0 if there is none).
pub fn init(rsdp_hint: u64) -> u64 {
    let rsdp = if rsdp_hint != 0 && valid_rsdp(rsdp_hint) {
        rsdp_hint
    } else {
        scan_bios_area().unwrap_or(0)
    };
    RSDP.store(rsdp, Ordering::Relaxed);
    rsdp
}

/// The RSDP physical address in use (0 if none).
pub fn rsdp() -> u64 {
    RSDP.load(Ordering::Relaxed)
}

fn bytes(addr: u64, len: usize) -> &'static [u8] {
    // SAFETY: callers pass addresses of firmware tables (or the BIOS ROM
    // area) below 4 GiB, identity-mapped by the boot page tables and never
    // written by the kernel; `len` is bounded by MAX_TABLE_LEN.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

fn checksum_ok(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x)) == 0
}

fn valid_rsdp(addr: u64) -> bool {
    if addr == 0 || addr >= 1 << 32 {
        return false;
    }
    let b = bytes(addr, 20);
    &b[0..8] == b"RSD PTR " && checksum_ok(b)
}

fn scan_bios_area() -> Option<u64> {
    (0xE0000u64..0x100000).step_by(16).find(|&a| valid_rsdp(a))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// The whole table (header included) at `addr`, if its length is sane.
fn table_at(addr: u64) -> Option<&'static [u8]> {
    if addr == 0 || addr >= 1 << 32 {
        return None;
    }
    let len = u32_at(bytes(addr, 8), 4)?;
    if !(36..=MAX_TABLE_LEN).contains(&len) {
        return None;
    }
    Some(bytes(addr, len as usize))
}

/// Finds an ACPI table by its 4-byte signature (e.g. `b"APIC"`, `b"FACP"`,
/// `b"MCFG"`) and returns its bytes, header included.
pub fn find_table(signature: &[u8; 4]) -> Option<&'static [u8]> {
    let rsdp = rsdp();
    if rsdp == 0 {
        return None;
    }
    let r = bytes(rsdp, 36);
    let revision = r[15];
    // ACPI 2.0+: prefer the XSDT (64-bit entries) at offset 24.
    let (root, entry_size) = match (revision >= 2).then(|| u64_at(r, 24)).flatten() {
        Some(xsdt) if xsdt != 0 => (xsdt, 8),
        _ => (u64::from(u32_at(r, 16)?), 4),
    };
    let root = table_at(root)?;
    let entries = root.get(36..)?;
    entries.chunks_exact(entry_size).find_map(|e| {
        let addr = if entry_size == 8 {
            u64_at(e, 0)?
        } else {
            u64::from(u32_at(e, 0)?)
        };
        let t = table_at(addr)?;
        (&t[0..4] == signature).then_some(t)
    })
}

/// One I/O APIC from the MADT.
#[derive(Clone, Copy, Debug)]
pub struct IoApicEntry {
    /// Physical address of its registers.
    pub address: u64,
    /// First GSI it serves.
    pub gsi_base: u32,
}

/// The I/O APICs listed in the MADT (at most 8), in table order.
pub fn madt_ioapics() -> ([Option<IoApicEntry>; 8], usize) {
    let mut out = [None; 8];
    let mut n = 0;
    if let Some(madt) = find_table(b"APIC") {
        // MADT: 44-byte fixed part, then (type, length, ...) records.
        let mut off = 44;
        while off + 2 <= madt.len() && n < out.len() {
            let kind = madt[off];
            let len = madt[off + 1] as usize;
            if len < 2 || off + len > madt.len() {
                break;
            }
            // Type 1: I/O APIC {id u8, reserved u8, address u32, gsi_base u32}.
            if kind == 1 && len >= 12 {
                if let (Some(a), Some(g)) = (u32_at(madt, off + 4), u32_at(madt, off + 8)) {
                    out[n] = Some(IoApicEntry {
                        address: u64::from(a),
                        gsi_base: g,
                    });
                    n += 1;
                }
            }
            off += len;
        }
    }
    (out, n)
}
