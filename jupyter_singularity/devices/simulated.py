"""Fake GPUs so the pool, quotas and UI can run and be tested on machines without any."""

from __future__ import annotations

from collections.abc import Sequence

from ..units import format_size
from .base import DeviceInfo, DeviceInventory

MAX_SIMULATED_DEVICES = 64

_MIB, _GIB = 1 << 20, 1 << 30
# A machine without a GPU gets two devices, so that kernels visibly take turns and migrate.
DEFAULT_COUNT = 2
DEFAULT_MAX_SIZE = 16 * _GIB
DEFAULT_MIN_SIZE = 256 * _MIB
# When the memory cannot be read, small devices: a demo still runs, no host is filled.
_UNKNOWN_MEMORY_SIZE = _GIB


def default_simulated_spec(memory: int | None) -> tuple[str, str]:
    """The ``devices`` spec for a machine without a GPU, and why that size, for the log line.

    Simulated GPU memory is host memory, and offloaded copies take up to host_memory_limit (half of
    the memory by default) on top of it; so the two devices together take a quarter of the memory:
    each an eighth, rounded down to a whole GiB (to 256 MiB below 1 GiB), at most 16 GiB.
    """
    if memory is None:
        size = _UNKNOWN_MEMORY_SIZE
        why = "the machine's memory cannot be read"
    else:
        eighth = memory // 8
        step = _GIB if eighth >= _GIB else DEFAULT_MIN_SIZE
        size = min(DEFAULT_MAX_SIZE, max(DEFAULT_MIN_SIZE, eighth // step * step))
        why = (
            f"each an eighth of the {format_size(memory)} of memory here, rounded down, at most "
            f"{format_size(DEFAULT_MAX_SIZE)}: simulated GPU memory is host memory"
        )
    unit = f"{size // _GIB}GiB" if size % _GIB == 0 else f"{size // _MIB}MiB"
    return f"simulated:{DEFAULT_COUNT}x{unit}", why


def _simulated_uuid(index: int) -> str:
    """A UUID shaped like NVML's, derived from the index so it survives restarts."""
    return f"SIM-00000000-0000-0000-0000-{index:012d}"


class SimulatedInventory(DeviceInventory):
    """N devices of given sizes; live usage is unknown, so the broker's books are the truth.

    A simulated device keeps its state in host memory, so none may be larger than ``memory`` (the
    memory this server may use; None: not checked).
    """

    def __init__(self, sizes: Sequence[int], memory: int | None = None) -> None:
        if not 1 <= len(sizes) <= MAX_SIMULATED_DEVICES:
            raise ValueError(
                f"simulated device count must be between 1 and {MAX_SIMULATED_DEVICES}, "
                f"got {len(sizes)}"
            )
        for size in sizes:
            if size <= 0:
                raise ValueError(f"simulated device size must be positive, got {size} bytes")
            if memory is not None and size > memory:
                raise ValueError(
                    f"a simulated device of {format_size(size)} is larger than this machine's "
                    f"memory ({format_size(memory)}): a simulated device keeps its state in host "
                    "memory"
                )
        super().__init__(kind="simulated")
        self._devices = [
            DeviceInfo(
                index=index,
                uuid=_simulated_uuid(index),
                name="Simulated GPU",
                chip="simulated",
                total_bytes=size,
            )
            for index, size in enumerate(sizes)
        ]

    def devices(self) -> list[DeviceInfo]:
        """The devices fixed at construction."""
        return list(self._devices)

    def close(self) -> None:
        """Nothing to release: the devices are only data."""
