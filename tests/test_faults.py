"""Faults, end to end through a real server and real kernels (the hardening issue's fault suite).

Every test of the fault suite carries the ``faults`` marker, here and next to the feature it tests
(``python -m pytest -m faults`` runs them all). Each checks that no other kernel's data is lost, that
no booking is left behind, and that the message says what happened.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from cells import record_of

pytestmark = pytest.mark.faults

MiB = 1 << 20


@pytest.fixture
def singularity_devices() -> str:
    return "simulated:1x256MiB"


@pytest.mark.parametrize("singularity_config", [{"lease_stall_timeout": 3.0}], indirect=True)
async def test_a_stopped_lease_holder_blocks_its_gpu_only_until_it_answers(
    start_kernel, wait_in_pool, run, execute_messages, cell_text, get_pool, state, wait_for
):
    """SIGSTOP of a kernel in the middle of a GPU cell: it is shown stalled, its GPU (whose memory
    it may still write) takes no new work and the waiting cell says why; SIGCONT undoes it all."""
    holder, waiter = await start_kernel(), await start_kernel()
    await wait_in_pool([holder, waiter])
    status, out, _ = await run(holder, "import os, time, torch\nx = torch.ones(2**20)\nos.getpid()")
    assert status == "ok", out
    pid = int(out.strip().splitlines()[-1])
    await state(holder, "resident")

    long_cell = asyncio.ensure_future(
        run(holder, "time.sleep(8)\nprint('holder done', float(x.sum()))", timeout=180)
    )
    await state(holder, "running")
    os.kill(pid, signal.SIGSTOP)
    try:
        seen: list[dict] = []
        waiting_cell = asyncio.ensure_future(
            execute_messages(
                waiter,
                "import torch\ny = torch.ones(2**20)\nprint('waiter ran')",
                messages=seen,
                timeout=180,
            )
        )

        async def blocked():
            pool = await get_pool()
            record = record_of(pool, holder)
            unavailable = pool["devices"][0]["unavailable"]
            return pool if record["stalled_since"] and unavailable else None

        pool = await wait_for(blocked, timeout=90)
        reason = pool["devices"][0]["unavailable"]
        assert holder in reason and "has not answered" in reason, reason
        assert "lease_stall_timeout = 3 s" in reason, reason
        # The waiting cell's line says why it waits.
        await wait_for(
            lambda: asyncio.sleep(0, result="is unavailable" in cell_text(seen)), timeout=30
        )
        assert not waiting_cell.done(), cell_text(seen)
    finally:
        os.kill(pid, signal.SIGCONT)

    status, out, _ = await long_cell
    assert status == "ok" and "holder done 1048576.0" in out, out
    status, messages = await waiting_cell
    assert status == "ok" and "waiter ran" in cell_text(messages), cell_text(messages)

    async def recovered():
        pool = await get_pool()
        record = record_of(pool, holder)
        return (
            pool if not record["stalled_since"] and not pool["devices"][0]["unavailable"] else None
        )

    pool = await wait_for(recovered, timeout=30)
    booked = sum(k["booked_bytes"] for k in pool["kernels"] if k["device"] == 0)
    assert pool["devices"][0]["booked_bytes"] == booked
    status, out, _ = await run(holder, "print(float(x.sum()))")
    assert status == "ok" and "1048576.0" in out, out
