#!/bin/sh
# The block-layer benchmarks of issue 5 in one go, each against its reference in the same
# run (see benches/io.rs and benches/RESULTS.md):
#   1. 4 KiB / 64 KiB, sequential / random, reads / writes, depth 1 / 32 through
#      BlockBackend -> throttle filter (no limit) -> qcow2 -> file, against the qcow2 crate
#      alone and qemu-img bench on the same image: page cache (/dev/shm) and O_DIRECT
#      (/var/tmp), medians of interleaved rounds and their ratios;
#   2. throttling accuracy at 10 MB/s and 1000 IOPS over 10 s;
#   3. peak memory of vmm-reference --no-guest and qemu-storage-daemon with 100 qcow2 nodes.
# Instructions per request without timing noise: benches/callgrind.sh (needs valgrind).
# Usage: crates/block-graph/benches/compare.sh [--quick] [--rounds N] [--qemu-aio MODE]
set -eu
cd "$(dirname "$0")/../../.."
TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --release -q -p vmm-reference
cargo bench -q -p block-graph --bench io -- "$@"
cargo bench -q -p block-graph --bench io -- --direct "$@"
cargo bench -q -p block-graph --bench io -- --throttle
cargo bench -q -p block-graph --bench io -- --mem --vmm "$TARGET/release/vmm-reference"
