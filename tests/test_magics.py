"""``%singularity`` and its subcommands, and the live status widget, in real kernels."""

from __future__ import annotations

import asyncio
import json

import pytest
from cells import record_of

MiB = 1 << 20


@pytest.fixture
async def kernel(start_kernel, wait_in_pool) -> str:
    kernel_id = await start_kernel()
    await wait_in_pool(kernel_id)
    return kernel_id


async def magic(run, kernel_id: str, line: str) -> str:
    status, out, _ = await run(kernel_id, f"%singularity {line}".rstrip())
    assert status == "ok", out
    return out


async def test_text_subcommands_of_a_cold_kernel(kernel, run):
    out = await magic(run, kernel, "status")
    assert f"kernel {kernel}: cold (no device)" in out
    assert "GPU 0 B · host 0 B · disk 0 B" in out and "GPU-hours today" in out
    assert "queue: 0 waiting" in out

    out = await magic(run, kernel, "quota")
    for row in ("GPU-time today", "GPU memory", "resident kernels", "host memory", "priority"):
        assert row in out, out
    assert "unlimited" in out

    out = await magic(run, kernel, "devices")
    assert "GPU 0  Simulated GPU  16.0 GiB  booked 0 B (0%)" in out, out
    assert "GPU 1" in out and "(simulated devices)" in out

    out = await magic(run, kernel, "log")
    assert "transfers (this kernel process):\n  none yet" in out, out
    assert "state changes (pool ledger):" in out and "registered" in out, out

    out = await magic(run, kernel, "help")
    names = ("status", "offload", "discard", "log", "pin")
    assert all(f"%singularity {name}" in out for name in names)
    assert "%%singularity --memory SIZE" in out

    out = await magic(run, kernel, "bogus")
    assert "unknown subcommand" in out and "%singularity status" in out

    # A cold kernel has nothing to offload or restore: the broker says why.
    assert "only an idle resident kernel can be offloaded" in await magic(run, kernel, "offload")
    assert "nothing to restore" in await magic(run, kernel, "restore")
    # Nor anything damaged to discard.
    out = await magic(run, kernel, "discard")
    assert out.startswith(
        "nothing to discard: no part of this kernel's state is known to be damaged"
    )


async def test_pin_and_unpin(kernel, run, get_pool):
    out = await magic(run, kernel, "pin")
    assert "kernel pinned" in out and "never offloaded" in out
    assert record_of(await get_pool(), kernel)["pinned"] is True
    assert "· pinned" in await magic(run, kernel, "status")
    out = await magic(run, kernel, "unpin")
    assert "kernel unpinned" in out
    assert record_of(await get_pool(), kernel)["pinned"] is False


async def test_offload_and_restore_from_the_notebook(kernel, run, get_pool, state):
    status, out, _ = await run(
        kernel, "import torch\nx = torch.arange(16 * 2**20 // 4, dtype=torch.int32)\nx[-1].item()"
    )
    assert status == "ok", out
    record = record_of(await state(kernel, "resident"), kernel)
    assert record["state"] == "resident" and record["gpu_bytes"] == 16 * MiB, record

    out = await magic(run, kernel, "offload")
    assert out.startswith("offloaded 16.0 MiB to host in ") and "GB/s" in out, out
    # The kernel's reply to the broker may trail the magic's output.
    record = record_of(await state(kernel, "offloaded"), kernel)
    assert record["state"] == "offloaded" and record["host_bytes"] == 16 * MiB, record

    # Magic-only cells take no lease: asking about an offloaded kernel leaves it offloaded.
    out = await magic(run, kernel, "status")
    assert f"kernel {kernel}: offloaded (no device)" in out and "host 16.0 MiB" in out, out
    assert "last transfer: offloaded 16.0 MiB" in out
    assert "nothing to offload: this kernel is offloaded" in await magic(run, kernel, "offload")

    out = await magic(run, kernel, "restore")
    assert out.startswith("restored 16.0 MiB in ") and "GB/s" in out, out
    record = record_of(await state(kernel, "resident"), kernel)
    assert record["state"] == "resident" and record["gpu_bytes"] == 16 * MiB, record
    assert "nothing to restore" in await magic(run, kernel, "restore")
    # Nor anything damaged to discard.
    out = await magic(run, kernel, "discard")
    assert out.startswith(
        "nothing to discard: no part of this kernel's state is known to be damaged"
    )

    status, out, _ = await run(kernel, "x[-1].item(), int(x.sum())")
    assert status == "ok" and "(4194303, 8796090925056)" in out, out

    out = await magic(run, kernel, "log")
    lines = out.splitlines()
    assert lines[1].split("  ", 2)[2].startswith("restored 16.0 MiB"), out
    assert lines[2].split("  ", 2)[2].startswith("offloaded 16.0 MiB to host"), out
    assert "offloading → offloaded" in out, out


def comms(messages: list[dict], kind: str) -> list[dict]:
    return [m for m in messages if m["msg_type"] == kind]


def summary_comm(messages: list[dict]) -> dict:
    """The comm_open of the widget's summary (the HTML with the status table)."""
    for msg in comms(messages, "comm_open"):
        state = msg["content"]["data"]["state"]
        if state.get("_model_name") == "HTMLModel" and "GPU pool" in state.get("value", ""):
            return msg
    raise AssertionError(f"no status widget opened: {json.dumps(messages)[:2000]}")


def updates(messages: list[dict], comm_id: str) -> list[str]:
    return [
        m["content"]["data"]["state"]["value"]
        for m in comms(messages, "comm_msg")
        if m["content"]["comm_id"] == comm_id
        and m["content"]["data"].get("method") == "update"
        and "value" in m["content"]["data"].get("state", {})
    ]


async def test_widget_opens_and_updates_while_idle(kernel, run):
    status, _, messages = await run(kernel, "%singularity", linger=3.0)
    assert status == "ok"
    assert any(
        m["msg_type"] == "display_data"
        and "application/vnd.jupyter.widget-view+json" in m["content"]["data"]
        for m in messages
    )
    opened = summary_comm(messages)
    assert opened["content"]["target_name"] == "jupyter.widget"
    # The quota bar and the buttons are widgets of the same view.
    models = {
        m["content"]["data"]["state"].get("_model_name") for m in comms(messages, "comm_open")
    }
    assert {"FloatProgressModel", "ButtonModel", "ToggleButtonModel", "VBoxModel"} <= models

    # After the cell, while the kernel is idle, the poller sends fresh state.
    values = updates(messages, opened["content"]["comm_id"])
    assert values, "the widget was not updated while the kernel was idle"
    for field in ("state", "device", "memory", "queue", "quota", "cold", "GPU-hours today"):
        assert field in values[-1], values[-1]

    # A second update arrives about a second later, still without any cell running.
    status, _, later = await run(kernel, "1", linger=2.5)
    assert status == "ok"
    assert updates(later, opened["content"]["comm_id"])


@pytest.mark.parametrize("singularity_config", [{"devices": "simulated:1x256MiB"}], indirect=True)
async def test_widget_updates_while_a_cell_waits(
    start_kernel, wait_in_pool, run, get_pool, jp_fetch, wait_for
):
    k1, k2 = await start_kernel(), await start_kernel()
    await wait_in_pool([k1, k2])
    for kernel_id in (k1, k2):
        status, out, _ = await run(kernel_id, "import time, torch")
        assert status == "ok", out
    status, _, messages = await run(k1, "%singularity")
    comm_id = summary_comm(messages)["content"]["comm_id"]

    busy = asyncio.ensure_future(run(k2, "time.sleep(60)", timeout=90))

    async def running():
        return record_of(await get_pool(), k2)["state"] == "running"

    await wait_for(running, timeout=20)
    seen: list[dict] = []
    waiting = asyncio.ensure_future(run(k1, "print('ran')", messages=seen, timeout=60))

    async def shown_in_line():
        return next((v for v in updates(seen, comm_id) if "in line" in v), None)

    try:
        value = await wait_for(shown_in_line, timeout=15)
    except BaseException:
        print("SEEN", [(m["msg_type"], str(m["content"])[:300]) for m in seen])
        raise
    assert "1. in line" in value and "busy" in value, value

    for kernel_id in (k1, k2):
        await jp_fetch("api", "kernels", kernel_id, "interrupt", method="POST", body="")
    assert (await waiting)[0] == "error"
    assert (await busy)[0] == "error"
