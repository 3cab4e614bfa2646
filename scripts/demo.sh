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

echo "+ vmm-reference --no-guest --name demo --chardev ringbuf,id=rb0,size=4096 --qmp unix:$sock"
./target/release/vmm-reference --no-guest --name demo --chardev ringbuf,id=rb0,size=4096 --qmp "unix:$sock" &
vmm=$!
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done

echo "+ qmp-shell -v -p $sock   (QEMU's interactive QMP shell, fed from a script)"
printf '%s\n' \
    'query-version' \
    'query-status' \
    'query-name' \
    'ringbuf-write device=rb0 data=hello-from-qmp' \
    'ringbuf-read device=rb0 size=10' \
    'query-chardev' \
    'query-status bogus=1' | qmp-shell -v -p "$sock"

echo "+ quit, with QEMU's Python QMP client listening for the SHUTDOWN event"
python3 - "$sock" <<'PY'
import asyncio, json, sys
from qemu.qmp import QMPClient

async def main():
    qmp = QMPClient("demo")
    await qmp.connect(sys.argv[1])
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
