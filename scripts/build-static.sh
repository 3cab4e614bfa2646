#!/usr/bin/env bash
# Builds vmm-reference as a static executable (glibc, crt-static), the way
# to ship it: no dynamic loader work at start-up, which on this class of
# machine is a third of the time from exec to a listening QMP socket.
# The result is target/x86_64-unknown-linux-gnu/release/vmm-reference.
#
# --target is required: with crt-static on the host triple, cargo would try
# to link proc-macros statically too, which rustc refuses.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release -p vmm-reference --target x86_64-unknown-linux-gnu "$@"
echo "target/x86_64-unknown-linux-gnu/release/vmm-reference"
