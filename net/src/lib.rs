//! Sans-I/O protocol engines.
#![no_std]
#![forbid(unsafe_code)]
extern crate alloc;
