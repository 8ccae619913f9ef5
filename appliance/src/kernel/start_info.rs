//! The PVH `hvm_start_info` block the loader hands over in `%ebx`
//! (Xen `include/public/arch-x86/hvm/start_info.h`): command line, ACPI
//! RSDP, modules (QEMU passes `-initrd FILE` as module 0) and, from
//! version 1 on, the memory map.
//!
//! Everything here is read once at boot into plain values with `'static`
//! lifetimes: the loader's memory is kept out of the heap by
//! [`super::mem`] (see [`StartInfo::reserved_ranges`]).

/// `hvm_start_info.magic`.
pub const HVM_START_MAGIC: u32 = 0x336E_C578;
/// Memory-map entry type for usable RAM (E820 type 1).
pub const MEMMAP_TYPE_RAM: u32 = 1;
/// Most memory-map entries kept.
pub const MAX_MEMMAP: usize = 64;
/// Most modules kept.
pub const MAX_MODULES: usize = 4;

/// One memory-map entry (`hvm_memmap_table_entry`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemMapEntry {
    /// Physical start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820-style type: 1 = RAM, 2 = reserved, 3 = ACPI, 4 = NVS, ...
    pub kind: u32,
}

/// One boot module (`hvm_modlist_entry`).
#[derive(Clone, Copy, Debug)]
pub struct Module {
    /// Physical start of the module's bytes.
    pub paddr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Physical address of its NUL-terminated command line (0 = none).
    pub cmdline_paddr: u64,
}

impl Module {
    /// The module's bytes (identity-mapped RAM the heap never hands out).
    pub fn bytes(&self) -> &'static [u8] {
        if self.paddr == 0 || self.size == 0 {
            return &[];
        }
        // SAFETY: the loader placed `size` bytes at `paddr` in RAM; mem
        // excludes that range from the heap and nothing writes it, so a
        // shared 'static view is sound.
        unsafe { core::slice::from_raw_parts(self.paddr as *const u8, self.size as usize) }
    }
}

/// The parsed start info.
#[derive(Clone, Copy, Debug)]
pub struct StartInfo {
    /// Physical address of the `hvm_start_info` block itself.
    pub paddr: u64,
    /// Structure version (0 has no memory map).
    pub version: u32,
    /// Kernel command line (`-append`), empty if none or not UTF-8.
    pub cmdline: &'static str,
    /// Physical address of the command line (0 = none).
    pub cmdline_paddr: u64,
    /// ACPI RSDP physical address (0 = not given).
    pub rsdp_paddr: u64,
    /// Memory map entries; `memmap_len` of them are valid.
    pub memmap: [MemMapEntry; MAX_MEMMAP],
    /// Number of valid entries in `memmap`.
    pub memmap_len: usize,
    /// Physical address of the memory-map table (0 = none).
    pub memmap_paddr: u64,
    /// Modules; `modules_len` of them are valid.
    pub modules: [Option<Module>; MAX_MODULES],
    /// Number of valid entries in `modules`.
    pub modules_len: usize,
    /// Physical address of the module list (0 = none).
    pub modlist_paddr: u64,
    /// Number of modules the loader listed (may exceed `modules_len`).
    pub nr_modules: u32,
}

/// Why the start info could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartInfoError {
    /// `%ebx` was 0.
    Null,
    /// The magic number did not match (not booted through PVH).
    BadMagic(u32),
}

fn read_u32(addr: u64) -> u32 {
    // SAFETY: `addr` lies inside a structure the loader built in
    // identity-mapped low memory; unaligned reads are fine on x86.
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: as in `read_u32`.
    unsafe { core::ptr::read_unaligned(addr as *const u64) }
}

/// Length of the NUL-terminated string at `addr` (at most 64 KiB).
fn c_strlen(addr: u64) -> usize {
    let mut n = 0;
    // SAFETY: the loader NUL-terminates the command lines it places in
    // mapped memory; the scan is capped at 64 KiB.
    while n < 65_536 && unsafe { core::ptr::read((addr + n as u64) as *const u8) } != 0 {
        n += 1;
    }
    n
}

fn c_str(addr: u64) -> &'static str {
    if addr == 0 {
        return "";
    }
    let len = c_strlen(addr);
    // SAFETY: `len` bytes at `addr` were just read; the memory is reserved
    // from the heap for the kernel's lifetime and never written.
    let b = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
    core::str::from_utf8(b).unwrap_or("")
}

impl StartInfo {
    /// Parses the block at `paddr`.
    pub fn parse(paddr: u64) -> Result<Self, StartInfoError> {
        if paddr == 0 {
            return Err(StartInfoError::Null);
        }
        let magic = read_u32(paddr);
        if magic != HVM_START_MAGIC {
            return Err(StartInfoError::BadMagic(magic));
        }
        // Layout: magic u32 @0, version u32 @4, flags u32 @8,
        // nr_modules u32 @12, modlist_paddr u64 @16, cmdline_paddr u64 @24,
        // rsdp_paddr u64 @32; version >= 1: memmap_paddr u64 @40,
        // memmap_entries u32 @48.
        let version = read_u32(paddr + 4);
        let nr_modules = read_u32(paddr + 12);
        let modlist_paddr = read_u64(paddr + 16);
        let cmdline_paddr = read_u64(paddr + 24);
        let rsdp_paddr = read_u64(paddr + 32);
        let mut info = StartInfo {
            paddr,
            version,
            cmdline: c_str(cmdline_paddr),
            cmdline_paddr,
            rsdp_paddr,
            memmap: [MemMapEntry::default(); MAX_MEMMAP],
            memmap_len: 0,
            memmap_paddr: 0,
            modules: [None; MAX_MODULES],
            modules_len: 0,
            modlist_paddr,
            nr_modules,
        };
        if version >= 1 {
            let table = read_u64(paddr + 40);
            let entries = read_u32(paddr + 48) as usize;
            if table != 0 {
                info.memmap_paddr = table;
                // hvm_memmap_table_entry: addr u64, size u64, type u32, reserved u32.
                for i in 0..entries.min(MAX_MEMMAP) {
                    let e = table + 24 * i as u64;
                    info.memmap[i] = MemMapEntry {
                        addr: read_u64(e),
                        size: read_u64(e + 8),
                        kind: read_u32(e + 16),
                    };
                }
                info.memmap_len = entries.min(MAX_MEMMAP);
            }
        }
        if modlist_paddr != 0 {
            // hvm_modlist_entry: paddr u64, size u64, cmdline_paddr u64, reserved u64.
            for i in 0..(nr_modules as usize).min(MAX_MODULES) {
                let e = modlist_paddr + 32 * i as u64;
                info.modules[i] = Some(Module {
                    paddr: read_u64(e),
                    size: read_u64(e + 8),
                    cmdline_paddr: read_u64(e + 16),
                });
                info.modules_len = i + 1;
            }
        }
        Ok(info)
    }

    /// The valid memory-map entries.
    pub fn memory_map(&self) -> &[MemMapEntry] {
        &self.memmap[..self.memmap_len]
    }

    /// The modules the loader passed.
    pub fn modules(&self) -> impl Iterator<Item = &Module> {
        self.modules[..self.modules_len].iter().flatten()
    }

    /// Module 0's bytes (QEMU's `-initrd`), if any.
    pub fn initrd(&self) -> Option<&'static [u8]> {
        self.modules().next().map(Module::bytes)
    }

    /// Physical ranges `[start, end)` the loader's data occupies and the
    /// heap must not touch: this block, the command lines, the module
    /// list, the modules and the memory-map table. Unused slots are `None`.
    pub fn reserved_ranges(&self) -> [Option<(u64, u64)>; 6 + 2 * MAX_MODULES] {
        let mut out = [None; 6 + 2 * MAX_MODULES];
        let mut n = 0;
        let mut push = |start: u64, len: u64| {
            if start != 0 && len != 0 && n < out.len() {
                out[n] = Some((start, start.saturating_add(len)));
                n += 1;
            }
        };
        push(self.paddr, 56);
        if self.cmdline_paddr != 0 {
            push(self.cmdline_paddr, c_strlen(self.cmdline_paddr) as u64 + 1);
        }
        push(self.modlist_paddr, 32 * u64::from(self.nr_modules));
        push(self.memmap_paddr, 24 * self.memmap_len as u64);
        for m in self.modules() {
            push(m.paddr, m.size);
            if m.cmdline_paddr != 0 {
                push(m.cmdline_paddr, c_strlen(m.cmdline_paddr) as u64 + 1);
            }
        }
        out
    }
}
