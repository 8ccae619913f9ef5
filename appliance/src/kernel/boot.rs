//! PVH entry: the ELF note QEMU looks for, the 32-bit entry point, the boot
//! page tables and the switch to 64-bit mode.
//!
//! Boot protocol (Xen `arch-x86/hvm/start_info.h`, "PVH boot"): the loader
//! enters `pvh_start32` in 32-bit protected mode, paging off, flat segments,
//! with `%ebx` holding the physical address of `hvm_start_info`. We
//!
//! 1. zero `.bss` (the loader should have, but nothing depends on it);
//! 2. build page tables that identity-map the first 4 GiB with 2 MiB pages
//!    (PML4[0] → one PDPT → four page directories; 1 GiB pages are not
//!    offered by every CPU model QEMU emulates);
//! 3. enable PAE, SSE (CR4.OSFXSR, CR4.OSXMMEXCPT; CR0.MP set, CR0.EM
//!    clear), EFER.LME and paging, which puts the CPU in long mode;
//! 4. far-jump through a minimal GDT to 64-bit code, set up the boot stack
//!    and call `kernel_start(start_info_paddr)` (defined by the kernel
//!    binary, `extern "C"`, never returns).
//!
//! The real GDT (with a TSS) and IDT are installed later from Rust
//! ([`super::gdt`], [`super::interrupts`]); [`super::paging`] refines the
//! cache attributes of these tables and extends them past 4 GiB.

/// Size of the boot stack the kernel runs on (the only kernel stack).
pub const BOOT_STACK_SIZE: usize = 1 << 20;

// The boot code is assembly: nothing in Rust can run before long mode.
//
// Xen ELF note (xen/include/public/elfnote.h): namesz 4 ("Xen\0"), descsz 8,
// type 18 = XEN_ELFNOTE_PHYS32_ENTRY; QEMU reads the descriptor as the entry
// address (it accepts 4 or 8 bytes; we write 8).
core::arch::global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4

    .section .text.boot, "ax", @progbits
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi

    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl

    movl $strata_boot_pdpt, %eax
    orl $0x3, %eax
    movl %eax, strata_boot_pml4

    movl $strata_boot_pd, %eax
    orl $0x3, %eax
    movl $strata_boot_pdpt, %edi
    movl $4, %ecx
1:
    movl %eax, (%edi)
    addl $0x1000, %eax
    addl $8, %edi
    loop 1b

    movl $strata_boot_pd, %edi
    movl $0x83, %eax
    movl $2048, %ecx
2:
    movl %eax, (%edi)
    addl $0x200000, %eax
    addl $8, %edi
    loop 2b

    movl %cr4, %eax
    orl $0x620, %eax
    movl %eax, %cr4

    movl $strata_boot_pml4, %eax
    movl %eax, %cr3

    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr

    movl %cr0, %eax
    andl $0xFFFFFFF3, %eax
    orl $0x80000023, %eax
    movl %eax, %cr0

    lgdt strata_boot_gdt_ptr
    ljmpl $0x08, $pvh_start64

    .code64
pvh_start64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movq $strata_boot_stack_top, %rsp
    xorl %ebp, %ebp
    movl %esi, %edi
    call kernel_start
3:
    cli
    hlt
    jmp 3b

    .section .rodata.strata_boot_gdt, "a", @progbits
    .balign 16
strata_boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
strata_boot_gdt_ptr:
    .word strata_boot_gdt_ptr - strata_boot_gdt - 1
    .long strata_boot_gdt

    .section .bss.strata_boot_tables, "aw", @nobits
    .balign 4096
strata_boot_pml4:
    .space 4096
strata_boot_pdpt:
    .space 4096
strata_boot_pd:
    .space 4 * 4096

    .section .boot_stack, "aw", @nobits
    .balign 4096
    .global strata_boot_stack_guard
strata_boot_stack_guard:
    .space 4096
    .space {stack_size}
strata_boot_stack_top:
    "#,
    stack_size = const BOOT_STACK_SIZE,
    options(att_syntax)
);

unsafe extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
    static strata_boot_stack_guard: u8;
}

/// Address of the 4 KiB guard page below the boot stack, which
/// [`super::paging::init`] unmaps so that a stack overflow faults (and is
/// reported as a double fault on its own stack) instead of overwriting
/// `.bss`.
pub fn stack_guard_page() -> u64 {
    core::ptr::addr_of!(strata_boot_stack_guard) as u64
}

/// Physical (== virtual) range `[start, end)` of the loaded kernel image,
/// including `.bss` and the boot stack.
pub fn kernel_image_range() -> (u64, u64) {
    // Only the addresses of the linker-script symbols are taken; they are
    // never read through.
    (
        core::ptr::addr_of!(__kernel_start) as u64,
        core::ptr::addr_of!(__kernel_end) as u64,
    )
}
