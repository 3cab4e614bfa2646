#!/usr/bin/env bash
# The README's main job: builds the reference VMM, starts it with a QMP
# socket, and runs a QMP session against it with QEMU's own qmp-shell.
#
# The VMM cannot run a guest yet (that arrives with the VMM issue); until
# then it runs as a storage/management daemon (--no-guest), which is what
# exists today.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c 'import qemu.qmp' 2>/dev/null || python3 -m pip install -q qemu.qmp
cargo build --release -q -p vmm-reference

dir=$(mktemp -d)
trap 'kill "$vmm" 2>/dev/null || true; rm -rf "$dir"' EXIT
sock="$dir/qmp.sock"

echo "+ vmm-reference --no-guest --name demo --qmp unix:$sock"
./target/release/vmm-reference --no-guest --name demo --qmp "unix:$sock" &
vmm=$!
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done

echo "+ qmp-shell -v -p $sock   (QEMU's interactive QMP shell, fed from a script)"
printf '%s\n' \
    'query-version' \
    'query-status' \
    'query-name' \
    'query-status bogus=1' \
    'quit' | qmp-shell -v -p "$sock"

wait "$vmm"
echo "+ vmm-reference exited with status $? and removed its socket: $([ -e "$sock" ] && echo no || echo yes)"
