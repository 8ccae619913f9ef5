//! Device drivers over virtio-drivers.
#![no_std]
extern crate alloc;
