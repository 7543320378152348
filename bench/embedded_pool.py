"""The pool as a benchmark runs it: embedded, or the node broker's; one simulated device, kernels
through the pool's provisioner, its events emitted as to a JupyterLab that listens (shared by the
benchmarks that start real kernels)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from jupyter_events import EventLogger

from jupyter_singularity.broker.frontend import PoolFrontend
from jupyter_singularity.broker.ledger import Ledger
from jupyter_singularity.broker.model import Policy
from jupyter_singularity.broker.quota_source import QuotaSource
from jupyter_singularity.broker.quotas import Quotas
from jupyter_singularity.broker.service import BrokerService
from jupyter_singularity.broker.settings import OpenPool
from jupyter_singularity.devices import open_inventory
from jupyter_singularity.server.events import register_schemas, schema_id
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
        pool.listeners.append(browser_listening())
        await pool.start()
        SingularityProvisioner.pool = pool
        try:
            yield service
        finally:
            SingularityProvisioner.pool = None
            await pool.stop()


def browser_listening() -> Callable[[str, dict], None]:
    """The pool's events as a server with JupyterLab open emits them: through jupyter_events,
    validated against their schemas, to a listener that serialises each one (as the server's
    events websocket does)."""
    logger = EventLogger()
    register_schemas(logger)

    async def websocket(logger: EventLogger, schema_id: str, data: dict) -> None:
        json.dumps({"schema_id": schema_id, **data})

    logger.add_listener(listener=websocket)
    return lambda name, data: logger.emit(schema_id=schema_id(name), data=data)


class NodeBrokerProcess:
    """``jupyter singularity broker`` in ``tmp`` on ``devices``: its socket, spill folder, ledger
    and log there; ``kill`` (-9) and ``start`` again on all of them, as a service manager would."""

    def __init__(self, tmp: Path, devices: str) -> None:
        self.socket = tmp / "run" / "broker.sock"
        self.log = tmp / "broker.log"
        self.args = [
            sys.executable,
            "-m",
            "jupyter_singularity.cli",
            "broker",
            f"--socket={self.socket}",
            f"--devices={devices}",
            f"--SingularityBroker.spill_dir={tmp / 'spill'}",
            f"--SingularityBroker.db_url=sqlite:///{tmp / 'ledger.sqlite'}",
            "--SingularityBroker.metrics_address=",
            "--log-level=WARN",
        ]
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        """Start it; returns when (time.monotonic) the process was started."""
        started = time.monotonic()
        with self.log.open("a") as out:
            self.process = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        return started

    def failed(self) -> str | None:
        """Its log, if the process ended."""
        ended = self.process is not None and self.process.poll() is not None
        return self.log.read_text() if ended else None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@asynccontextmanager
async def node_pool(devices: str = "simulated:1x16GiB") -> AsyncIterator[NodePool]:
    """A node broker process (``jupyter singularity broker``), joined as a server joins it: kernels
    started with ``singularity-provisioner`` go through it."""
    with tempfile.TemporaryDirectory(prefix="sgbench-") as tmp:
        broker = NodeBrokerProcess(Path(tmp), devices)
        broker.start()
        try:
            while not broker.socket.exists():
                if (log := broker.failed()) is not None:
                    raise RuntimeError("the node broker did not start:\n" + log)
                await asyncio.sleep(0.05)
            pool = NodePool(broker.socket, logging.getLogger("bench"))
            pool.listeners.append(browser_listening())
            await pool.start()
            SingularityProvisioner.pool = pool
            try:
                yield pool
            finally:
                SingularityProvisioner.pool = None
                await pool.stop()
        finally:
            broker.stop()
