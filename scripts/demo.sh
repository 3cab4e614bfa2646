#!/usr/bin/env bash
# The README's main job: builds the reference VMM and vmm-img, creates a
# qcow2 disk, boots the embedded default guest on KVM with that disk as
# virtio-blk (through the block graph) and its serial console on a
# ring-buffer chardev, and plays a QMP session with QEMU's own qmp-shell:
# the guest's console (it writes and checks patterns over the disk), the
# block device and its I/O statistics, stop (the vCPUs park, the console
# stays silent), cont, then quit; qemu-img check judges the image after.
#
# Without /dev/kvm the demo runs the VMM without a guest (--no-guest).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c 'import qemu.qmp' 2>/dev/null || python3 -m pip install -q qemu.qmp
cargo build --release -q -p vmm-reference -p vmm-img

dir=$(mktemp -d)
trap 'kill "$vmm" 2>/dev/null || true; rm -rf "$dir"' EXIT
sock="$dir/qmp.sock"
disk="$dir/disk.qcow2"

echo "+ vmm-img create -f qcow2 $disk 4M"
./target/release/vmm-img create -f qcow2 "$disk" 4M
blockdev="driver=qcow2,node-name=disk0,file.driver=file,file.filename=$disk"
if [ -w /dev/kvm ]; then
    guest=(-m 64M --blockdev "$blockdev" --device virtio-blk,drive=disk0,id=vd0
           --chardev ringbuf,id=console,size=65536 --serial chardev:console)
else
    echo "note: /dev/kvm is not usable here: running without a guest"
    guest=(--no-guest --blockdev "$blockdev" --chardev ringbuf,id=console,size=65536)
fi
echo "+ vmm-reference ${guest[*]} --name demo --qmp unix:$sock"
./target/release/vmm-reference "${guest[@]}" --name demo --qmp "unix:$sock" &
vmm=$!
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
sleep 3   # let the guest work on its disk for a moment

echo "+ qmp-shell -v -p $sock   (QEMU's interactive QMP shell, fed from a script)"
printf '%s\n' \
    'query-version' \
    'query-status' \
    'ringbuf-read device=console size=400' \
    'query-block' \
    'query-blockstats' \
    'query-cpus-fast' \
    'stop' \
    'query-status' \
    'ringbuf-read device=console size=400' \
    'cont' \
    'query-status bogus=1' | qmp-shell -v -p "$sock"

echo "+ the console after cont, and quit, with QEMU's Python QMP client"
python3 - "$sock" <<'PY'
import asyncio, json, sys
from qemu.qmp import QMPClient

async def main():
    qmp = QMPClient("demo")
    await qmp.connect(sys.argv[1])
    await asyncio.sleep(2)
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
echo "+ qemu-img check $disk"
qemu-img check "$disk"
