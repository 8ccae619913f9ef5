//! Fuzz target: any bytes given to the metadata parser either are refused
//! with an error or parse into a record that emits back to the same bytes.
#![no_main]

use geom::meta::{MetaRepr, META_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = MetaRepr::from_bytes(data) {
        let again = r.to_sector(META_LEN).expect("a parsed record emits");
        assert_eq!(&again[..META_LEN], &data[..META_LEN]);
    }
});
