//! Strata's block stack, after FreeBSD's GEOM.
//!
//! - [`page`]: pages, scatter-gather lists and the counted map step;
//! - [`bio`]: the request that travels down the stack and back;
//! - [`stack`]: geoms, providers, consumers, access counts and the
//!   dispatcher with its central check;
//! - [`disk`]: the class over platform block devices;
//! - [`class`]: the other classes (md, …);
//! - [`config`]: the configuration language.
#![no_std]
#![forbid(unsafe_code)]
extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod bio;
pub mod class;
pub mod config;
pub mod disk;
pub mod page;
pub mod stack;
