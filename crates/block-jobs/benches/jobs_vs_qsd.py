#!/usr/bin/env python3
"""Stream and commit throughput: vmm-reference --no-guest against qemu-storage-daemon 7.2.

A 3-deep qcow2 chain (base: --size bytes fully allocated; mid: its first half
allocated; top: 1/16 allocated inside mid's half) is copied fresh for every run; both daemons
get the same QMP sequence, interleaved round by round (ours, QEMU, ours, QEMU, ...):

  stream:       block-stream device=top (the whole chain into top), BLOCK_JOB_COMPLETED.
  commit:       block-commit top=mid (intermediate: mid into base), BLOCK_JOB_COMPLETED.
  active:       block-commit device=top (top and mid into base), BLOCK_JOB_READY,
                block-job-complete, BLOCK_JOB_COMPLETED.

Times run from the command to the last event. The result is checked with qemu-img compare
against the chain's flattened content. Prints medians and the ratio QEMU time / our time
(above 1: we are faster). Usage:

  cargo build --release -p vmm-reference
  python3 crates/block-jobs/benches/jobs_vs_qsd.py --size 1G --rounds 3
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from mirror_backup_vs_qsd import Daemon, check_vmm, common_args, parse_size, run  # noqa: E402


def make_template(d, size):
    base, mid, top = (os.path.join(d, f"{n}.qcow2") for n in ("base", "mid", "top"))
    run("qemu-img", "create", "-q", "-f", "qcow2", base, str(size))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size}", base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0xa5 0 {size // 2}", mid)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x33 {size // 4} {size // 16}", top)
    expected = os.path.join(d, "expected.raw")
    run("qemu-img", "convert", "-O", "raw", top, expected)
    return expected


def copy_chain(template, d):
    os.makedirs(d, exist_ok=True)
    paths = {}
    for n in ("base", "mid", "top"):
        p = os.path.join(d, f"{n}.qcow2")
        subprocess.run(["cp", "--reflink=auto", "--sparse=always",
                        os.path.join(template, f"{n}.qcow2"), p], check=True)
        paths[n] = p
    run("qemu-img", "rebase", "-u", "-b", paths["base"], "-F", "qcow2", paths["mid"])
    run("qemu-img", "rebase", "-u", "-b", paths["mid"], "-F", "qcow2", paths["top"])
    return paths


def one(kind, vmm, workdir, template, expected, job):
    d = os.path.join(workdir, f"run-{kind}")
    shutil.rmtree(d, ignore_errors=True)
    p = copy_chain(template, d)
    dm = Daemon(kind, vmm, workdir)
    try:
        q = dm.qmp
        q.cmd("blockdev-add", **{"driver": "qcow2", "node-name": "top",
                                 "file": {"driver": "file", "filename": p["top"]}})
        t0 = time.monotonic()
        if job == "stream":
            q.cmd("block-stream", **{"job-id": "j", "device": "top"})
        elif job == "commit":
            q.cmd("block-commit", **{"job-id": "j", "device": "top", "top": p["mid"]})
        else:
            q.cmd("block-commit", **{"job-id": "j", "device": "top"})
            q.wait_event("BLOCK_JOB_READY", "j")
            q.cmd("block-job-complete", device="j")
        ev = q.wait_event("BLOCK_JOB_COMPLETED", "j")
        dt = time.monotonic() - t0
        if "error" in ev.get("data", {}):
            raise RuntimeError(f"{kind} {job}: {ev}")
    finally:
        dm.close()
    judged = p["base"] if job == "active" else p["top"]
    if subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2",
                       expected, judged]).returncode != 0:
        raise RuntimeError(f"{kind} {job}: {judged} differs from the chain's content")
    subprocess.run(["qemu-img", "check", "-q", judged], check=True)
    shutil.rmtree(d)
    return dt


def main():
    a = common_args(__doc__, "stream,commit,active").parse_args()
    size = parse_size(a.size)
    check_vmm(a.vmm)
    # Bytes each job copies, for MB/s.
    copied = {"stream": size - size // 16, "commit": size // 2, "active": size // 2}
    with tempfile.TemporaryDirectory(dir=a.dir) as workdir:
        template = os.path.join(workdir, "template")
        os.makedirs(template)
        expected = make_template(template, size)
        results = {}
        for r in range(a.rounds):
            for job in a.jobs.split(","):
                for kind in ("ours", "qemu"):
                    dt = one(kind, a.vmm, workdir, template, expected, job)
                    results.setdefault((job, kind), []).append(dt)
                    print(f"round {r + 1} {job:6} {kind:4} {dt:7.3f} s "
                          f"{copied[job] / dt / 1e6:8.1f} MB/s", flush=True)
        print()
        print(f"{'job':8} {'ours s':>8} {'qemu s':>8} {'ours MB/s':>10} {'qemu MB/s':>10} "
              f"{'ratio':>6}")
        for job in a.jobs.split(","):
            o = statistics.median(results[(job, "ours")])
            q = statistics.median(results[(job, "qemu")])
            print(f"{job:8} {o:8.3f} {q:8.3f} {copied[job] / o / 1e6:10.1f} "
                  f"{copied[job] / q / 1e6:10.1f} {q / o:6.2f}")


if __name__ == "__main__":
    main()
