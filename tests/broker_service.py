"""A broker service on one test GPU with kernels' clients over the real channel (a pytest plugin:
the ``service`` and ``pooled`` fixtures), and the helpers tests drive it with."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from jupyter_singularity.broker.checkpoint import DriverCapability, DriverCheckpointer
from jupyter_singularity.broker.identity import Identity, server_owner
from jupyter_singularity.broker.ledger import Ledger
from jupyter_singularity.broker.model import Policy
from jupyter_singularity.broker.quotas import Quotas
from jupyter_singularity.broker.service import BrokerService
from jupyter_singularity.devices import DeviceInfo, DeviceInventory
from jupyter_singularity.kernel.client import BrokerClient
from jupyter_singularity.protocol import ENV_BROKER_URL, ENV_KERNEL_KEY

BROKER_LOG = "test.rpc.broker"
GiB = 1 << 30


async def call(client: BrokerClient, type: str, body: dict, timeout: float = 5) -> dict:
    """client.request() blocks, so run it off the event loop the broker needs."""
    return await asyncio.to_thread(client.request, type, body, timeout)


async def wait_until(condition: Callable[[], object], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


class OneGpu(DeviceInventory):
    """One 16 GiB GPU whose driver reports memory per process, as NVML does."""

    def __init__(self) -> None:
        super().__init__(kind="nvml")
        self.held: dict[int, int] = {}

    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo(0, "GPU-test", "Test GPU", "test", 16 * GiB)]

    def process_memory(self, index: int) -> dict[int, int]:
        return dict(self.held)

    def close(self) -> None:
        pass


@pytest.fixture
async def service(tmp_path: Path, request: pytest.FixtureRequest) -> BrokerService:
    """The service on OneGpu; its policy a test's indirect parameter, if it gives one."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    service = BrokerService(
        OneGpu(),
        ledger,
        Quotas({}),
        getattr(request, "param", Policy()),
        log=logging.getLogger(BROKER_LOG),
        spill_dir=tmp_path / "spill",
        driver=DriverCheckpointer(DriverCapability(False, False, None, "no driver here")),
    )
    await service.start()
    yield service
    await service.stop()
    ledger.close()


@pytest.fixture
def pooled(service: BrokerService) -> Iterator[Callable[..., Awaitable[BrokerClient]]]:
    """``await pooled(kernel_id, owner=None)``: a kernel's client registered with the service
    (for ``owner``, default this process's user), said hello."""
    made: list[BrokerClient] = []

    async def make(kernel_id: str, owner: Identity | None = None) -> BrokerClient:
        env = service.register_kernel(kernel_id, owner or server_owner()).env
        client = BrokerClient(env[ENV_BROKER_URL], kernel_id, env[ENV_KERNEL_KEY].encode())
        client.start()
        made.append(client)
        await call(client, "hello", {"pid": os.getpid()})
        return client

    yield make
    for client in made:
        client.close()
