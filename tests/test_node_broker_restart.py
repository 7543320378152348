"""The node broker goes away and comes back: kill -9 and a restart, or not there when a server
starts. Real processes: ``jupyter singularity broker``, a ``jupyter server`` joining it, ipykernel
kernels with known tensors on one small simulated GPU.

Kernels of a node broker never give up on it: their state stays in their own memory and spill
files, a cell that needs the GPU waits (saying why) while the broker is away, and when it is back
each kernel rejoins it with what it holds; the broker rebuilds its bookings from that.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import urllib.request
from pathlib import Path

import pytest
from cells import cell_messages, cell_text, kernel_websocket, record_of, tensor_state, wait_for
from servers import TOKEN, api, jupyter_server, node_broker

from jupyter_singularity.server import node_pool
from jupyter_singularity.server.node_pool import NodePool

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900)]

MiB = 1 << 20
AWAY = "the GPU pool's broker is not answering"

# 48 MiB of "GPU" state in 12 storages, and a digest of every byte of it.
STORAGES = 12


class Kernels:
    """Kernels of one server, cells run over their websockets as JupyterLab runs them."""

    def __init__(self, url: str) -> None:
        self.url = url

    def start(self) -> str:
        return api(self.url, "api/kernels", "POST", {"name": "python3"})["id"]

    async def cell(self, kernel_id: str, code: str, seen: list | None = None, timeout=240.0):
        ws_url = self.url.replace("http", "ws", 1) + f"api/kernels/{kernel_id}/channels"
        ws = await kernel_websocket(ws_url, TOKEN)
        try:
            status, messages = await cell_messages(ws, code, timeout, messages=seen)
        finally:
            ws.close()
        return status, cell_text(messages)

    def shut_down(self, kernel_id: str) -> None:
        request = urllib.request.Request(
            self.url + f"api/kernels/{kernel_id}",
            method="DELETE",
            headers={"Authorization": f"token {TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 204

    def pool(self) -> dict:
        return api(self.url, "singularity/api/pool")

    async def settled(self) -> dict:
        """The pool once no kernel holds a lease (the last cell's kernel keeps its lease a
        moment after the cell, for a next one: ``lease_keep``)."""

        async def probe():
            pool = self.pool()
            return pool if all(k["state"] != "running" for k in pool["kernels"]) else None

        return await wait_for(probe, timeout=120.0, interval=0.25)

    async def state(self, kernel_id: str, *states: str) -> dict:
        async def probe():
            pool = self.pool()
            record = record_of(pool, kernel_id)
            return pool if record is not None and record["state"] in states else None

        return await wait_for(probe, timeout=120.0, interval=0.25)


async def shows_the_away_line(seen: list[dict], *waiting: asyncio.Future, timeout=90.0) -> None:
    """The cell whose messages are ``seen`` says it waits for the broker, and every cell of
    ``waiting`` is still waiting (none failed or ran without the pool)."""

    async def probe():
        for cell in waiting:
            if cell.done():
                pytest.fail(f"a cell stopped waiting for the broker: {cell.result()}")
        return AWAY in cell_text(seen)

    await wait_for(probe, timeout)


def digest_of(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("digest ")]
    assert lines, text
    return lines[-1].split()[1]


def check_bookings(pool: dict) -> None:
    """The devices' bookings are their kernels' and fit the device."""
    for device in pool["devices"]:
        mine = [k for k in pool["kernels"] if k["device"] == device["index"]]
        assert device["booked_bytes"] == sum(k["booked_bytes"] for k in mine), pool
        assert device["booked_bytes"] <= device["total_bytes"], pool


async def test_kill_9_of_the_node_broker_loses_nothing_and_waiting_cells_run(tmp_path: Path):
    """Three kernels on a 64 MiB GPU (one spilled, one offloaded to host memory, one running a
    long cell) and a cell waiting for the GPU: kill -9 of the broker, a cell started while it is
    away, a restart. Every kernel's state is intact, the pool shows them again as they are, both
    waiting cells run, and the ledger closed the dead run's records."""
    with (
        node_broker(
            tmp_path, "--SingularityBroker.host_memory_limit=48MiB", devices="simulated:1x64MiB"
        ) as broker,
        jupyter_server(
            tmp_path,
            tmp_path / "server-ledger.sqlite",
            f"--SingularityApp.broker_url=unix://{broker.socket}",
        ) as server,
    ):
        kernels = Kernels(server.url)
        in_host, on_disk, runner = (kernels.start() for _ in range(3))
        digests = {}
        for seed, kernel_id in enumerate((in_host, on_disk, runner)):
            status, text = await kernels.cell(kernel_id, tensor_state(seed, STORAGES))
            assert status == "ok", text
            digests[kernel_id] = digest_of(text)
        # Each cell evicted the kernel before it: the first went to host memory, which its state
        # fills, so the second went to disk.
        await kernels.state(in_host, "offloaded")
        await kernels.state(on_disk, "spilled")
        spill_files = sorted(p.name for p in (broker.spill / on_disk).iterdir())
        assert spill_files, "the spilled kernel has no spill files"

        long_cell = asyncio.ensure_future(
            kernels.cell(runner, "import time\ntime.sleep(25)\nprint('runner', digest())")
        )
        await kernels.state(runner, "running")
        waited: list[dict] = []
        waiting_cell = asyncio.ensure_future(
            kernels.cell(in_host, "print('waited', digest())", seen=waited)
        )
        await kernels.state(in_host, "queued")

        broker.kill()
        started = time.monotonic()
        # The state lives in the kernels: their spill files stay.
        assert sorted(p.name for p in (broker.spill / on_disk).iterdir()) == spill_files
        away: list[dict] = []
        away_cell = asyncio.ensure_future(
            kernels.cell(on_disk, "print('while away', digest())", seen=away)
        )
        await shows_the_away_line(away, away_cell, waiting_cell, long_cell)
        assert "interrupt the kernel to stop waiting" in cell_text(away)

        broker.start()
        pool = await wait_for(
            lambda: asyncio.sleep(0, result=len(kernels.pool()["kernels"]) == 3 and kernels.pool()),
            timeout=120.0,
        )
        assert time.monotonic() - started < 25, "the long cell ended before the restart"
        status, text = await long_cell
        assert status == "ok" and f"runner {digests[runner]}" in text, text
        status, text = await waiting_cell
        assert status == "ok" and f"waited {digests[in_host]}" in text, text
        status, text = await away_cell
        assert status == "ok" and f"while away {digests[on_disk]}" in text, text
        # No cell saw a failure.
        assert "stopped answering" not in cell_text(waited) + cell_text(away)

        pool = await kernels.settled()
        check_bookings(pool)
        states = {k["kernel_id"]: k["state"] for k in pool["kernels"]}
        assert set(states) == {in_host, on_disk, runner}, states
        # The last of them to run is on the GPU; the others wait off it.
        assert sorted(states.values()).count("resident") == 1, states
        for kernel_id in (in_host, on_disk, runner):
            status, text = await kernels.cell(kernel_id, "print('again', digest())")
            assert status == "ok" and f"again {digests[kernel_id]}" in text, text
        check_bookings(kernels.pool())
        elapsed = time.monotonic() - started

    # The ledger: the dead run's kernels were closed at the restart, then joined the new run.
    with sqlite3.connect(broker.ledger) as db:
        reasons = [
            row[0]
            for row in db.execute(
                "SELECT reason FROM state_changes WHERE kernel_id = ? ORDER BY id", (runner,)
            )
        ]
        leases = db.execute("SELECT start, end, gpu_seconds FROM leases").fetchall()
    assert any("stopped without ending it" in r for r in reasons), reasons
    assert "rejoined after a broker restart" in reasons, reasons
    assert leases and all(end is not None and secs >= 0 for _, end, secs in leases), leases
    # GPU time since the kill: no more than the cells held the GPU for (each ran in turn).
    since_kill = sum(secs for start, _, secs in leases if start >= time.time() - elapsed - 60)
    assert since_kill <= elapsed, leases


async def test_a_server_started_while_the_node_broker_is_down_waits_for_it(tmp_path: Path):
    """The broker is not there when the server starts: the server starts and says why in one
    line, a kernel starts, its GPU cell waits with a clear line, and runs once the broker is
    started."""
    with (
        node_broker(tmp_path, devices="simulated:1x64MiB", start=False) as broker,
        jupyter_server(
            tmp_path,
            tmp_path / "server-ledger.sqlite",
            f"--SingularityApp.broker_url=unix://{broker.socket}",
            ready="api/status",
        ) as server,
    ):

        async def said_why():
            lines = [line for line in server.log.read_text().splitlines() if "reached" in line]
            return lines or None

        lines = await wait_for(said_why, timeout=60)
        assert len(lines) == 1 and "cannot be reached" in lines[0], lines
        assert "GPU cells wait for it" in lines[0], lines
        kernels = Kernels(server.url)
        kernel_id, shut_down = kernels.start(), kernels.start()
        kernels.shut_down(shut_down)
        seen: list[dict] = []
        cell = asyncio.ensure_future(kernels.cell(kernel_id, tensor_state(7, STORAGES), seen=seen))
        await shows_the_away_line(seen, cell)

        broker.start()
        status, text = await cell
        assert status == "ok", text
        digest = digest_of(text)
        pool = await kernels.state(kernel_id, "resident")
        check_bookings(pool)
        # The kernel shut down meanwhile was not registered with the broker once it answered.
        assert [k["kernel_id"] for k in pool["kernels"]] == [kernel_id], pool
        assert record_of(pool, kernel_id)["gpu_bytes"] >= 48 * MiB, pool
        status, text = await kernels.cell(kernel_id, "print('digest', digest())")
        assert status == "ok" and digest_of(text) == digest, text


async def test_a_server_registers_its_kernels_again_as_soon_as_the_broker_is_back(
    tmp_path: Path, monkeypatch
):
    """The server hears the restarted broker when its connection is made again, not at its next
    heartbeat (maybe after a question lost with the old run): its kernels' messages wait in the
    new run for that registration."""
    monkeypatch.setattr(node_pool, "HEARTBEAT", 600.0)
    with node_broker(tmp_path) as broker:
        pool = NodePool(broker.socket, logging.getLogger("test.node_pool"))
        await pool.start()
        try:
            await pool.call("register_kernel", kernel_id="k1", notebook="a.ipynb")
            await pool.call("kernel_started", kernel_id="k1", pid=None)
            first = pool.instance
            assert first is not None
            broker.kill()
            await asyncio.to_thread(broker.start)

            async def joined_again():
                return pool.instance not in (None, first)

            await wait_for(joined_again, timeout=60)
            kernels = (await pool.call("pool"))["kernels"]
            assert [(k["kernel_id"], k["notebook"]) for k in kernels] == [("k1", "a.ipynb")]
        finally:
            await pool.stop()
