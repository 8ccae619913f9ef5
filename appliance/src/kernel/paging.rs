//! Page tables: the identity map (virtual address == physical address).
//!
//! The boot code maps the first 4 GiB with 2 MiB pages, write-back. Here we
//!
//! - mark every 2 MiB page below 4 GiB that holds no RAM as uncached
//!   (PCD|PWT; Intel SDM vol. 3A §4.9): that covers the PCI hole with its
//!   BARs, ECAM (q35: 0xB000_0000), the I/O APIC (0xFEC0_0000) and the
//!   local APIC (0xFEE0_0000);
//! - remap the first 2 MiB with 4 KiB pages and leave two pages unmapped:
//!   page 0 (null-pointer guard, when the loader left nothing there) and
//!   the guard page below the boot stack;
//! - map more on demand: RAM above 4 GiB ([`map_ram`], write-back) and MMIO
//!   anywhere, e.g. 64-bit BARs ([`map_mmio`], uncached). Both identity-map
//!   with 2 MiB pages; new tables come from [`super::mem::alloc_frames`].
//!
//! Because the map is 1:1, a physical address is directly usable as a
//! pointer once its range is mapped, and a heap pointer is directly a DMA
//! address.

use spin::Mutex;
use x86_64::registers::control::Cr3;
use x86_64::structures::paging::{PageTable, PageTableFlags as F};
use x86_64::PhysAddr;

const PAGE_2M: u64 = 2 << 20;
/// Identity mapping needs a canonical lower-half address: below 2^47.
const MAX_IDENTITY: u64 = 1 << 47;

/// Why a range could not be mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// The range reaches past what a 4-level identity map can cover (2^47).
    OutOfRange,
    /// No memory for a page table.
    NoMemory,
}

impl core::fmt::Display for MapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MapError::OutOfRange => f.write_str("address beyond the 2^47 identity-map limit"),
            MapError::NoMemory => f.write_str("out of memory for page tables"),
        }
    }
}

/// Serialises page-table changes.
static LOCK: Mutex<()> = Mutex::new(());

/// 4 KiB page table for the first 2 MiB (with the guard pages left out).
#[repr(C, align(4096))]
struct LowTable(PageTable);

static mut LOW_TABLE: LowTable = LowTable(PageTable::new());

fn pml4() -> *mut PageTable {
    let (frame, _) = Cr3::read();
    frame.start_address().as_u64() as *mut PageTable
}

/// Views a page table through the identity map.
///
/// # Safety
///
/// `p` must be the address of a live page table of the current hierarchy,
/// and the caller must hold `LOCK` for as long as the reference lives.
unsafe fn table<'a>(p: *mut PageTable) -> &'a mut PageTable {
    // SAFETY: per the contract.
    unsafe { &mut *p }
}

/// Returns the table the entry points at, creating it if absent.
///
/// # Safety
///
/// `table` must point at a live page table of the current hierarchy
/// (identity-mapped), and the caller must hold `LOCK`.
unsafe fn next_table(table: *mut PageTable, index: usize) -> Result<*mut PageTable, MapError> {
    // SAFETY: per the contract `table` is a valid, exclusively held table.
    let entry = &mut unsafe { self::table(table) }[index];
    if entry.flags().contains(F::PRESENT) {
        if entry.flags().contains(F::HUGE_PAGE) {
            // Never happens: we do not use 1 GiB pages.
            return Err(MapError::OutOfRange);
        }
        return Ok(entry.addr().as_u64() as *mut PageTable);
    }
    let frame = super::mem::alloc_frames(1).ok_or(MapError::NoMemory)?;
    entry.set_addr(PhysAddr::new(frame), F::PRESENT | F::WRITABLE);
    Ok(frame as *mut PageTable)
}

/// Identity-maps `[phys, phys + len)` (widened to 2 MiB boundaries) with
/// the given extra flags. Existing 2 MiB mappings of the same address get
/// the new cache flags; a 4 KiB-split region (the first 2 MiB) is left as
/// it is.
fn map_range(phys: u64, len: u64, uncached: bool) -> Result<(), MapError> {
    if len == 0 {
        return Ok(());
    }
    let start = phys & !(PAGE_2M - 1);
    let end = phys
        .checked_add(len)
        .and_then(|e| e.checked_next_multiple_of(PAGE_2M))
        .ok_or(MapError::OutOfRange)?;
    if end > MAX_IDENTITY {
        return Err(MapError::OutOfRange);
    }
    let _guard = LOCK.lock();
    let root = pml4();
    let mut addr = start;
    while addr < end {
        let i4 = ((addr >> 39) & 511) as usize;
        let i3 = ((addr >> 30) & 511) as usize;
        let i2 = ((addr >> 21) & 511) as usize;
        // SAFETY: `root` is the active PML4 (identity-mapped, as are all
        // tables we create); LOCK is held.
        let pdpt = unsafe { next_table(root, i4)? };
        // SAFETY: as above; `pdpt` came from the hierarchy.
        let pd = unsafe { next_table(pdpt, i3)? };
        // SAFETY: `pd` is a live page directory and LOCK is held.
        let entry = &mut unsafe { table(pd) }[i2];
        let present = entry.flags().contains(F::PRESENT);
        let split = present && !entry.flags().contains(F::HUGE_PAGE);
        if !split {
            let mut flags = F::PRESENT | F::WRITABLE | F::HUGE_PAGE;
            // Never make RAM uncached: a page that holds any RAM stays
            // write-back even when asked to map MMIO next to it.
            if uncached && !super::mem::overlaps_ram(addr, addr + PAGE_2M) {
                flags |= F::NO_CACHE | F::WRITE_THROUGH;
            }
            entry.set_addr(PhysAddr::new(addr), flags);
        }
        addr += PAGE_2M;
    }
    x86_64::instructions::tlb::flush_all();
    Ok(())
}

/// Identity-maps RAM `[phys, phys + len)` write-back (used for RAM above
/// 4 GiB before the heap takes it).
pub fn map_ram(phys: u64, len: u64) -> Result<(), MapError> {
    map_range(phys, len, false)
}

/// Identity-maps an MMIO range uncached (2 MiB granularity), e.g. a 64-bit
/// BAR above 4 GiB. Ranges below 4 GiB are already mapped; calling this
/// for them is harmless and makes sure they are uncached.
pub fn try_map_mmio(phys: u64, len: u64) -> Result<(), MapError> {
    map_range(phys, len, true)
}

/// [`try_map_mmio`] for callers that cannot continue without the mapping:
/// panics (a boot-time configuration bug) if the range cannot be mapped.
pub fn map_mmio(phys: u64, len: u64) {
    if let Err(e) = try_map_mmio(phys, len) {
        panic!("map_mmio({phys:#x}, {len:#x}): {e}");
    }
}

/// Refines the boot map once the memory map is known: non-RAM 2 MiB pages
/// below 4 GiB become uncached, and the first 2 MiB are remapped with
/// 4 KiB pages so that page 0 (null guard, unless `keep_page0` because
/// the loader left data there) and the boot stack's guard page can be
/// left unmapped.
pub fn init(keep_page0: bool) {
    {
        let _guard = LOCK.lock();
        let root = pml4();
        for gib in 0..4usize {
            // SAFETY: the boot code built PML4[0] → PDPT[0..4] → PDs; LOCK
            // is held and nothing else walks the tables yet.
            let pd = unsafe {
                let pdpt = table(root)[0].addr().as_u64() as *mut PageTable;
                table(pdpt)[gib].addr().as_u64() as *mut PageTable
            };
            for i in 0..512usize {
                let addr = (gib as u64) << 30 | (i as u64) << 21;
                if !super::mem::overlaps_ram(addr, addr + PAGE_2M) {
                    // SAFETY: `pd` is a live page directory; LOCK is held.
                    let entry = &mut unsafe { table(pd) }[i];
                    let flags = entry.flags() | F::NO_CACHE | F::WRITE_THROUGH;
                    entry.set_flags(flags);
                }
            }
        }
        let guard = super::boot::stack_guard_page();
        // SAFETY: LOW_TABLE is used only here, once, under LOCK, before
        // it is linked into the hierarchy; afterwards only the MMU reads it.
        let low = unsafe { &mut *core::ptr::addr_of_mut!(LOW_TABLE.0) };
        for i in 0..512usize {
            let addr = (i as u64) << 12;
            let unmapped = (i == 0 && !keep_page0) || addr == guard;
            if !unmapped {
                low[i].set_addr(PhysAddr::new(addr), F::PRESENT | F::WRITABLE);
            }
        }
        let low_addr = low as *mut PageTable as u64;
        // SAFETY: as above for the boot tables; PD[0] of the first GiB is
        // replaced by a 4 KiB table mapping the same memory (minus the two
        // guard pages) with the same write-back attributes. Nothing uses
        // the guard pages: page 0 holds no data we read after parsing, and
        // the stack guard is below the lowest stack address in use.
        unsafe {
            let pdpt = table(root)[0].addr().as_u64() as *mut PageTable;
            let pd = table(pdpt)[0].addr().as_u64() as *mut PageTable;
            table(pd)[0].set_addr(PhysAddr::new(low_addr), F::PRESENT | F::WRITABLE);
        }
    }
    x86_64::instructions::tlb::flush_all();
}
