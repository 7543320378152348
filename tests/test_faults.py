"""Faults, end to end through a real server and real kernels (the hardening issue's fault suite).

Every test of the fault suite carries the ``faults`` marker, here and next to the feature it tests
(``python -m pytest -m faults`` runs them all). Each checks that no other kernel's data is lost, that
no booking is left behind, and that the message says what happened.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from cells import record_of, slow_copies
from servers import api, jupyter_server, run_in_kernel

from jupyter_singularity.broker.processes import alive

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


# ---------------------------------------------------------------- kill -9 of a kernel mid-move

STATE = """
import ctypes, hashlib, os, time, torch
torch.manual_seed({seed})
xs = [torch.randn(2**20) for _ in range(12)]  # 48 MiB of "GPU" state in 12 storages

def digest():
    h = hashlib.sha256()
    for x in xs:
        h.update(ctypes.string_at(x.data_ptr(), x.numel() * x.element_size()))
    return h.hexdigest()

print(os.getpid(), digest())
"""

# Every host<->device copy of this kernel's tensor tier takes 0.25 s more, so that an offload or a
# restore of its 12 storages lasts long enough to be killed in the middle of it.
SLOW_COPIES = slow_copies(0.25)


async def _make_state(run, kernel_id: str, seed: int) -> tuple[int, str]:
    status, out, _ = await run(kernel_id, STATE.format(seed=seed))
    assert status == "ok", out
    pid, digest = out.strip().splitlines()[-1].split()
    return int(pid), digest


async def _restarted_fresh(kernel_id: str, run, get_pool, wait_for) -> dict:
    """jupyter_server restarts a killed kernel under its id: wait until it is back in the pool,
    cold and empty, and serves a cell (ending the test mid-restart would stop the server in the
    middle of it)."""

    async def probe():
        pool = await get_pool()
        record = record_of(pool, kernel_id)
        fresh = record is not None and record["state"] == "cold" and not record["host_bytes"]
        return pool if fresh else None

    await wait_for(probe, timeout=90)
    status, out, _ = await run(kernel_id, "print('back')", timeout=90)
    assert status == "ok" and "back" in out, out
    return await get_pool()


def _no_booking_leaked(pool: dict) -> None:
    for device in pool["devices"]:
        on_it = sum(k["booked_bytes"] for k in pool["kernels"] if k["device"] == device["index"])
        assert device["booked_bytes"] == on_it, pool


@pytest.mark.parametrize("when", ["offloading", "restoring"])
async def test_kill_9_of_a_kernel_in_the_middle_of_a_move(
    when, start_kernel, wait_in_pool, run, get_pool, state, wait_for, singularity_app
):
    """The killed kernel loses only its own state; the other kernel's state is intact, nothing
    stays booked, and the killed kernel's spill folder is gone."""
    victim, other = await start_kernel(), await start_kernel()
    await wait_in_pool([victim, other])
    pid, _ = await _make_state(run, victim, seed=1)
    status, out, _ = await run(victim, SLOW_COPIES)
    assert status == "ok", out

    # 2 x 48 MiB plus reserves do not fit on the 256 MiB GPU: the other kernel evicts the victim.
    if when == "offloading":
        other_cell = asyncio.ensure_future(_make_state(run, other, seed=2))
        await state(victim, "offloading", timeout=60)
        os.kill(pid, signal.SIGKILL)
        _, other_digest = await other_cell
    else:
        _, other_digest = await _make_state(run, other, seed=2)
        await state(victim, "offloaded", timeout=60)
        victim_cell = asyncio.ensure_future(run(victim, "print(digest())", timeout=20))
        await state(victim, "restoring", timeout=60)
        os.kill(pid, signal.SIGKILL)
        # Its process died: the cell never finishes (no reply comes).
        with pytest.raises((TimeoutError, ConnectionError)):
            await victim_cell

    pool = await _restarted_fresh(victim, run, get_pool, wait_for)
    _no_booking_leaked(pool)
    spill = Path(singularity_app.spill_dir) / victim
    assert not spill.exists() or not any(spill.iterdir())
    status, out, _ = await run(other, "print(digest())")
    assert status == "ok" and out.strip().splitlines()[-1] == other_digest, out
    _no_booking_leaked(await get_pool())


# ------------------------------------------------------- kill -9 of the server, then a restart


async def test_kill_9_of_the_server_with_kernels_offloaded_and_spilled_then_a_restart(tmp_path):
    """The kernels go with their server (ipykernel ends an orphaned kernel); the restarted server
    removes their spill folders and closes their records in the ledger, and works as before."""
    db, spill = tmp_path / "ledger.sqlite", tmp_path / "spill"
    settings = (f"--SingularityApp.spill_dir={spill}", "--SingularityApp.host_memory_limit=32MiB")
    with jupyter_server(tmp_path, db, *settings, devices="simulated:1x256MiB") as server:
        kernels = [
            api(server.url, "api/kernels", "POST", {"name": "python3"})["id"] for _ in range(3)
        ]
        pids = []
        for seed, kernel_id in enumerate(kernels):
            status, out = await run_in_kernel(server.url, kernel_id, STATE.format(seed=seed), 120)
            assert status == "ok", out
            pids.append(int(out.strip().splitlines()[-1].split()[0]))
        # The first two were evicted in turn; over the 32 MiB host budget, their state spilled.
        deadline = time.monotonic() + 60
        while True:
            pool = api(server.url, "singularity/api/pool")
            states = {k["kernel_id"]: k for k in pool["kernels"]}
            if all(states[k]["disk_bytes"] for k in kernels[:2]):
                break
            assert time.monotonic() < deadline, pool
            time.sleep(0.2)
        assert all(any((spill / k).iterdir()) for k in kernels[:2])

        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=30)

    # Orphaned, the kernels end by themselves (ipykernel polls its parent).
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "orphaned kernels still run"
        time.sleep(0.2)
    assert any((spill / kernels[0]).iterdir())  # the leftovers the restart must clean

    with jupyter_server(tmp_path, db, *settings, devices="simulated:1x256MiB") as server:
        assert api(server.url, "singularity/api/pool")["kernels"] == []
        # (the sweep runs as the pool starts, beside the first requests)
        deadline = time.monotonic() + 30
        while "removed the spill files" not in (log := server.log.read_text()):
            assert time.monotonic() < deadline, log
            time.sleep(0.2)
        assert "removed the spill files of 2 kernel(s) that no longer exist" in log, log
        assert "closed in the ledger" in log, log
        assert not any((spill / k).exists() for k in kernels)
        with sqlite3.connect(db) as conn:
            last = dict(
                conn.execute(
                    "SELECT kernel_id, new_state FROM state_changes WHERE id IN "
                    "(SELECT max(id) FROM state_changes GROUP BY kernel_id)"
                ).fetchall()
            )
            open_leases = conn.execute("SELECT count(*) FROM leases WHERE end IS NULL").fetchone()
        assert {last[k] for k in kernels} == {"gone"}, last
        assert open_leases == (0,)
        # And it works as before.
        kernel_id = api(server.url, "api/kernels", "POST", {"name": "python3"})["id"]
        status, out = await run_in_kernel(server.url, kernel_id, STATE.format(seed=9), 120)
        assert status == "ok", out


# ------------------------------------------------------------------------- a full spill disk


@pytest.mark.parametrize(
    "singularity_config", [{"quotas": {"default": {"host_memory": 0}}}], indirect=True
)
async def test_a_full_spill_disk_keeps_the_kernel_resident_and_says_so(
    start_kernel, wait_in_pool, run, get_pool, singularity_app
):
    """With no host memory for offloaded state, an evicted kernel's state goes straight to disk; a
    disk that takes no more (the kernel's file size limit, EFBIG: what a full disk looks like to
    the writer, and root cannot bypass it) refuses the offload: the kernel keeps its state, the
    cell that needed the room says why, and once the disk takes data again all goes on."""
    victim, other = await start_kernel(), await start_kernel()
    await wait_in_pool([victim, other])
    pid, digest = await _make_state(run, victim, seed=1)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        status, out, _ = await run(other, "%%singularity --memory 250MiB\nprint('ran')")
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))

    assert status == "error" and "ran" not in out, out
    assert "the host_memory quota of" in out and "the file size limit was reached" in out, out
    record = record_of(await get_pool(), victim)
    assert record["state"] == "resident" and record["offload_refused"], record
    assert not any((Path(singularity_app.spill_dir) / victim).glob("*"))  # no partial file
    _no_booking_leaked(await get_pool())
    status, out, _ = await run(victim, "print(digest())")
    assert status == "ok" and out.strip().splitlines()[-1] == digest, out
    # The disk takes data again: the next cell that needs the room gets it.
    status, out, _ = await run(other, "%%singularity --memory 250MiB\nprint('ran')")
    assert status == "ok" and "ran" in out, out
    status, out, _ = await run(victim, "print(digest())")
    assert status == "ok" and out.strip().splitlines()[-1] == digest, out
