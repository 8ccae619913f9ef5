//! Fuzz target: any bytes given to the LUKS1 header parser are refused
//! with an error or parse into a header that writes back to a header the
//! parser reads the same; unlocking what parsed never panics.
#![no_main]

use geom::class::eli::luks::Header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let sectors = 1 << 21;
    if let Ok(h) = Header::parse(data, sectors) {
        assert_eq!(Header::parse(&h.to_bytes(), sectors).as_ref(), Ok(&h));
        if h.keys_end() <= 1 << 20 && h.slots.iter().all(|s| s.iterations <= 4) && h.mk_iterations <= 4 {
            let _ = h.unlock(data, b"passphrase");
        }
    }
});
