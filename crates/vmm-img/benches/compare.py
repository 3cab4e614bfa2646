#!/usr/bin/env python3
"""vmm-img against qemu-img on the same 1 GiB images, in the same run.

Runs `vmm-img bench` and `qemu-img bench` with identical flags (sequential and scattered
"random" offsets, 4 KiB and 64 KiB, read and write, depth 1 and 32, cache=writeback on
/dev/shm and cache=none on a disk directory, fresh and fully allocated images), plus
`convert` qcow2->raw and raw->qcow2, and prints a Markdown table: median time of several runs,
the speed ratio (qemu time / our time: above 1 means vmm-img is faster) and the peak RSS of
each tool (from GNU time), and the CPU time (user + system) of each, which the load of a shared
machine disturbs less than the elapsed time. Runs of the two tools alternate.

qemu-img bench has no random mode: a step that is an odd number of blocks larger than the
image visits every block in a scattered order, identically for both tools.

"ours vs raw file" runs the same requests as raw I/O on the image file itself, starting where
guest offset 0 lives (the image is allocated in order): for reads on the very copy both tools
read (the same page-cache pages and disk blocks), for writes on a copy of its own made the same
way (raw writes would overwrite the metadata between the data runs). Separate copies of an
image and of a raw file differ in how fast the VM reads them by up to a half, whatever reads
them, which used to show up as qcow2 overhead. On tmpfs every run works on fresh
copies, each made right before the run that uses it (a copy made earlier than another is
slower to write into, which used to show up as qcow2 overhead too).

Usage: compare.py [--vmm-img PATH] [--runs N] [--scale K] [--quick] [--only REGEX]
                  [--disk-dir DIR] [--out FILE]
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

GIB = 1 << 30


GNU_TIME = "/usr/bin/time" if os.path.exists("/usr/bin/time") else None


CONVERT_LABELS = ("convert qcow2->raw (1 GiB, all allocated)",
                  "convert raw->qcow2 (1 GiB, all allocated)")


def summarize(samples):
    """(median seconds, max peak RSS KiB, median CPU seconds) of (secs, rss, cpu) samples."""
    return (statistics.median(s[0] for s in samples), max(s[1] for s in samples),
            statistics.median(s[2] for s in samples))


def run(cmd):
    """Runs cmd, returns (seconds from 'Run completed' or wall time, peak RSS KiB, CPU seconds).

    Peak RSS comes from GNU time (%M): wait4 on a child forked from Python would report
    Python's own RSS as a floor.
    """
    rss_file = "/tmp/vmm-img-bench-rss"
    full = [GNU_TIME, "-f", "%M %U %S", "-o", rss_file] + cmd if GNU_TIME else cmd
    start = time.monotonic()
    p = subprocess.run(full, capture_output=True, text=True)
    wall = time.monotonic() - start
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stdout}{p.stderr}")
    secs = wall
    for line in p.stdout.splitlines():
        if line.startswith("Run completed in"):
            secs = float(line.split()[3])
    rss, cpu = 0, 0.0
    if GNU_TIME:
        with open(rss_file) as f:
            m, u, s = f.read().strip().splitlines()[-1].split()
            rss, cpu = int(m), float(u) + float(s)
    return secs, rss, cpu


def make_images(d, fmt_template):
    os.makedirs(d, exist_ok=True)
    fresh = os.path.join(d, "fresh.qcow2")
    full = os.path.join(d, "full.qcow2")
    raw = os.path.join(d, "full.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", fresh, "1G"], check=True)
    shutil.copy(fresh, full)
    # Allocate every cluster (written by qemu-img, so neither tool gets a head start).
    subprocess.run(["qemu-img", "bench", "-q", "-w", "-c", "16384", "-s", "64k",
                    "--pattern=165", full], check=True)
    subprocess.run(["qemu-img", "convert", "-O", "raw", full, raw], check=True)
    return fresh, full, raw


def bench_case(entries, workdir, args, runs, copy_each, sync_copies):
    """Median seconds, max RSS and median CPU per entry for one configuration.

    entries: (name, exe, image, extra args, copy): the entry runs on the copy of `image`
    named `copy` (its own name, or a name shared with other entries, which then run on the
    same file). Runs alternate between the entries, the first entry changing every run, so
    load changes hit all alike. With copy_each, every run works on fresh copies, each made
    right before the first run that uses it: two copies of one image made one after the
    other are not equally fast to write (the one made first took 5 % to 13 % longer for the
    same raw 64 KiB writes in place on tmpfs, whichever ran first), so every run gets the
    same kind of copy, a fresh one.
    """
    samples = {e[0]: [] for e in entries}
    owners = {}
    for name, _, _, _, copy in entries:
        owners.setdefault(copy, []).append(name)
    for i in range(runs):
        order = entries[i % len(entries):] + entries[:i % len(entries)]
        made = set()
        left = {copy: len(names) for copy, names in owners.items()}
        for name, exe, src, extra, copy in order:
            img = os.path.join(workdir, f"run-{copy}.img")
            if copy not in made and (copy_each or not os.path.exists(img)):
                if os.path.exists(img):
                    os.unlink(img)
                shutil.copy(src, img)
                # Write disk copies back now: their writeback would otherwise slow down the
                # run (by up to 3x with O_DIRECT on a shared disk).
                if sync_copies:
                    os.sync()
            made.add(copy)
            # Both tools report the time of the request loop ("Run completed in").
            samples[name].append(run([exe, "bench"] + extra + args + [img]))
            left[copy] -= 1
            if copy_each and left[copy] == 0:
                os.unlink(img)
    for f in os.listdir(workdir):
        if f.startswith("run-"):
            os.unlink(os.path.join(workdir, f))
    return {name: summarize(v) for name, v in samples.items()}


def data_offset(img):
    """Host offset of guest offset 0 in a fully allocated qcow2 image."""
    out = subprocess.run(["qemu-img", "map", "--output=json", img], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)[0]["offset"]


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    default_exe = os.path.join(here, "..", "..", "..", "target", "release", "vmm-img")
    ap.add_argument("--vmm-img", default=os.environ.get("VMM_IMG", default_exe))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer requests, fewer cases")
    ap.add_argument("--scale", type=int, default=1,
                    help="multiply the request counts (longer loops, steadier numbers)")
    ap.add_argument("--shm-dir", default="/dev/shm/vmm-img-bench")
    ap.add_argument("--disk-dir", default="/var/tmp/vmm-img-bench")
    ap.add_argument("--direct-shm", action="store_true",
                    help="also run the cache=none cases on /dev/shm (tmpfs takes O_DIRECT "
                         "since Linux 6.6): the tools' own cost without the disk's noise")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None,
                    help="run only the cases whose label matches this regular expression")
    a = ap.parse_args()
    only = re.compile(a.only) if a.only else None
    wanted = lambda label: only is None or only.search(label) is not None
    if not os.path.exists(a.vmm_img):
        sys.exit(f"vmm-img not found at {a.vmm_img}: build with cargo build --release -p vmm-img")
    tools = [("vmm-img", a.vmm_img), ("qemu-img", "qemu-img")]
    rows = []
    load_start = os.getloadavg()
    print("load average at start: %.2f %.2f %.2f" % load_start, flush=True)
    scale = 4 if a.quick else 1

    locations = [("writeback", a.shm_dir, ""), ("none", a.disk_dir, "")]
    if a.direct_shm:
        locations.append(("none", a.shm_dir, " (tmpfs)"))
    for cache, d, where in locations:
        labels = [f"{k} {p} {s} QD{q} cache={cache}{where}"
                  for k in ("read", "write-fresh", "write-alloc")
                  for p in ("seq", "rand") for s in ("4k", "64k") for q in (1, 32)]
        if cache == "writeback":
            labels += CONVERT_LABELS
        if not any(wanted(lb) for lb in labels):
            continue
        fresh, full, raw = make_images(d, None)
        data_off = data_offset(full)
        for size in ("4k", "64k"):
            bs = 4096 if size == "4k" else 65536
            blocks = GIB // bs
            # Odd stride coprime with the block count, larger than the image.
            rand_step = bs * (blocks + (100003 if size == "4k" else 8193))
            for pattern, step in (("seq", bs), ("rand", rand_step)):
                for depth in (1, 32):
                    base = 20000 if size == "4k" else 4000
                    if cache == "none" and depth == 1:
                        base //= 4
                    count = max(base * a.scale // scale, 500)
                    for kind in ("read", "write-fresh", "write-alloc"):
                        if a.quick and pattern == "rand" and depth == 1:
                            continue
                        label = f"{kind} {pattern} {size} QD{depth} cache={cache}{where}"
                        if not wanted(label):
                            continue
                        src = fresh if kind == "write-fresh" else full
                        args = ["-c", str(count), "-d", str(depth), "-s", size,
                                "-S", str(step), "-t", cache]
                        if kind != "read":
                            args += ["-w", "--pattern=90"]
                        raw_args = ["-f", "raw", "-o", str(data_off)]
                        if kind == "read":
                            # Every reader reads the same copy; the raw reference the same
                            # requests as raw I/O from where guest offset 0 lives: the same
                            # page-cache pages and disk blocks, without the format.
                            entries = [(name, exe, src, [], "read") for name, exe in tools]
                            entries.append(("raw", a.vmm_img, src, raw_args, "read"))
                        else:
                            entries = [(name, exe, src, [], name) for name, exe in tools]
                        if kind == "write-alloc":
                            # Raw writes would overwrite the image's metadata between its
                            # data runs: they go to their own copy of the same image file.
                            entries.append(("raw", a.vmm_img, src, raw_args, "raw"))
                        r = bench_case(entries, d, args, a.runs,
                                       copy_each=(kind == "write-fresh" or d == a.shm_dir),
                                       sync_copies=(d == a.disk_dir))
                        raw_t = r.get("raw")
                        rows.append((label, count, r, raw_t))
                        print(fmt_row(rows[-1]), flush=True)
        # convert, page cache only.
        if cache == "writeback":
            for label, src, ofmt in zip(CONVERT_LABELS, (full, raw), ("raw", "qcow2")):
                if not wanted(label):
                    continue
                samples = {name: [] for name, _ in tools}
                # Runs alternate between the tools, the first one changing every run, so load
                # changes hit both alike; twice as many as for bench (a convert is short, its
                # time moves with the load).
                for i in range(2 * a.runs):
                    for name, exe in (tools if i % 2 == 0 else tools[::-1]):
                        dst = os.path.join(d, "conv.out")
                        if os.path.exists(dst):
                            os.unlink(dst)
                        samples[name].append(run([exe, "convert", "-O", ofmt, src, dst]))
                res = {name: summarize(v) for name, v in samples.items()}
                rows.append((label, 1, res, None))
                print(fmt_row(rows[-1]), flush=True)
        shutil.rmtree(d, ignore_errors=True)

    table = ["| case | requests | vmm-img s | qemu-img s | speedup (qemu/ours) | "
             "ours vs raw file | vmm-img peak RSS | qemu-img peak RSS | CPU s ours / qemu |",
             "|---|---|---|---|---|---|---|---|---|"]
    table += [fmt_row(r) for r in rows]
    load_end = os.getloadavg()
    table.append("")
    table.append("Load average (1, 5, 15 min) at start: %.2f %.2f %.2f, at end: %.2f %.2f %.2f"
                 % (load_start + load_end))
    text = "\n".join(table)
    print()
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


def fmt_row(r):
    label, count, res, raw_t = r
    ours, om, oc = res["vmm-img"]
    theirs, qm, qc = res["qemu-img"]
    ratio = theirs / ours if ours > 0 else float("inf")
    vs_raw = (f"{ours / raw_t[0]:.2f}x time, {oc / raw_t[2]:.2f}x CPU"
              if raw_t else "-")
    return (f"| {label} | {count} | {ours:.3f} | {theirs:.3f} | {ratio:.2f} | {vs_raw} | "
            f"{om / 1024:.1f} MiB | {qm / 1024:.1f} MiB | {oc:.2f} / {qc:.2f} |")


if __name__ == "__main__":
    main()
