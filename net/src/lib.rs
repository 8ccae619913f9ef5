//! Sans-I/O protocol engines: bytes in, bytes out, bios to the stack.
//!
//! The same engines run on smoltcp sockets in the appliance and on std
//! sockets in the hosted build, and are tested and fuzzed on the host.
//! - [`session`]: the one interface every engine offers the service;
//! - [`nbd`]: the NBD server (doc/proto.md of the NBD project);
//! - [`http`]: the management endpoint's HTTP/1.1 engine.
#![no_std]
#![forbid(unsafe_code)]
extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod http;
pub mod nbd;
pub mod session;
