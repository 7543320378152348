"""How long moving a kernel's GPU state takes, from bandwidths (defaults: DESIGN §5, an H100 on
PCIe Gen5).

An offload copies the kernel's state to host memory (through its pinned pool at ``pinned_gbps``,
the rest through pageable memory at ``pageable_gbps``), writes what its host room cannot hold to
disk at ``disk_gbps``, then the driver tier checkpoints the CUDA context (``context_seconds``). A
restore does the same backwards; a spill writes a host copy to disk. The copies of one GPU share
its PCIe link, so the replay runs them one after another on that GPU; the driver tier's part
holds only its kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Transfers:
    pinned_gbps: float = 55.0
    """Pinned host<->device copies: 55.2 GB/s D->H, 55.4 GB/s H->D measured."""
    pageable_gbps: float = 10.0
    """Pageable copies: 17.1 GB/s D->H, 10.2 GB/s H->D measured; the slower one for both."""
    disk_gbps: float = 2.0
    """Spill files on a local NVMe disk (not measured: an assumption, see docs/simulate.md)."""
    context_seconds: float = 0.4
    """Driver-tier checkpoint or restore of a bare CUDA context: 0.41 s / 0.43 s measured."""

    def __post_init__(self) -> None:
        for name in ("pinned_gbps", "pageable_gbps", "disk_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0 GB/s, not {getattr(self, name)!r}")
        if not self.context_seconds >= 0:
            raise ValueError(f"context_seconds: must be >= 0, not {self.context_seconds!r}")

    def copy_seconds(self, host: int, disk: int, pinned: int) -> float:
        """The copies of an offload or restore: ``host`` bytes through host memory (the first
        ``pinned`` of them through the kernel's pinned pool) and ``disk`` bytes to or from its
        spill files (the driver tier's ``context_seconds`` come on top)."""
        fast = min(host, pinned)
        return (
            fast / (self.pinned_gbps * GB)
            + (host - fast) / (self.pageable_gbps * GB)
            + disk / (self.disk_gbps * GB)
        )

    def spill_seconds(self, nbytes: int) -> float:
        return nbytes / (self.disk_gbps * GB)
