/*
 * The embedded default guest of vmm-reference.
 *
 * The VMM loads it at 1 MiB and enters it in 64-bit long mode with the
 * first GiB (RAM) and the fourth GiB (virtio-mmio devices) identity-mapped
 * and a stack below 512 KiB. It greets on the 16550 serial port (COM1).
 *
 * It looks for a virtio-blk disk on PCI bus 0 (configuration mechanism #1
 * at ports 0xCF8/0xCFC: a 1af4:1042 function, whose vendor capabilities
 * locate the common configuration, notify, and device configuration
 * structures in its BAR) and then at the virtio-mmio window 0xd0000000.
 * On PCI it enables MSI-X with vector 0 (queue 0) aimed at its local APIC
 * and checks, after its first requests, that the interrupt reached the
 * APIC's IRR (interrupts stay disabled: it polls). Then it drives the disk
 * (virtio 1.x, one request in flight, polling the used ring): pass after
 * pass over the whole disk it writes each 4 KiB chunk filled with the byte
 * (chunk + pass) & 0xff, reads it back and checks it, and reports progress
 * and a checksum on COM1. Without a disk it prints numbered tick lines and
 * scans the PCI bus again after each one, so a hot-added disk is found.
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
    call    find_disk
    test    %rax, %rax
    jnz     disk_loop

/* ---- no disk: tick lines, and a PCI rescan after each ---------------- */
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
    push    %r12
    call    pci_find
    pop     %r12
    test    %rax, %rax
    jnz     disk_loop
    jmp     1b

/*
 * find_disk: a virtio-blk disk on PCI, else on virtio-mmio; sets it up.
 * Returns %rax = 1 when a disk is ready (%r14 = its size in 4 KiB chunks).
 */
find_disk:
    call    pci_find
    test    %rax, %rax
    jnz     1f
    mov     $MMIO, %rbx
    cmpl    $0x74726976, (%rbx)      /* "virt" */
    jne     2f
    cmpl    $2, 8(%rbx)              /* device id: block */
    jne     2f
    call    mmio_init
1:  ret
2:  xor     %eax, %eax
    ret

/* ---- PCI configuration space (mechanism #1) ------------------------- */
/* cfg_read: register %esi of the function at %r9d into %eax (clobbers %edx). */
cfg_read:
    mov     %r9d, %eax
    or      %esi, %eax
    mov     $0xcf8, %dx
    out     %eax, %dx
    mov     $0xcfc, %dx
    in      %dx, %eax
    ret

/* cfg_write: %edi to register %esi of the function at %r9d (clobbers %eax, %edx). */
cfg_write:
    mov     %r9d, %eax
    or      %esi, %eax
    mov     $0xcf8, %dx
    out     %eax, %dx
    mov     $0xcfc, %dx
    mov     %edi, %eax
    out     %eax, %dx
    ret

/*
 * pci_find: scans slots 1..31 of bus 0 for 1af4:1042 (modern virtio-blk),
 * walks its capabilities, and sets it up. Returns %rax = 1 when found.
 */
pci_find:
    mov     $1, %r8d
1:  mov     %r8d, %r9d
    shl     $11, %r9d
    or      $0x80000000, %r9d
    xor     %esi, %esi
    call    cfg_read
    cmp     $0x10421af4, %eax
    je      2f
    inc     %r8d
    cmp     $32, %r8d
    jb      1b
    xor     %eax, %eax
    ret
2:  mov     $4, %esi                 /* command: memory space, bus master */
    mov     $6, %edi
    call    cfg_write
    mov     $0x10, %esi              /* BAR 0 (32-bit memory) */
    call    cfg_read
    and     $0xfffffff0, %eax
    mov     %rax, %r10
    mov     $0x34, %esi              /* capability pointer */
    call    cfg_read
    and     $0xfc, %eax
    mov     %eax, %esi
3:  test    %esi, %esi
    jz      pci_init
    call    cfg_read                 /* id, next, len, cfg_type */
    mov     %eax, %r11d
    cmp     $0x11, %al               /* MSI-X: remember it and its table */
    jne     4f
    mov     %esi, msix_cap(%rip)
    add     $4, %esi
    call    cfg_read
    sub     $4, %esi
    and     $0xfffffff8, %eax
    add     %r10, %rax
    mov     %rax, msix_table(%rip)
    jmp     8f
4:  cmp     $0x09, %al               /* a virtio structure */
    jne     8f
    add     $8, %esi                 /* its offset in the BAR */
    call    cfg_read
    sub     $8, %esi
    add     %r10, %rax
    mov     %r11d, %ecx
    shr     $24, %ecx
    cmp     $1, %ecx
    jne     5f
    mov     %rax, common(%rip)
5:  cmp     $4, %ecx
    jne     6f
    mov     %rax, devcfg(%rip)
6:  cmp     $2, %ecx
    jne     8f
    mov     %rax, notify_base(%rip)
    add     $16, %esi                /* notify_off_multiplier */
    call    cfg_read
    sub     $16, %esi
    mov     %eax, notify_mult(%rip)
8:  mov     %r11d, %esi
    shr     $8, %esi
    and     $0xfc, %esi
    jmp     3b

pci_init:
    lea     pci_found(%rip), %rsi
    call    puts
    mov     %r8, %rax
    call    putdec
    mov     $'\n', %al
    call    putc
    movb    $1, is_pci(%rip)
    /* MSI-X vector 0 -> local APIC 0, vector 0x40; then enable MSI-X. */
    mov     msix_table(%rip), %rax
    movl    $0xfee00000, (%rax)
    movl    $0, 4(%rax)
    movl    $0x40, 8(%rax)
    movl    $0, 12(%rax)
    mov     msix_cap(%rip), %esi
    call    cfg_read
    or      $0x80000000, %eax        /* message control: enable */
    mov     %eax, %edi
    call    cfg_write
    mov     $0xfee000f0, %eax        /* the APIC accepts interrupts once enabled */
    movl    $0x1ff, (%rax)
    mov     common(%rip), %rbx
    movb    $0, 0x14(%rbx)           /* reset */
    movb    $3, 0x14(%rbx)           /* ACKNOWLEDGE | DRIVER */
    movl    $1, 0x08(%rbx)           /* driver features, high word: */
    movl    $1, 0x0c(%rbx)           /*   VERSION_1 */
    movl    $0, 0x08(%rbx)
    movl    $0, 0x0c(%rbx)
    movb    $11, 0x14(%rbx)          /* | FEATURES_OK */
    testb   $8, 0x14(%rbx)
    jz      broken
    movw    $0, 0x16(%rbx)           /* queue 0 */
    movw    $QSIZE, 0x18(%rbx)
    movw    $0, 0x1a(%rbx)           /* its MSI-X vector: 0 */
    movl    $DESC, 0x20(%rbx)
    movl    $0, 0x24(%rbx)
    movl    $AVAIL, 0x28(%rbx)
    movl    $0, 0x2c(%rbx)
    movl    $USED, 0x30(%rbx)
    movl    $0, 0x34(%rbx)
    movzwl  0x1e(%rbx), %eax         /* queue_notify_off */
    imul    notify_mult(%rip), %eax
    add     notify_base(%rip), %rax
    mov     %rax, notify_addr(%rip)
    movw    $1, 0x1c(%rbx)           /* enable */
    movb    $15, 0x14(%rbx)          /* | DRIVER_OK */
    mov     devcfg(%rip), %rax
    mov     (%rax), %rax             /* capacity in sectors */
    jmp     disk_ready

/* ---- virtio-mmio setup (%rbx = its window) --------------------------- */
mmio_init:
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
    lea     0x50(%rbx), %rax
    mov     %rax, notify_addr(%rip)
    lea     mmio_found(%rip), %rsi
    call    puts
    mov     0x100(%rbx), %rax        /* capacity in sectors */

/* Common to both transports: %rax = capacity in sectors. Returns 1. */
disk_ready:
    movw    $0, AVAIL                /* flags */
    movw    $0, AVAIL+2              /* idx */
    movw    $0, USED+2
    xor     %r15, %r15               /* requests submitted */
    shr     $3, %rax                 /* in 4 KiB chunks */
    mov     %rax, %r14
    lea     found(%rip), %rsi
    call    puts
    mov     %r14, %rax
    shl     $2, %rax                 /* KiB */
    call    putdec
    lea     kib(%rip), %rsi
    call    puts
    mov     $1, %eax
    ret

broken:
    lea     nodev(%rip), %rsi
    call    puts
    xor     %eax, %eax
    ret

/* After the first requests on PCI: did MSI-X vector 0 reach the APIC? */
check_msix:
    cmpb    $1, is_pci(%rip)
    jne     1f
    movb    $2, is_pci(%rip)         /* once */
    mov     $0xfee00220, %eax        /* IRR bits 64..95 */
    testl   $1, (%rax)               /* vector 0x40 */
    lea     msix_yes(%rip), %rsi
    jnz     2f
    lea     msix_no(%rip), %rsi
2:  jmp     puts
1:  ret

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
    call    check_msix
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
    mov     notify_addr(%rip), %rdx  /* notify queue 0 */
    cmpb    $0, is_pci(%rip)
    je      3f
    movw    $0, (%rdx)               /* virtio-pci: 16-bit queue index */
    jmp     2f
3:  movl    $0, (%rdx)               /* virtio-mmio: 32-bit register */
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
pci_found:
    .asciz  "vmm-reference guest: virtio-blk-pci in slot "
mmio_found:
    .asciz  "vmm-reference guest: virtio-blk on virtio-mmio at 0xd0000000\n"
msix_yes:
    .asciz  "vmm-reference guest: MSI-X interrupt delivered to the local APIC\n"
msix_no:
    .asciz  "vmm-reference guest: no MSI-X interrupt reached the local APIC\n"
    .balign 8
common:
    .quad   0
devcfg:
    .quad   0
notify_base:
    .quad   0
notify_addr:
    .quad   0
msix_table:
    .quad   0
notify_mult:
    .long   0
msix_cap:
    .long   0
is_pci:
    .byte   0
digits:
    .space  20
digits_end:
    .byte   0
