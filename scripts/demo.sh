#!/usr/bin/env bash
# The README's main job: builds the reference VMM, boots its embedded
# default guest on KVM with the guest's serial console on a ring-buffer
# chardev and a QMP socket, and plays a QMP session against it with QEMU's
# own qmp-shell: the console read over QMP, stop (the vCPUs park and the
# console stays silent), cont, the vCPUs, then quit.
#
# The virtio-blk qcow2 disk joins when the block graph lands; without
# /dev/kvm the demo runs the VMM without a guest (--no-guest).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c 'import qemu.qmp' 2>/dev/null || python3 -m pip install -q qemu.qmp
cargo build --release -q -p vmm-reference

dir=$(mktemp -d)
trap 'kill "$vmm" 2>/dev/null || true; rm -rf "$dir"' EXIT
sock="$dir/qmp.sock"

if [ -w /dev/kvm ]; then
    guest=(-m 64M --chardev ringbuf,id=console,size=65536 --serial chardev:console)
else
    echo "note: /dev/kvm is not usable here: running without a guest"
    guest=(--no-guest --chardev ringbuf,id=console,size=65536)
fi
echo "+ vmm-reference ${guest[*]} --name demo --qmp unix:$sock"
./target/release/vmm-reference "${guest[@]}" --name demo --qmp "unix:$sock" &
vmm=$!
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
sleep 1   # let the guest print a few lines

echo "+ qmp-shell -v -p $sock   (QEMU's interactive QMP shell, fed from a script)"
printf '%s\n' \
    'query-version' \
    'query-status' \
    'ringbuf-read device=console size=300' \
    'query-cpus-fast' \
    'stop' \
    'query-status' \
    'ringbuf-read device=console size=300' \
    'cont' \
    'query-status bogus=1' | qmp-shell -v -p "$sock"

echo "+ the console after cont, and quit, with QEMU's Python QMP client"
python3 - "$sock" <<'PY'
import asyncio, json, sys
from qemu.qmp import QMPClient

async def main():
    qmp = QMPClient("demo")
    await qmp.connect(sys.argv[1])
    await asyncio.sleep(0.5)
    print(await qmp.execute("ringbuf-read", {"device": "console", "size": 300}), end="")
    with qmp.listener(("SHUTDOWN",)) as events:
        print("-> quit  <-", json.dumps(await qmp.execute("quit")))
        print("<- event", json.dumps(dict(await events.get())))
    try:
        await qmp.disconnect()
    except EOFError:
        pass  # the server closes the connection after quit, as QEMU does

asyncio.run(main())
PY

wait "$vmm"
echo "+ vmm-reference exited with status $? and removed its socket: $([ -e "$sock" ] && echo no || echo yes)"
