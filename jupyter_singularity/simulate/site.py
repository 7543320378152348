"""What is simulated besides the trace: the pools of GPUs to try (``--devices``) and the site's
settings of the decision core (``--config``: the node broker's configuration file, read with the
broker's own parsing and checks).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..broker.model import Policy
from ..broker.quotas import Quotas
from ..broker.settings import ConfigError, PoolSettings
from ..devices import DeviceInfo
from ..units import parse_size

MAX_DEVICES = 1024
HOST_MEMORY_PER_GPU_MEMORY = 2
"""Without a host_memory_limit, a pool keeps offloaded state in up to twice its GPU memory: the
broker's default is half of the host's memory, and GPU servers have about four times their GPU
memory in RAM (a DGX H100: 2 TiB beside 640 GB)."""

_POOL = re.compile(r"^(?:(\d+)\s*x\s*)?(.+)$", re.IGNORECASE)


@dataclass(frozen=True)
class Pool:
    """One pool to replay the trace on: N GPUs of one size (and chip: migration is possible)."""

    name: str
    devices: tuple[DeviceInfo, ...]

    @property
    def gpus(self) -> int:
        return len(self.devices)

    @property
    def total_bytes(self) -> int:
        return sum(d.total_bytes for d in self.devices)

    @property
    def largest(self) -> int:
        return max(d.total_bytes for d in self.devices)


def parse_pools(spec: str) -> list[Pool]:
    """``1x80GiB,2x80GiB,...`` (``80GiB`` alone is one GPU); raises ValueError naming the item."""
    pools = []
    for item in (part.strip() for part in spec.split(",")):
        match = _POOL.match(item)
        if not item or match is None:
            raise ValueError(f"{item!r}: expected NxSIZE, such as 2x80GiB")
        count = int(match.group(1) or 1)
        if not 1 <= count <= MAX_DEVICES:
            raise ValueError(f"{item!r}: between 1 and {MAX_DEVICES} GPUs, not {count}")
        try:
            size = parse_size(match.group(2))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{item!r}: {err}") from None
        if size <= 0:
            raise ValueError(f"{item!r}: a GPU has more than 0 bytes")
        devices = tuple(
            DeviceInfo(i, f"SIM-{i:012d}", "Simulated GPU", "simulated", size) for i in range(count)
        )
        pools.append(Pool(f"{count}x{match.group(2).strip()}", devices))
    return sorted(pools, key=lambda p: (p.gpus, p.largest))


@dataclass(frozen=True)
class Site:
    """The decision core's settings as the site configured them."""

    quotas: Quotas
    settings: PoolSettings
    host_memory_limit: int
    """Bytes for offloaded state in host memory; 0: HOST_MEMORY_PER_GPU_MEMORY x the pool's."""

    def policy(self, pool: Pool) -> Policy:
        limit = self.host_memory_limit or HOST_MEMORY_PER_GPU_MEMORY * pool.total_bytes
        return self.settings.core_policy(limit)


def load_site(config: str | None, host_memory_limit: int | None = None) -> Site:
    """The settings of ``config`` (a ``jupyter singularity broker --config`` file: Python or
    JSON, ``c.SingularityBroker.<setting>``), the broker's defaults without one. Raises
    ConfigError naming the file or the setting."""
    from ..broker.app import SingularityBroker

    # A config file that does not run stops here (SingularityBroker.raise_config_file_errors):
    # traitlets would log it and go on without it.
    settings = SingularityBroker()
    if config:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"--config {config}: no such file")
        try:
            settings.load_config_file(path.name, path=str(path.parent.resolve()))
        except ConfigError:
            raise
        except Exception as err:  # a Python config file may raise anything
            raise ConfigError(f"--config {config}: cannot read it ({err})") from None
    log = logging.getLogger("jupyter_singularity.simulate")
    quotas = settings.quota_source(log).quotas
    configured = settings.configured_host_memory_limit()
    settings.core_policy(0)  # checks the other settings now, before any replay
    return Site(quotas, settings, host_memory_limit or configured)
