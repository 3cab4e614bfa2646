#!/usr/bin/env python3
"""The whole guest scenario driven by QEMU's own Python QMP client.

Usage: guest_scenario.py SOCKET

The VMM runs the embedded guest with a virtio-blk disk and its console on a
ringbuf chardev named "con". This waits for a full pass over the disk,
stops the VM (STOP, status paused, the console silent), resumes it
(RESUME), checks the disk's statistics, resets it (RESET, the guest starts
over), and quits (SHUTDOWN). Prints OK at the end.
"""
import asyncio
import sys

from qemu.qmp import QMPClient


async def console(qmp):
    return await qmp.execute("ringbuf-read", {"device": "con", "size": 65536})


async def wait_console(qmp, text, timeout=120):
    seen = ""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while text not in seen:
        seen += await console(qmp)
        assert "MISMATCH" not in seen and "I/O error" not in seen, seen
        assert loop.time() < end, f"{text!r} never appeared:\n{seen}"
        await asyncio.sleep(0.1)
    return seen


async def main(path):
    qmp = QMPClient("guest-scenario")
    await qmp.connect(path)
    await wait_console(qmp, "pass 1 done")

    with qmp.listener(("STOP",)) as events:
        await qmp.execute("stop")
        await asyncio.wait_for(events.get(), 10)
    status = await qmp.execute("query-status")
    assert status["status"] == "paused" and not status["running"], status
    await console(qmp)
    await asyncio.sleep(0.5)
    assert await console(qmp) == "", "the guest ran while stopped"

    with qmp.listener(("RESUME",)) as events:
        await qmp.execute("cont")
        await asyncio.wait_for(events.get(), 10)
    await wait_console(qmp, "KiB written, read back and checked")

    stats = {s.get("qdev") or s.get("device"): s["stats"] for s in await qmp.execute("query-blockstats")}
    assert stats["vd0"]["wr_operations"] > 0 and stats["vd0"]["rd_operations"] > 0, stats

    with qmp.listener(("RESET",)) as events:
        await qmp.execute("system_reset")
        await asyncio.wait_for(events.get(), 10)
    await wait_console(qmp, "hello from the embedded guest")

    with qmp.listener(("SHUTDOWN",)) as events:
        await qmp.execute("quit")
        await asyncio.wait_for(events.get(), 10)
    try:
        await qmp.disconnect()
    except EOFError:
        pass  # the server closes the connection after quit, as QEMU does
    print("OK")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
