"""The pool as a benchmark runs it: embedded, or the node broker's; one simulated device, kernels
through the pool's provisioner (shared by the benchmarks that start real kernels)."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from jupyter_singularity.broker.frontend import PoolFrontend
from jupyter_singularity.broker.ledger import Ledger
from jupyter_singularity.broker.model import Policy
from jupyter_singularity.broker.quota_source import QuotaSource
from jupyter_singularity.broker.quotas import Quotas
from jupyter_singularity.broker.service import BrokerService
from jupyter_singularity.broker.settings import OpenPool
from jupyter_singularity.devices import open_inventory
from jupyter_singularity.server.node_pool import NodePool
from jupyter_singularity.server.pool import EmbeddedPool
from jupyter_singularity.server.provisioner import SingularityProvisioner


@asynccontextmanager
async def embedded_pool(devices: str = "simulated:1x16GiB") -> AsyncIterator[BrokerService]:
    """A running broker that kernels started with ``singularity-provisioner`` join."""
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(f"sqlite:///{Path(tmp) / 'ledger.sqlite'}")
        inventory, quotas = open_inventory(devices), QuotaSource(Quotas({}))
        service = BrokerService(
            inventory, ledger, quotas.quotas, Policy(), log=logging.getLogger("bench")
        )
        pool = EmbeddedPool(
            OpenPool(inventory, ledger, quotas, service, PoolFrontend(service, quotas))
        )
        await pool.start()
        SingularityProvisioner.pool = pool
        try:
            yield service
        finally:
            SingularityProvisioner.pool = None
            await pool.stop()


@asynccontextmanager
async def node_pool(devices: str = "simulated:1x16GiB") -> AsyncIterator[NodePool]:
    """A node broker process (``jupyter singularity broker``), joined as a server joins it: kernels
    started with ``singularity-provisioner`` go through it."""
    with tempfile.TemporaryDirectory(prefix="sgbench-") as tmp:
        socket = Path(tmp) / "broker.sock"
        broker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter_singularity.cli",
                "broker",
                f"--socket={socket}",
                f"--devices={devices}",
                f"--SingularityBroker.spill_dir={Path(tmp) / 'spill'}",
                f"--SingularityBroker.db_url=sqlite:///{Path(tmp) / 'ledger.sqlite'}",
                "--SingularityBroker.metrics_address=",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while not socket.exists():
                if broker.poll() is not None:
                    raise RuntimeError("the node broker did not start")
                await asyncio.sleep(0.05)
            pool = NodePool(socket, logging.getLogger("bench"))
            await pool.start()
            SingularityProvisioner.pool = pool
            try:
                yield pool
            finally:
                SingularityProvisioner.pool = None
                await pool.stop()
        finally:
            broker.send_signal(signal.SIGTERM)
            broker.wait(timeout=30)
