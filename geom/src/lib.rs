//! Strata's block stack, after FreeBSD's GEOM.
#![no_std]
#![forbid(unsafe_code)]
extern crate alloc;
