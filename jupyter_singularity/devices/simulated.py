"""Fake GPUs so the pool, quotas and UI can run and be tested on machines without any."""

from collections.abc import Sequence

from .base import DeviceInfo, DeviceInventory

MAX_SIMULATED_DEVICES = 64


def _simulated_uuid(index: int) -> str:
    """A UUID shaped like NVML's, derived from the index so it survives restarts."""
    return f"SIM-00000000-0000-0000-0000-{index:012d}"


class SimulatedInventory(DeviceInventory):
    """N devices of given sizes; live usage is unknown, so the broker's books are the truth."""

    def __init__(self, sizes: Sequence[int]) -> None:
        if not 1 <= len(sizes) <= MAX_SIMULATED_DEVICES:
            raise ValueError(
                f"simulated device count must be between 1 and {MAX_SIMULATED_DEVICES}, "
                f"got {len(sizes)}"
            )
        for size in sizes:
            if size <= 0:
                raise ValueError(f"simulated device size must be positive, got {size} bytes")
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
