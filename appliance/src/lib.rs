//! Platforms.
#![cfg_attr(target_os = "none", no_std)]
extern crate alloc;
