"""A kernel's membership in a node broker's pool, through the real broker service and the real
kernel client and runtime (no IPython): the broker stops and a new run starts on the same socket,
as a node broker restarted by its service manager; the kernel joins it again with what it holds."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from jupyter_singularity.broker.checkpoint import DriverCapability, DriverCheckpointer
from jupyter_singularity.broker.identity import server_owner
from jupyter_singularity.broker.ledger import Ledger
from jupyter_singularity.broker.model import Policy
from jupyter_singularity.broker.quotas import Quotas
from jupyter_singularity.broker.service import BrokerService
from jupyter_singularity.devices import open_inventory
from jupyter_singularity.kernel import membership as membership_module
from jupyter_singularity.kernel.client import BrokerClient, BrokerRestarted
from jupyter_singularity.kernel.membership import Membership
from jupyter_singularity.kernel.runtime import Runtime
from jupyter_singularity.protocol import ENV_KERNEL_KEY, ENV_NODE_BROKER, generate_key

pytestmark = pytest.mark.timeout(120)

GiB = 1 << 30
SIMULATED_GPU = open_inventory("simulated:1x16GiB").devices()[0].uuid


class NodeBrokerRuns:
    """Runs of a node broker service on one socket and ledger; ``restart`` ends one, starts the
    next, and registers the kernels again as their server would (same ids, same keys)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.socket = tmp_path / "kernels.sock"
        self.keys: dict[str, bytes] = {}
        self.service: BrokerService | None = None

    async def start(self, register: bool = True) -> BrokerService:
        (self.tmp_path / "spill").mkdir(mode=0o700, exist_ok=True)  # as the broker command does
        ledger = Ledger(f"sqlite:///{self.tmp_path / 'ledger.sqlite'}")
        service = BrokerService(
            open_inventory("simulated:1x16GiB"),
            ledger,
            Quotas({}),
            Policy(),
            log=logging.getLogger("test.membership.broker"),
            spill_dir=self.tmp_path / "spill",
            driver=DriverCheckpointer(DriverCapability(False, False, None, "simulated")),
        )
        service.node = True
        await service.start(self.socket)
        self.service = service
        if register:
            self.register_again()
        return service

    def register_again(self) -> None:
        """Register every kernel with its key, as their server does when it joins a new run."""
        assert self.service is not None
        for kernel_id, key in self.keys.items():
            self.service.register_kernel(kernel_id, server_owner(), key=key)

    def register(self, kernel_id: str) -> dict[str, str]:
        assert self.service is not None
        self.keys[kernel_id] = generate_key()
        return self.service.register_kernel(kernel_id, server_owner(), key=self.keys[kernel_id]).env

    async def stop(self) -> None:
        if self.service is not None:
            await self.service.stop()
            self.service.ledger.close()
            self.service = None

    async def restart(self) -> BrokerService:
        await self.stop()
        return await self.start()


@pytest.fixture
async def runs(tmp_path: Path, monkeypatch) -> AsyncIterator[NodeBrokerRuns]:
    monkeypatch.setattr(membership_module, "KEEPALIVE", 0.2)
    runs = NodeBrokerRuns(tmp_path)
    await runs.start()
    yield runs
    await runs.stop()


@pytest.fixture
def node_kernel(runs: NodeBrokerRuns):
    """``node_kernel(kernel_id)``: a kernel's runtime (simulated devices) joined to the broker."""
    made: list[Runtime] = []

    async def make(kernel_id: str) -> Runtime:
        env = runs.register(kernel_id)
        assert env[ENV_NODE_BROKER] == "1"
        client = BrokerClient(runs.service.endpoint, kernel_id, env[ENV_KERNEL_KEY].encode())
        client.start()
        runtime = Runtime(client, simulated=True, membership=Membership(client, node=True))
        assert await asyncio.to_thread(runtime.membership.hello, 5) is not None
        runtime.membership.start()
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.membership.close()
        runtime.client.close()


async def until(condition: Callable[[], object], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def state_of(runs: NodeBrokerRuns, kernel_id: str) -> str | None:
    kernel = runs.service.core.kernels.get(kernel_id) if runs.service else None
    return None if kernel is None else kernel.state.value


async def test_a_kernel_rejoins_a_restarted_broker_with_what_it_holds(runs, node_kernel):
    runtime = await node_kernel("k1")
    lease = await asyncio.to_thread(runtime.acquire, 6 * GiB, top_of_cell=False)
    runtime.release(lease)
    await until(lambda: state_of(runs, "k1") == "resident")
    first = runtime.membership.instance

    await runs.restart()
    assert state_of(runs, "k1") == "cold"  # registered again: the new run knows nothing yet
    await until(lambda: state_of(runs, "k1") == "resident")
    # (the broker books the hello before its reply reaches the kernel)
    await until(lambda: runtime.membership.instance == runs.service.instance)
    kernel = runs.service.core.kernels["k1"]
    assert kernel.device == 0 and kernel.home == 0
    assert runtime.membership.instance == runs.service.instance != first
    assert runtime.membership.generation == 2
    # The kernel goes on as before: its next lease comes from the new run.
    lease = await asyncio.to_thread(runtime.acquire, GiB, top_of_cell=False)
    assert runs.service.core.kernels["k1"].lease.request_id == lease.request_id
    runtime.release(lease)


async def test_a_kernel_heard_before_its_server_joined_the_new_run_is_answered_then(
    runs, node_kernel
):
    """A restarted broker hears its kernels before their servers registered them again: what
    they send waits for the registration instead of being dropped (the kernel would wait for its
    answer's timeout, then say hello again)."""
    runtime = await node_kernel("k1")
    runtime.release(await asyncio.to_thread(runtime.acquire, GiB, top_of_cell=False))
    await until(lambda: state_of(runs, "k1") == "resident")
    runtime.membership.close()  # (only this test's messages, then)
    await runs.stop()
    await runs.start(register=False)
    answer = runtime.client.submit("ping", {})
    await asyncio.sleep(0.5)
    assert not answer.done()  # a kernel this run has no key for yet

    runs.register_again()
    await until(answer.done, timeout=10)
    with pytest.raises(BrokerRestarted, match="must say hello to it again"):
        answer.result()
    reply = await asyncio.to_thread(runtime.membership.hello, 5)
    assert reply is not None and reply["instance"] == runs.service.instance
    assert state_of(runs, "k1") == "resident"


async def test_a_waiting_cell_outlasts_the_restart_and_asks_the_new_run(runs, node_kernel):
    """A cell waits for the GPU when the broker goes: it goes on waiting (the broker is away),
    and its request is sent again to the new run, which grants it."""
    env = runs.register("holder")
    holder = BrokerClient(runs.service.endpoint, "holder", env[ENV_KERNEL_KEY].encode())
    holder.start()
    try:
        await asyncio.to_thread(holder.request, "hello", {"pid": os.getpid()}, 5)
        grant = await asyncio.to_thread(
            holder.request, "acquire", {"request_id": "h", "memory": 16 * GiB}, 5
        )
        assert grant["granted"]
        runtime = await node_kernel("k2")
        waiting = asyncio.ensure_future(
            asyncio.to_thread(runtime.acquire, 4 * GiB, top_of_cell=False)
        )
        await until(lambda: state_of(runs, "k2") == "queued")
        request_id = runtime.waiting.request_id
        await runs.stop()
        await until(lambda: runtime.membership.away_for() is not None)
        await asyncio.sleep(1)
        assert not waiting.done()

        await runs.start()
        # The holder's cell ended while the broker was away: it rejoins holding nothing there.
        holds = membership_module.NOTHING_HELD
        await asyncio.to_thread(holder.request, "hello", {"pid": os.getpid(), "holds": holds}, 5)
        lease = await asyncio.wait_for(waiting, 30)
        assert lease.request_id == request_id
        kernel = runs.service.core.kernels["k2"]
        assert kernel.state.value == "running" and kernel.lease.request_id == request_id
        runtime.release(lease)
        await until(lambda: state_of(runs, "k2") == "resident")
    finally:
        holder.close()


async def test_a_cell_running_across_the_restart_is_reported_and_its_release_ends_it(
    runs, node_kernel
):
    runtime = await node_kernel("k1")
    lease = await asyncio.to_thread(runtime.acquire, 2 * GiB, top_of_cell=False)
    await runs.restart()
    await until(lambda: state_of(runs, "k1") == "running")
    assert runs.service.core.kernels["k1"].lease is None  # no lease of this run
    runtime.release(lease)
    await until(lambda: state_of(runs, "k1") == "resident")
    # The lease of the previous run was closed at the restart; this run opened none for it.
    leases = runs.service.ledger.leases(since=0, until=time.time() + 1)
    assert [row["end"] is not None for row in leases if row["kernel_id"] == "k1"] == [True]


async def test_a_new_run_refuses_requests_before_the_kernel_said_hello(runs):
    env = runs.register("k1")
    await runs.restart()
    client = BrokerClient(runs.service.endpoint, "k1", env[ENV_KERNEL_KEY].encode())
    rejoins = threading.Event()
    client.on_rejoin = rejoins.set
    client.start()
    try:
        with pytest.raises(BrokerRestarted, match="must say hello to it again"):
            await asyncio.to_thread(client.request, "status", {}, 5)
        assert rejoins.is_set()
        reply = await asyncio.to_thread(client.request, "hello", {"pid": os.getpid()}, 5)
        assert reply["instance"] == runs.service.instance
        assert "kernel" in await asyncio.to_thread(client.request, "status", {}, 5)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("holds", "field"),
    [
        ("resident", "holds"),
        (
            {"device": None, "gpu_bytes": 0, "host_bytes": -1, "disk_bytes": 0, "running": False},
            "host_bytes",
        ),
        (
            {"device": None, "gpu_bytes": 0, "host_bytes": 0, "disk_bytes": 0, "running": 1},
            "running",
        ),
        (
            {
                "device": SIMULATED_GPU,
                "gpu_bytes": 1 << 40,
                "host_bytes": 0,
                "disk_bytes": 0,
                "running": False,
            },
            "gpu_bytes",
        ),
    ],
)
async def test_a_hello_with_bad_holds_is_refused_naming_the_field(runs, holds, field):
    env = runs.register("k1")
    client = BrokerClient(runs.service.endpoint, "k1", env[ENV_KERNEL_KEY].encode())
    client.start()
    try:
        with pytest.raises(Exception, match=field):
            await asyncio.to_thread(
                client.request, "hello", {"pid": os.getpid(), "holds": holds}, 5
            )
        assert state_of(runs, "k1") == "cold"
    finally:
        client.close()


async def test_registering_a_kernel_again_with_its_key_keeps_it(runs, tmp_path):
    """A server joining the same run twice (its join was cut short) registers its kernels again:
    with the same key nothing changes (its spill files stay); with another key it is a new
    kernel of that id (restarted)."""
    runs.register("k1")
    spill = tmp_path / "spill" / "k1"
    (spill / "tensors-1-a-0.spill").write_bytes(b"x")
    runs.service.register_kernel("k1", server_owner(), key=runs.keys["k1"])
    assert (spill / "tensors-1-a-0.spill").exists()
    runs.service.register_kernel("k1", server_owner(), key=generate_key())
    assert spill.is_dir() and not any(spill.iterdir())


async def test_a_restarted_run_keeps_the_spill_files_of_a_kernel_registered_again(runs, tmp_path):
    """The new run registers the kernel with its key: its spilled state is what it rejoins with."""
    runs.register("k1")
    spilled = tmp_path / "spill" / "k1" / "tensors-1-a-0.spill"
    spilled.write_bytes(b"state")
    await runs.restart()
    assert "k1" in runs.service.core.kernels
    assert spilled.read_bytes() == b"state"


async def test_a_kernel_not_yet_back_when_the_broker_restarts_again_is_waited_for(runs):
    """Two restarts in a row: k1 holds 4 GiB on the GPU and has not said hello to the first new
    run when it stops too. The second new run still keeps the GPU for it."""
    env = runs.register("k1")
    client = BrokerClient(runs.service.endpoint, "k1", env[ENV_KERNEL_KEY].encode())
    client.start()
    holds = {"device": SIMULATED_GPU, "gpu_bytes": 4 * GiB, "host_bytes": 0, "disk_bytes": 0}
    try:
        await asyncio.to_thread(
            client.request, "hello", {"pid": os.getpid(), "holds": {**holds, "running": False}}, 5
        )
    finally:
        client.close()
    assert runs.service.core.kernels["k1"].device == 0

    await runs.restart()
    assert runs.service.core.expected == {"k1": 0}
    await runs.restart()  # (k1 registered again, not rejoined yet)
    assert runs.service.core.expected == {"k1": 0}
    assert "waiting for 1 kernel(s)" in runs.service.core.closed_devices()[0]


async def test_state_on_a_gpu_no_longer_in_the_pool_is_not_booked(runs, caplog):
    env = runs.register("k1")
    client = BrokerClient(runs.service.endpoint, "k1", env[ENV_KERNEL_KEY].encode())
    client.start()
    holds = {"device": "GPU-gone", "gpu_bytes": GiB, "host_bytes": GiB, "disk_bytes": 0}
    try:
        await asyncio.to_thread(
            client.request, "hello", {"pid": os.getpid(), "holds": {**holds, "running": False}}, 5
        )
    finally:
        client.close()
    kernel = runs.service.core.kernels["k1"]
    assert (kernel.state.value, kernel.device, kernel.host_bytes) == ("offloaded", None, GiB)
    assert "rejoined with state on GPU GPU-gone, which is not in this pool" in caplog.text
