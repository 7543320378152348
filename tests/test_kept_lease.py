"""A lease kept between cells (``lease_keep``): back-to-back cells share one, the broker asks it
back as soon as another request waits or an offload is asked for, and what the kernel kept after
its last cell is not charged.

The broker's side and the kernel runtime's run over the real channel (``service``, ``pooled``:
tests/broker_service.py), the runtime driven as IPython drives it (the gate at the top of a cell,
``post_execute`` at its end); the last tests run real kernels through a real server.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
from broker_service import GiB, call, wait_until

from jupyter_singularity.broker.model import Policy
from jupyter_singularity.kernel import kept_lease
from jupyter_singularity.kernel.client import BrokerError
from jupyter_singularity.kernel.runtime import Runtime

pytestmark = pytest.mark.timeout(120)

KEEP = 0.5
WHOLE = {"memory": 16 * GiB}


def runtime_of(client) -> Runtime:
    """The kernel runtime of a GPU-using kernel on ``client`` (its pushes answered as in a kernel)."""
    runtime = Runtime(client, simulated=True)
    runtime.gpu_used = True
    client.on("lease_wanted", runtime.on_lease_wanted)
    client.on("offload", lambda body: {"host_bytes": 0, "gpu_bytes": 0})
    return runtime


async def cell(runtime: Runtime, line: str | None = None) -> None:
    """One cell's gate and end, as IPython runs them (the gate may wait for the broker)."""
    await asyncio.to_thread(runtime.gate_cell, line)
    runtime._post_execute()


def never_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept leases are given back only when the broker asks: a test then cannot pass by the
    window ending meanwhile."""
    monkeypatch.setattr(kept_lease.Keeper, "arm", lambda self, deadline: None)


@pytest.mark.parametrize("service", [Policy(lease_keep=KEEP)], indirect=True)
async def test_back_to_back_cells_share_a_lease_charged_to_the_end_of_the_last(
    service, pooled
) -> None:
    runtime = runtime_of(await pooled("k0"))
    began = time.time()
    await cell(runtime)
    lease = runtime.lease
    assert lease is not None and lease.keep == KEEP and lease.kept_at is not None
    assert service.kernel("k0")["state"] == "running"  # (kept: no other kernel waits)
    for _ in range(3):
        await cell(runtime)  # taken over at its gate, without a message
        assert runtime.lease is lease
    last_ended = time.time()
    await wait_until(lambda: service.kernel("k0")["state"] == "resident", timeout=10)
    assert runtime.lease is None
    (row,) = service.ledger.leases(since=began - 1, until=time.time() + 1)
    assert row["lease_id"] == f"k0:{lease.request_id}"
    # Charged from its grant to the end of its last cell, not the KEEP seconds kept after it.
    assert 0 <= row["gpu_seconds"] <= last_ended - began + 0.05, (row, last_ended - began)


@pytest.mark.parametrize("service", [Policy(lease_keep=KEEP)], indirect=True)
async def test_a_waiting_request_gets_a_kept_lease_back_at_once(
    service, pooled, monkeypatch
) -> None:
    never_expires(monkeypatch)
    keeper = runtime_of(await pooled("k0"))
    other = await pooled("k1")
    await cell(keeper, "--memory 16GiB")
    assert keeper.lease is not None and keeper.lease.kept_at is not None
    granted = await call(other, "acquire", {"request_id": "r1", **WHOLE}, 20)
    assert granted["granted"], granted
    assert keeper.lease is None
    assert granted["keep_seconds"] == KEEP  # (nobody waits behind it)
    # Asked back while its cell runs, a lease is given back when the cell ends.
    other.send("release", {"request_id": "r1", "peak_bytes": GiB, "gpu_bytes": 0})
    await wait_until(lambda: service.kernel("k1")["state"] == "resident")
    await asyncio.to_thread(keeper.gate_cell, None)
    assert keeper.lease is not None and keeper.lease.keep == KEEP
    waiting = asyncio.ensure_future(call(other, "acquire", {"request_id": "r2", **WHOLE}, 20))
    await wait_until(lambda: keeper.lease is not None and keeper.lease.wanted)
    assert not waiting.done() and service.kernel("k0")["state"] == "running"
    keeper._post_execute()
    assert keeper.lease is None
    assert (await waiting)["granted"]


@pytest.mark.parametrize("service", [Policy(lease_keep=KEEP)], indirect=True)
async def test_a_cell_interrupted_before_it_ran_does_not_hold_the_lease_it_took_over(
    service, pooled, monkeypatch
) -> None:
    """A kept lease is taken over at the next cell's execute_request. Interrupted before IPython
    ran it, that cell has no post_execute: the lease is let go with the request, not held until
    some later cell ends while other kernels wait for it."""
    never_expires(monkeypatch)
    keeper = runtime_of(await pooled("k0"))
    other = await pooled("k1")
    await cell(keeper, "--memory 16GiB")
    assert keeper.lease is not None and keeper.lease.kept_at is not None

    async def interrupted(*args) -> None:
        raise KeyboardInterrupt  # before the cell ran

    handlers = {"execute_request": interrupted}
    keeper._wrap_execute_request(SimpleNamespace(kernel=SimpleNamespace(shell_handlers=handlers)))
    request = {"content": {"code": "x = 1"}}
    with pytest.raises(KeyboardInterrupt):
        await asyncio.to_thread(asyncio.run, handlers["execute_request"](None, None, request))
    granted = await call(other, "acquire", {"request_id": "r1", **WHOLE}, 20)
    assert granted["granted"], granted
    assert keeper.lease is None


@pytest.mark.parametrize("service", [Policy(lease_keep=KEEP)], indirect=True)
async def test_no_lease_is_kept_while_a_request_waits(service, pooled) -> None:
    first, second, third = [await pooled(f"k{i}") for i in range(3)]
    reply = await call(first, "acquire", {"request_id": "r1", **WHOLE})
    assert reply["keep_seconds"] == KEEP
    cells = [
        asyncio.ensure_future(call(client, "acquire", {"request_id": "r1", **WHOLE}, 20))
        for client in (second, third)
    ]
    await wait_until(lambda: len(service.pool()["queue"]) == 2)
    first.send("release", {"request_id": "r1", "peak_bytes": GiB, "gpu_bytes": 0})
    done, waiting = await asyncio.wait(cells, return_when=asyncio.FIRST_COMPLETED)
    (reply,) = [task.result() for task in done]
    assert reply["granted"] and reply["keep_seconds"] == 0, reply
    for task in waiting:
        task.cancel()


@pytest.mark.parametrize("service", [Policy(lease_keep=KEEP)], indirect=True)
async def test_an_offload_asked_for_gets_a_kept_lease_back(service, pooled, monkeypatch) -> None:
    never_expires(monkeypatch)
    runtime = runtime_of(await pooled("k0"))
    await cell(runtime)
    assert runtime.lease is not None and runtime.lease.kept_at is not None
    service.offload("k0")
    await wait_until(lambda: service.kernel("k0")["state"] == "offloaded")
    assert runtime.lease is None


@pytest.mark.parametrize("service", [Policy(lease_keep=KEEP)], indirect=True)
async def test_a_cell_that_must_see_the_kernel_idle_gives_a_kept_lease_back(
    service, pooled, monkeypatch
) -> None:
    """A cell made only of ``%singularity`` magics is not gated, and a ``%%singularity`` cell
    books a reservation of its own: neither runs under the lease the last cell kept."""
    never_expires(monkeypatch)
    runtime = runtime_of(await pooled("k0"))
    await cell(runtime)
    kept = runtime.lease
    runtime._send_early("%singularity status")
    assert runtime.lease is None
    await wait_until(lambda: service.kernel("k0")["state"] == "resident")
    await cell(runtime)
    assert runtime.lease is not None and runtime.lease is not kept
    kept = runtime.lease
    await asyncio.to_thread(runtime.gate_cell, "--memory 2GiB")
    assert runtime.lease is not kept and runtime.lease.reservation == 2 * GiB


@pytest.mark.parametrize("service", [Policy(lease_keep=KEEP)], indirect=True)
async def test_idle_seconds_of_a_release_are_checked(service, pooled) -> None:
    client = await pooled("k0")
    await call(client, "acquire", {"request_id": "r1", "memory": GiB})
    for bad in (-1, "1", True, 10.0**12):
        body = {"request_id": "r1", "peak_bytes": 0, "gpu_bytes": 0, "idle_seconds": bad}
        with pytest.raises(BrokerError, match="release refused: field 'idle_seconds'"):
            await call(client, "release", body)
        assert service.kernel("k0")["state"] == "running"
    client.send("release", {"request_id": "r1", "peak_bytes": 0, "idle_seconds": 0.01})
    await wait_until(lambda: service.kernel("k0")["state"] == "resident")


# -- real kernels through a real server ---------------------------------------------------

COUNT = "import torch\nx = torch.ones(1 << 20)"


async def leases_taken(get_json) -> int:
    (user,) = (await get_json("singularity", "api", "usage"))["users"]
    return int(user["leases"])


@pytest.mark.parametrize(
    "singularity_config", [{"lease_keep": KEEP}, {"lease_keep": 0}], indirect=True
)
async def test_cells_run_back_to_back_take_fewer_leases(
    start_kernel, wait_in_pool, run, get_json, state, singularity_config
) -> None:
    """Six GPU cells run one after the other, as Run All does: with leases kept, the broker
    grants fewer than six; with ``lease_keep = 0``, one per cell."""
    kernel = await start_kernel()
    await wait_in_pool([kernel])
    status, out, _ = await run(kernel, COUNT)
    assert status == "ok", out
    await state(kernel, "resident")
    before = await leases_taken(get_json)
    for _ in range(6):
        status, out, _ = await run(kernel, "y = x + 1")
        assert status == "ok", out
    await state(kernel, "resident")
    taken = await leases_taken(get_json) - before
    if singularity_config["lease_keep"]:
        assert 1 <= taken < 6, taken
    else:
        assert taken == 6


def test_the_keeper_ends_the_latest_window_once_and_survives_a_failure() -> None:
    """A window moved before it ended ends once, not before its new deadline; a failure to give
    a lease back is logged and the next window still ends."""
    ended: list[float] = []
    done = threading.Event()

    def expire() -> None:
        ended.append(time.monotonic())
        if len(ended) == 1:
            raise RuntimeError("the broker client is closed")
        done.set()

    keeper = kept_lease.Keeper(expire)
    try:
        keeper.arm(time.monotonic() + 0.2)
        moved = time.monotonic() + 0.4
        keeper.arm(moved)  # a cell ended meanwhile: its window replaces the first
        deadline = time.monotonic() + 10
        while not ended and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(ended) == 1 and ended[0] >= moved
        keeper.arm(time.monotonic())
        assert done.wait(10)
        assert len(ended) == 2
    finally:
        keeper.close()
