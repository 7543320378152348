"""The device memory a pipelined swap's two sides really hand over (see :mod:`.swap`).

On simulated devices a storage's bytes are the memory itself. On CUDA they are not: torch's
caching allocator keeps a freed storage's block for the process's own next allocation, so a
victim that reported the bytes of the storages it freed would promise the incoming kernel room
the driver does not have yet (it gets the blocks back only when the offload ends), and on a full
GPU the incoming kernel's restore would run out of memory midway; and the incoming kernel's
allocations round up to the allocator's segments (2 MiB, 20 MiB for storages of 1 to 10 MiB), so
it takes more than the bytes of the storages it refilled. Hence on CUDA the victim hands its
cached blocks back to the driver before each report and reports what its reservation fell by
(never more than the storages freed), and the incoming kernel counts what its reservation grew
by. Both are in the terms the broker books a CUDA kernel in: ``memory_reserved``.
"""

from __future__ import annotations

from typing import Any, Protocol


class DeviceRoom(Protocol):
    def handed_back(self, freed: int) -> int:
        """Device bytes the driver has back, once storages of ``freed`` bytes are freed."""
        ...

    def needed(self, back: int, nbytes: int) -> int:
        """Room a restore needs to bring a storage of ``nbytes`` back, ``back`` bytes of
        storages (this one's included) being back with it."""
        ...


class StorageBytes:
    """Simulated devices: a storage's bytes are its device memory."""

    def handed_back(self, freed: int) -> int:
        return freed

    def needed(self, back: int, nbytes: int) -> int:
        return back


class CudaReservation:
    """CUDA: the change of torch's reservation on the storages' devices since this was made."""

    def __init__(self, cuda: Any, devices: set[Any]) -> None:
        self._cuda, self._devices = cuda, devices
        self._start = self._reserved()

    def _reserved(self) -> int:
        return sum(int(self._cuda.memory_reserved(device)) for device in self._devices)

    def handed_back(self, freed: int) -> int:
        self._cuda.empty_cache()  # the cached blocks of the storages freed go to the driver
        return max(0, min(freed, self._start - self._reserved()))

    def needed(self, back: int, nbytes: int) -> int:
        return max(back, self._reserved() - self._start + nbytes)


def device_room(torch: Any, storages: list[Any], simulated: bool) -> DeviceRoom:
    """How ``storages``' device memory is counted while a swap moves them."""
    if simulated:
        return StorageBytes()
    return CudaReservation(torch.cuda, {storage.device for storage in storages})
