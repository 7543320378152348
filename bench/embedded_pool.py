"""The broker service as a benchmark runs it: embedded, one simulated device, kernels through the
pool's provisioner (shared by the benchmarks that start real kernels)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from jupyter_singularity.broker.ledger import Ledger
from jupyter_singularity.broker.model import Policy
from jupyter_singularity.broker.quotas import Quotas
from jupyter_singularity.broker.service import BrokerService
from jupyter_singularity.devices import open_inventory
from jupyter_singularity.server.provisioner import SingularityProvisioner


@asynccontextmanager
async def embedded_pool(devices: str = "simulated:1x16GiB") -> AsyncIterator[BrokerService]:
    """A running broker that kernels started with ``singularity-provisioner`` join."""
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(f"sqlite:///{Path(tmp) / 'ledger.sqlite'}")
        service = BrokerService(
            open_inventory(devices), ledger, Quotas({}), Policy(), log=logging.getLogger("bench")
        )
        await service.start()
        SingularityProvisioner.broker = service
        try:
            yield service
        finally:
            SingularityProvisioner.broker = None
            await service.stop()
            ledger.close()
