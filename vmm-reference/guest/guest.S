/*
 * The embedded default guest of vmm-reference.
 *
 * The VMM loads it at 1 MiB and enters it in 64-bit long mode with the
 * first GiB identity-mapped and a stack below 512 KiB. It greets on the
 * 16550 serial port (COM1, 0x3f8), then prints a numbered tick line in a
 * loop. Guest code runs about 1000 times slower than native on nested KVM,
 * so the delay loop is short: a tick is a fraction of a second there and
 * invisible on a host with native KVM speed. The tick lines give jobs,
 * snapshots and migration live guest activity, and let tests see that
 * `stop` parks the vCPUs (the ticks stop) and `cont` resumes them.
 */
    .code64
    .section .text
    .globl _start
_start:
    lea     greeting(%rip), %rsi
    call    puts
    xor     %r12, %r12              /* tick counter */
tick_loop:
    mov     $DELAY, %rcx
delay:
    dec     %rcx
    jnz     delay
    inc     %r12
    lea     tick(%rip), %rsi
    call    puts
    mov     %r12, %rax
    call    putdec
    mov     $'\n', %al
    call    putc
    jmp     tick_loop

/* putc: writes %al to COM1's transmit register. */
putc:
    mov     $0x3f8, %dx
    out     %al, %dx
    ret

/* puts: writes the NUL-terminated string at %rsi. */
puts:
    lodsb
    test    %al, %al
    jz      1f
    call    putc
    jmp     puts
1:  ret

/* putdec: writes %rax in decimal. */
putdec:
    lea     digits_end(%rip), %rdi
    mov     $10, %rbx
1:  xor     %rdx, %rdx
    div     %rbx
    add     $'0', %dl
    dec     %rdi
    mov     %dl, (%rdi)
    test    %rax, %rax
    jnz     1b
    mov     %rdi, %rsi
    jmp     puts

    .section .data
greeting:
    .asciz  "vmm-reference guest: hello from the embedded guest\n"
tick:
    .asciz  "vmm-reference guest: tick "
digits:
    .space  20
digits_end:
    .byte   0
