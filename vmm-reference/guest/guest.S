/*
 * The embedded default guest of vmm-reference.
 *
 * The VMM loads it at 1 MiB and enters it in 64-bit long mode with the
 * first GiB (RAM) and the fourth GiB (virtio-mmio devices) identity-mapped
 * and a stack below 512 KiB. It greets on the 16550 serial port (COM1).
 *
 * With a virtio-blk disk at 0xd0000000 it drives it (virtio 1.x over
 * virtio-mmio, one request in flight, polling the used ring): pass after
 * pass over the whole disk it writes each 4 KiB chunk filled with the byte
 * (chunk + pass) & 0xff, reads it back and checks it, and reports progress
 * and a checksum on COM1. Without a disk it prints numbered tick lines.
 * Either way jobs, snapshots and migration have live guest activity, and
 * tests see that `stop` parks the vCPUs (the output stops).
 *
 * Guest code runs about 1000 times slower than native on nested KVM, so
 * buffers are filled and checked with rep stosb / repe scasb (one
 * instruction each) and loops are short.
 */
    .code64

    .set COM1,        0x3f8
    .set MMIO,        0xd0000000
    .set QSIZE,       8
    .set DESC,        0x200000       /* descriptor table (16 B x QSIZE) */
    .set AVAIL,       0x201000       /* avail ring */
    .set USED,        0x202000       /* used ring */
    .set HDR,         0x203000       /* request header (16 B) */
    .set STATUS,      0x203100       /* status byte */
    .set BUF,         0x210000       /* 4 KiB data buffer */
    .set CHUNK,       4096
    .set REPORT_EVERY, 256           /* chunks between progress lines (1 MiB) */

    .section .text
    .globl _start
_start:
    lea     greeting(%rip), %rsi
    call    puts
    mov     $MMIO, %rbx
    cmpl    $0x74726976, (%rbx)      /* "virt" */
    jne     ticks
    cmpl    $2, 8(%rbx)              /* device id: block */
    jne     ticks
    call    virtio_init
    jmp     disk_loop

/* ---- no disk: tick lines ------------------------------------------- */
ticks:
    xor     %r12, %r12
1:  mov     $DELAY, %rcx
2:  dec     %rcx
    jnz     2b
    inc     %r12
    lea     tick(%rip), %rsi
    call    puts
    mov     %r12, %rax
    call    putdec
    mov     $'\n', %al
    call    putc
    jmp     1b

/* ---- virtio-mmio setup ----------------------------------------------- */
virtio_init:
    movl    $0, 0x70(%rbx)           /* reset */
    movl    $3, 0x70(%rbx)           /* ACKNOWLEDGE | DRIVER */
    movl    $1, 0x24(%rbx)           /* driver features, high word: */
    movl    $1, 0x20(%rbx)           /*   VERSION_1 */
    movl    $0, 0x24(%rbx)
    movl    $0, 0x20(%rbx)
    movl    $11, 0x70(%rbx)          /* | FEATURES_OK */
    testl   $8, 0x70(%rbx)
    jz      broken
    movl    $0, 0x30(%rbx)           /* queue 0 */
    movl    $QSIZE, 0x38(%rbx)
    movl    $DESC, 0x80(%rbx)
    movl    $0, 0x84(%rbx)
    movl    $AVAIL, 0x90(%rbx)
    movl    $0, 0x94(%rbx)
    movl    $USED, 0xa0(%rbx)
    movl    $0, 0xa4(%rbx)
    movl    $1, 0x44(%rbx)           /* ready */
    movl    $15, 0x70(%rbx)          /* | DRIVER_OK */
    movw    $0, AVAIL                /* flags */
    movw    $0, AVAIL+2              /* idx */
    xor     %r15, %r15               /* requests submitted */
    mov     0x100(%rbx), %rax        /* capacity in sectors */
    shr     $3, %rax                 /* in 4 KiB chunks */
    mov     %rax, %r14
    lea     found(%rip), %rsi
    call    puts
    mov     %r14, %rax
    shl     $2, %rax                 /* KiB */
    call    putdec
    lea     kib(%rip), %rsi
    call    puts
    ret

broken:
    lea     nodev(%rip), %rsi
    call    puts
    jmp     ticks

/* ---- the disk loop: write, read back, check, chunk after chunk ------ */
disk_loop:
    mov     $1, %r13                 /* pass */
pass_loop:
    xor     %r12, %r12               /* chunk */
    xor     %r11, %r11               /* checksum */
chunk_loop:
    mov     %r12, %rax
    add     %r13, %rax               /* pattern byte: (chunk + pass) & 0xff */
    mov     %al, %r10b
    mov     $BUF, %rdi               /* fill */
    mov     $CHUNK, %rcx
    rep stosb
    mov     $1, %eax                 /* OUT */
    call    request
    mov     $BUF, %rdi               /* clear, so the read must bring it back */
    mov     $CHUNK, %rcx
    xor     %eax, %eax
    rep stosb
    xor     %eax, %eax               /* IN */
    call    request
    mov     $BUF, %rdi               /* check */
    mov     $CHUNK, %rcx
    mov     %r10b, %al
    repe scasb
    jne     mismatch
    movzbq  %r10b, %rax
    add     %rax, %r11
    rol     $5, %r11
    inc     %r12
    mov     %r12, %rax
    and     $(REPORT_EVERY - 1), %rax
    jnz     1f
    call    report
1:  cmp     %r14, %r12
    jb      chunk_loop
    lea     pass_msg(%rip), %rsi     /* "pass N done, checksum X" */
    call    puts
    mov     %r13, %rax
    call    putdec
    lea     done_msg(%rip), %rsi
    call    puts
    mov     %r11, %rax
    call    putdec
    mov     $'\n', %al
    call    putc
    inc     %r13
    jmp     pass_loop

report:
    lea     progress(%rip), %rsi
    call    puts
    mov     %r13, %rax
    call    putdec
    lea     colon(%rip), %rsi
    call    puts
    mov     %r12, %rax
    shl     $2, %rax
    call    putdec
    lea     kib_ok(%rip), %rsi
    jmp     puts

mismatch:
    lea     bad(%rip), %rsi
    call    puts
    mov     %r12, %rax
    call    putdec
    mov     $'\n', %al
    call    putc
    hlt
    jmp     mismatch

/*
 * request: type in %eax (0 IN, 1 OUT) for chunk %r12 of BUF; waits for
 * completion and checks the status byte.
 */
request:
    mov     %eax, HDR
    movl    $0, HDR+4
    mov     %r12, %rdx
    shl     $3, %rdx                 /* sector */
    mov     %rdx, HDR+8
    movb    $0xff, STATUS
    /* desc 0: header, device-readable, NEXT */
    movq    $HDR, DESC
    movl    $16, DESC+8
    movw    $1, DESC+12
    movw    $1, DESC+14
    /* desc 1: data, NEXT, WRITE for IN */
    movq    $BUF, DESC+16
    movl    $CHUNK, DESC+24
    mov     $3, %dx                  /* NEXT | WRITE */
    test    %eax, %eax
    jz      1f
    mov     $1, %dx                  /* NEXT */
1:  movw    %dx, DESC+28
    movw    $2, DESC+30
    /* desc 2: status, WRITE */
    movq    $STATUS, DESC+32
    movl    $1, DESC+40
    movw    $2, DESC+44
    movw    $0, DESC+46
    /* avail ring entry, then the index */
    mov     %r15, %rax
    and     $(QSIZE - 1), %rax
    movw    $0, AVAIL+4(,%rax,2)
    inc     %r15
    mov     %r15w, AVAIL+2
    movl    $0, 0x50(%rbx)           /* notify queue 0 */
2:  movzwq  USED+2, %rax             /* wait for the used index */
    cmp     %r15w, %ax
    jne     2b
    cmpb    $0, STATUS
    jne     ioerr
    ret
ioerr:
    lea     ioerr_msg(%rip), %rsi
    call    puts
    mov     %r12, %rax
    call    putdec
    mov     $'\n', %al
    call    putc
    ret

/* putc: writes %al to COM1's transmit register. */
putc:
    push    %rdx
    mov     $COM1, %dx
    out     %al, %dx
    pop     %rdx
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
    push    %rbx
    push    %rdx
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
    pop     %rdx
    pop     %rbx
    jmp     puts

    .section .data
greeting:
    .asciz  "vmm-reference guest: hello from the embedded guest\n"
tick:
    .asciz  "vmm-reference guest: tick "
found:
    .asciz  "vmm-reference guest: virtio-blk disk of "
kib:
    .asciz  " KiB\n"
nodev:
    .asciz  "vmm-reference guest: virtio-blk refused VERSION_1\n"
progress:
    .asciz  "vmm-reference guest: pass "
colon:
    .asciz  ": "
kib_ok:
    .asciz  " KiB written, read back and checked\n"
pass_msg:
    .asciz  "vmm-reference guest: pass "
done_msg:
    .asciz  " done, checksum "
bad:
    .asciz  "vmm-reference guest: MISMATCH in chunk "
ioerr_msg:
    .asciz  "vmm-reference guest: I/O error in chunk "
digits:
    .space  20
digits_end:
    .byte   0
