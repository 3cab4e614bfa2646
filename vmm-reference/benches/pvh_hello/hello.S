/*
 * The guest of benches/start_vs_microvm.py: one ELF that both VMMs boot
 * with -kernel. QEMU (microvm, qboot firmware) enters it through its PVH
 * note in 32-bit protected mode with paging off; vmm-reference enters it at
 * the ELF entry in 64-bit long mode with the first GiB identity-mapped.
 * Every instruction below encodes the same in both modes, so the same
 * bytes run in both: write "hello\n" to COM1, then halt for good.
 */
    .section .note.Xen, "a"
    .balign 4
    .long   4, 8, 18                /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz  "Xen"
    .quad   _start

    .text
    .code32
    .globl  _start
_start:
    mov     $0x3f8, %dx             /* 66 ba: a 16-bit immediate in both modes */
    mov     $msg, %esi              /* zero-extended into %rsi in long mode */
1:  lodsb
    test    %al, %al
    jz      2f
    out     %al, %dx
    jmp     1b
2:  hlt
    jmp     2b
msg:
    .asciz  "hello\n"
