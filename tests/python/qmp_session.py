#!/usr/bin/env python3
"""Drives vmm-reference with QEMU's own Python QMP client (PyPI qemu.qmp).

Usage: qmp_session.py SOCKET

Checks the greeting and negotiation as qemu.qmp performs them, typed
replies, error replies, query-commands against query-qmp-schema, and that
`quit` delivers SHUTDOWN before the connection closes. Prints OK at the end.
"""
import asyncio
import sys

from qemu.qmp import ExecuteError, QMPClient


def refs(entry):
    """Every type name a SchemaInfo entry refers to."""
    out = [entry[k] for k in ("arg-type", "ret-type", "element-type") if k in entry]
    for key in ("members", "variants"):
        out += [m["type"] for m in entry.get(key, []) if "type" in m]
    return out


async def main(path):
    qmp = QMPClient("e2e")
    await qmp.connect(path)
    assert "oob" in qmp.greeting.QMP.capabilities, qmp.greeting

    version = await qmp.execute("query-version")
    assert isinstance(version["qemu"]["major"], int), version
    assert version["package"].startswith("vmm-reference"), version

    status = await qmp.execute("query-status")
    assert status == {"running": True, "singlestep": False, "status": "running"}, status

    commands = {c["name"] for c in await qmp.execute("query-commands")}
    required = {"qmp_capabilities", "query-version", "query-commands",
                "query-qmp-schema", "query-status", "quit"}
    assert required <= commands, commands

    schema = await qmp.execute("query-qmp-schema")
    names = {e["name"] for e in schema}
    listed = {e["name"] for e in schema if e["meta-type"] == "command"}
    assert listed == commands, (listed ^ commands)
    for entry in schema:
        for ref in refs(entry):
            assert ref in names, (entry["name"], ref)

    try:
        await qmp.execute("no-such-command")
        raise AssertionError("unknown command accepted")
    except ExecuteError as err:
        assert err.error_class == "CommandNotFound", err.error_class
        assert str(err) == "The command no-such-command has not been found", str(err)

    try:
        await qmp.execute("query-status", {"bogus": 1})
        raise AssertionError("unexpected argument accepted")
    except ExecuteError as err:
        assert err.error_class == "GenericError"
        assert str(err) == "Parameter 'bogus' is unexpected", str(err)

    with qmp.listener(("SHUTDOWN",)) as listener:
        assert await qmp.execute("quit") == {}
        event = await asyncio.wait_for(listener.get(), 5)
        assert event["event"] == "SHUTDOWN", event
        assert set(event["timestamp"]) == {"seconds", "microseconds"}, event
    # The server closes the connection after quit, as QEMU does; qemu.qmp
    # reports that end of file when it disconnects.
    try:
        await qmp.disconnect()
    except EOFError:
        pass
    print("OK")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
