//! The virtio-drivers `Hal` for an identity-mapped kernel.
//!
//! In the appliance every byte of RAM sits at the virtual address equal to
//! its physical address, and so does MMIO below 4 GiB (higher BARs are
//! mapped 1:1 by the platform before a transport is built). DMA memory is
//! therefore ordinary heap memory: allocation goes through the global
//! allocator with page alignment, sharing a buffer with a device is just
//! taking its address, and nothing needs to be copied back on unshare.
//!
//! On the host (unit tests) the same rules give a fake device direct access
//! to the driver's buffers, since "physical" is then the process address.

use core::alloc::Layout;
use core::ptr::NonNull;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// `Hal` for identity-mapped memory: physical address == virtual address.
pub struct IdentityHal;

fn dma_layout(pages: usize) -> Option<Layout> {
    let size = pages.checked_mul(PAGE_SIZE)?;
    if size == 0 {
        return None;
    }
    Layout::from_size_align(size, PAGE_SIZE).ok()
}

// SAFETY: `dma_alloc` returns fresh, zeroed, page-aligned memory from the
// global allocator that nothing else references until `dma_dealloc`;
// `mmio_phys_to_virt` and `share` rely on the platform's identity map, under
// which the returned addresses are valid for the CPU and the device alike.
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Some(layout) = dma_layout(pages) else {
            // virtio-drivers treats a zero physical address as failure.
            return (0, NonNull::dangling());
        };
        // SAFETY: the layout has a non-zero size (checked in `dma_layout`).
        let ptr = unsafe { alloc::alloc::alloc_zeroed(layout) };
        match NonNull::new(ptr) {
            Some(p) => (p.as_ptr() as usize as PhysAddr, p),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Some(layout) = dma_layout(pages) else {
            return -1;
        };
        // SAFETY: the caller passes back a pointer from `dma_alloc` with the
        // same page count, so it was allocated with exactly this layout.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // Identity map: the platform has mapped every MMIO range 1:1 before
        // a transport asks for it. virtio-drivers never passes 0 here (it
        // rejects unassigned BARs first).
        NonNull::new(paddr as usize as *mut u8).expect("MMIO at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as usize as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {
        // Nothing to do: the device worked on the buffer in place.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_is_page_aligned_zeroed_and_freed() {
        let (pa, va) = IdentityHal::dma_alloc(3, BufferDirection::Both);
        assert_ne!(pa, 0);
        assert_eq!(pa as usize, va.as_ptr() as usize);
        assert_eq!(pa as usize % PAGE_SIZE, 0);
        // SAFETY: the region is 3 pages we own.
        let bytes = unsafe { core::slice::from_raw_parts(va.as_ptr(), 3 * PAGE_SIZE) };
        assert!(bytes.iter().all(|&b| b == 0));
        // SAFETY: values straight from `dma_alloc`.
        assert_eq!(unsafe { IdentityHal::dma_dealloc(pa, va, 3) }, 0);
    }

    #[test]
    fn zero_pages_fail_cleanly() {
        let (pa, _) = IdentityHal::dma_alloc(0, BufferDirection::Both);
        assert_eq!(pa, 0);
    }
}
