#!/usr/bin/env python3
"""Start-up and idle memory of vmm-reference against QEMU 7.2's microvm.

Measured for each VMM, interleaved run after run (so that the load of the
machine weighs on both alike), medians over the runs and their ratios:

- start to QMP greeting: from just before the process is spawned until the
  greeting line has been read from the QMP Unix socket (polled every 0.5 ms);
- start to first guest serial byte: until the first byte the guest writes to
  COM1 arrives on the VMM's stdout (`-serial stdio` on both);
- idle RSS: VmRSS (and PSS) of the process one second after that byte,
  with the guest halted.

The guest is the same ELF for both (benches/pvh_hello, built here with
binutils): QEMU's microvm boots it through its qboot firmware and the PVH
note, vmm-reference loads it itself and enters it in long mode. Both get
the same memory (-m), KVM, no default devices, and one serial port. A third
row measures vmm-reference with its embedded default guest (no --kernel).

    python3 vmm-reference/benches/start_vs_microvm.py [--runs N] [--memory 128M]
        [--vmm PATH]   (default: $VMM_REFERENCE_BIN, else the static release build)
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def build_guest(out_dir):
    """Assembles and links benches/pvh_hello into out_dir/hello.elf."""
    src = os.path.join(HERE, "pvh_hello")
    obj = os.path.join(out_dir, "hello.o")
    elf = os.path.join(out_dir, "hello.elf")
    subprocess.run(["as", "--64", "-o", obj, os.path.join(src, "hello.S")], check=True)
    subprocess.run(
        ["ld", "-m", "elf_x86_64", "-nostdlib", "-static", "-z", "noseparate-code",
         "-T", os.path.join(src, "hello.ld"), "-o", elf, obj],
        check=True,
    )
    return elf


def proc_memory(pid):
    """(VmRSS, Pss) of a process in KiB."""
    rss = pss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def measure(argv, sock, timeout=20.0):
    """Spawns argv; returns (greeting s, first serial byte s, rss KiB, pss KiB)."""
    first_byte = {}
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)

    def reader():
        b = p.stdout.read(1)
        if b:
            first_byte["t"] = time.perf_counter() - t0
        # Keep draining so the guest never blocks on a full pipe.
        while p.stdout.read(4096):
            pass

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    greeting = None
    try:
        while time.perf_counter() - t0 < timeout:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(sock)
            except OSError:
                s.close()
                time.sleep(0.0005)
                continue
            line = s.makefile("rb").readline()
            greeting = time.perf_counter() - t0
            s.close()
            if b"QMP" not in line:
                raise RuntimeError(f"{argv[0]}: not a QMP greeting: {line!r}")
            break
        while "t" not in first_byte and time.perf_counter() - t0 < timeout:
            time.sleep(0.0005)
        if greeting is None or "t" not in first_byte:
            raise RuntimeError(f"{argv[0]}: no greeting or no serial byte in {timeout} s")
        time.sleep(1.0)
        rss, pss = proc_memory(p.pid)
        return greeting, first_byte["t"], rss, pss
    finally:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        th.join(1)
        if os.path.exists(sock):
            os.unlink(sock)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--memory", default="128M")
    ap.add_argument("--vmm", default=os.environ.get("VMM_REFERENCE_BIN") or os.path.join(
        ROOT, "target", "x86_64-unknown-linux-gnu", "release", "vmm-reference"))
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    a = ap.parse_args()
    for tool in (a.vmm, a.qemu):
        if not shutil.which(tool) and not os.access(tool, os.X_OK):
            sys.exit(f"start_vs_microvm: {tool} not found (build it, or pass --vmm/--qemu)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        sys.exit("start_vs_microvm: skipped: /dev/kvm is not available")

    tmp = tempfile.mkdtemp(prefix="start-vs-microvm-")
    elf = build_guest(tmp)
    sock = os.path.join(tmp, "qmp.sock")
    setups = {
        "vmm-reference (PVH hello ELF)": [
            a.vmm, "-m", a.memory, "--kernel", elf, "--serial", "stdio",
            "--qmp", f"unix:{sock}"],
        "qemu microvm (PVH hello ELF)": [
            a.qemu, "-M", "microvm", "-enable-kvm", "-m", a.memory, "-nodefaults",
            "-no-user-config", "-display", "none", "-kernel", elf, "-serial", "stdio",
            "-qmp", f"unix:{sock},server=on,wait=off"],
        "vmm-reference (embedded guest)": [
            a.vmm, "-m", a.memory, "--serial", "stdio", "--qmp", f"unix:{sock}"],
    }
    results = {name: [] for name in setups}
    for i in range(a.runs):
        # Alternate the order so that neither always runs first.
        order = list(setups) if i % 2 == 0 else list(reversed(setups))
        for name in order:
            results[name].append(measure(setups[name], sock))
    shutil.rmtree(tmp, ignore_errors=True)

    def med(name, k):
        return statistics.median(r[k] for r in results[name])

    print(f"{a.runs} runs each, interleaved; guest memory {a.memory}; medians (min..max)")
    print(f"{'':34} {'QMP greeting':>14} {'1st serial byte':>16} {'idle RSS':>10} {'idle PSS':>10}")
    for name in setups:
        g = [r[0] * 1e3 for r in results[name]]
        b = [r[1] * 1e3 for r in results[name]]
        print(f"{name:34} {med(name, 0) * 1e3:11.2f} ms {med(name, 1) * 1e3:13.2f} ms"
              f" {med(name, 2) / 1024:7.1f} MiB {med(name, 3) / 1024:7.1f} MiB"
              f"   (greeting {min(g):.2f}..{max(g):.2f}, byte {min(b):.2f}..{max(b):.2f} ms)")
    ours, qemu = "vmm-reference (PVH hello ELF)", "qemu microvm (PVH hello ELF)"
    print("ratios qemu/ours (same guest): greeting {:.1f}x, first serial byte {:.1f}x, "
          "idle RSS {:.1f}x, idle PSS {:.1f}x".format(
              med(qemu, 0) / med(ours, 0), med(qemu, 1) / med(ours, 1),
              med(qemu, 2) / med(ours, 2), med(qemu, 3) / med(ours, 3)))


if __name__ == "__main__":
    main()
