//! The long-mode GDT: null, 64-bit kernel code, kernel data, and a TSS
//! whose interrupt stack table gives double faults (and NMI, machine
//! checks) a known-good stack (Intel SDM vol. 3A §7.7, §6.14.5).

use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// IST slot (1-based in the IDT gate, 0-based in the TSS array) for
/// double faults.
pub const DOUBLE_FAULT_IST: u8 = 1;
/// IST slot for NMI and machine checks.
pub const NMI_IST: u8 = 2;

const IST_STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct Stack([u8; IST_STACK_SIZE]);

static mut DOUBLE_FAULT_STACK: Stack = Stack([0; IST_STACK_SIZE]);
static mut NMI_STACK: Stack = Stack([0; IST_STACK_SIZE]);

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<(GlobalDescriptorTable, Selectors)> = Once::new();

/// The selectors of the kernel GDT.
#[derive(Clone, Copy, Debug)]
pub struct Selectors {
    /// 64-bit code segment.
    pub code: SegmentSelector,
    /// Data segment.
    pub data: SegmentSelector,
    /// Task-state segment.
    pub tss: SegmentSelector,
}

fn stack_top(stack: *mut Stack) -> VirtAddr {
    VirtAddr::new(stack as u64 + IST_STACK_SIZE as u64)
}

/// Loads the GDT and TSS and reloads every segment register. Call once.
pub fn init() -> Selectors {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        tss.interrupt_stack_table[usize::from(DOUBLE_FAULT_IST - 1)] =
            stack_top(core::ptr::addr_of_mut!(DOUBLE_FAULT_STACK));
        tss.interrupt_stack_table[usize::from(NMI_IST - 1)] =
            stack_top(core::ptr::addr_of_mut!(NMI_STACK));
        tss
    });
    let (gdt, sel) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        (gdt, Selectors { code, data, tss })
    });
    gdt.load();
    // SAFETY: the selectors index descriptors of the GDT just loaded, which
    // lives in a static for the rest of the kernel's life; the TSS
    // descriptor is loaded exactly once (loading marks it busy).
    unsafe {
        CS::set_reg(sel.code);
        SS::set_reg(sel.data);
        DS::set_reg(sel.data);
        ES::set_reg(sel.data);
        load_tss(sel.tss);
    }
    *sel
}
