//! QEMU's firmware configuration device (fw_cfg), legacy I/O interface:
//! how the host hands the appliance a file that must not appear on the
//! command line or in the config (the management token, given with
//! `-fw_cfg name=opt/strata/token,file=PATH`, and the secrets of
//! `--secret NAME=FILE` as `opt/strata/secret/NAME`).
//!
//! QEMU's docs/specs/fw_cfg.rst: write a 16-bit selector to port 0x510,
//! then read the item's bytes one at a time from port 0x511. Item 0 is the
//! signature `QEMU`; item 0x19 the file directory: a big-endian count, then
//! per file a big-endian size, a big-endian selector, two reserved bytes
//! and a NUL-padded 56-byte name.

use alloc::string::String;
use alloc::vec::Vec;
use x86_64::instructions::port::Port;

/// Selector port.
const SELECTOR_PORT: u16 = 0x510;
/// Data port.
const DATA_PORT: u16 = 0x511;
/// Item: the signature.
const SIGNATURE: u16 = 0x0000;
/// Item: the file directory.
const FILE_DIR: u16 = 0x0019;
/// Bytes of a file name in the directory.
const NAME_BYTES: usize = 56;
/// Largest file read (the token is tens of bytes).
const MAX_FILE_BYTES: u32 = 4096;

/// Selects item `key` and reads `n` bytes of it.
fn read_item(key: u16, n: usize) -> Vec<u8> {
    // SAFETY: ports 0x510/0x511 are QEMU's fw_cfg on q35 and microvm;
    // selecting an item and reading its bytes has no other effect. Where
    // there is no such device the reads return 0xff and the signature
    // check below fails.
    unsafe {
        Port::<u16>::new(SELECTOR_PORT).write(key);
        let mut data = Port::<u8>::new(DATA_PORT);
        (0..n).map(|_| data.read()).collect()
    }
}

/// The directory: each file's name, size and selector.
fn directory() -> Vec<(String, u32, u16)> {
    if read_item(SIGNATURE, 4) != *b"QEMU" {
        return Vec::new();
    }
    let Ok(count) = read_item(FILE_DIR, 4).try_into().map(u32::from_be_bytes) else {
        return Vec::new();
    };
    // The directory is read in one pass after its count.
    let dir = read_item(FILE_DIR, 4 + count.min(1024) as usize * (8 + NAME_BYTES));
    dir[4..]
        .chunks_exact(8 + NAME_BYTES)
        .filter_map(|e| {
            let size = u32::from_be_bytes(e[0..4].try_into().ok()?);
            let select = u16::from_be_bytes(e[4..6].try_into().ok()?);
            let raw = &e[8..];
            let len = raw.iter().position(|&b| b == 0).unwrap_or(NAME_BYTES);
            let name = core::str::from_utf8(&raw[..len]).ok()?;
            Some((String::from(name), size, select))
        })
        .collect()
}

/// The contents of the fw_cfg file `name`, if QEMU offers one.
pub fn read_file(name: &str) -> Option<Vec<u8>> {
    directory()
        .into_iter()
        .find(|(n, size, _)| n == name && *size <= MAX_FILE_BYTES)
        .map(|(_, size, select)| read_item(select, size as usize))
}

/// Every fw_cfg file whose name starts with `prefix`: the rest of its
/// name and its contents (files over the size limit are left out).
pub fn read_files(prefix: &str) -> Vec<(String, Vec<u8>)> {
    directory()
        .into_iter()
        .filter_map(|(n, size, select)| {
            let rest = n.strip_prefix(prefix)?;
            (size <= MAX_FILE_BYTES).then(|| (String::from(rest), read_item(select, size as usize)))
        })
        .collect()
}

/// The management token the host tool handed over, if any: the first
/// line of `opt/strata/token`.
pub fn token() -> Option<String> {
    let bytes = read_file("opt/strata/token")?;
    let text = core::str::from_utf8(&bytes).ok()?;
    let t = text.lines().next()?.trim();
    (!t.is_empty() && t.chars().all(|c| c.is_ascii_graphic())).then(|| String::from(t))
}
