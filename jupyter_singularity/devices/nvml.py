"""Real NVIDIA GPUs through NVML, degrading to an empty inventory instead of failing.

A Jupyter server must start on a laptop without a driver, so nothing here raises
because NVML is missing or misbehaving: the user sees a reason instead.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pynvml

from .base import DeviceInfo, DeviceInventory

# OSError covers a broken libnvidia-ml that pynvml fails to wrap in its own error.
_NVML_ERRORS = (pynvml.NVMLError, OSError)


def _text(value: str | bytes) -> str:
    """Old pynvml versions return bytes for strings."""
    return value.decode() if isinstance(value, bytes) else value


class NvmlInventory(DeviceInventory):
    """GPUs enumerated once at open; live memory is queried from NVML on each call."""

    def __init__(
        self, devices: list[DeviceInfo], handles: dict[int, Any], reason: str = ""
    ) -> None:
        super().__init__(kind="nvml" if devices else "none", reason=reason)
        self._devices = devices
        self._handles = handles
        # Only an inventory that found GPUs keeps NVML initialised; close() undoes that once.
        self._initialized = bool(devices)

    @classmethod
    def open(cls) -> NvmlInventory:
        """Initialise NVML and enumerate GPUs, or return an empty inventory saying why not."""
        try:
            pynvml.nvmlInit()
        except _NVML_ERRORS as exc:
            return cls([], {}, reason=f"no NVIDIA driver found (NVML: {exc})")
        try:
            count = pynvml.nvmlDeviceGetCount()
            devices: list[DeviceInfo] = []
            handles: dict[int, Any] = {}
            for index in range(count):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                name = _text(pynvml.nvmlDeviceGetName(handle))
                devices.append(
                    DeviceInfo(
                        index=index,
                        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                        name=name,
                        # NVML has no separate chip id; the marketing name pins the model.
                        chip=name,
                        total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                    )
                )
                handles[index] = handle
        except _NVML_ERRORS as exc:
            _shutdown()
            reason = f"NVIDIA driver found but GPUs could not be read (NVML: {exc})"
            return cls([], {}, reason=reason)
        if not devices:
            _shutdown()
            return cls([], {}, reason="NVIDIA driver found but no GPU")
        return cls(devices, handles)

    def devices(self) -> list[DeviceInfo]:
        """The devices enumerated at open, in NVML index order."""
        return list(self._devices)

    def memory_used(self, index: int) -> int | None:
        """Used bytes per NVML; None for an unknown index, after close, or on any NVML error."""
        handle = self._handles.get(index)
        if handle is None:
            return None
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        except _NVML_ERRORS:
            return None

    def process_memory(self, index: int) -> dict[int, int]:
        """Bytes per compute process; processes NVML cannot measure are left out."""
        handle = self._handles.get(index)
        if handle is None:
            return {}
        try:
            processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except _NVML_ERRORS:
            return {}
        usage: dict[int, int] = {}
        for process in processes:
            if process.usedGpuMemory is None:
                continue
            # A pid can appear more than once (e.g. one entry per MIG instance).
            usage[process.pid] = usage.get(process.pid, 0) + int(process.usedGpuMemory)
        return usage

    def close(self) -> None:
        """Shut NVML down once; later queries answer "unknown"."""
        self._handles = {}
        if self._initialized:
            self._initialized = False
            _shutdown()


def _shutdown() -> None:
    """nvmlShutdown that cannot raise, since it runs on error paths and at exit."""
    with contextlib.suppress(*_NVML_ERRORS):
        pynvml.nvmlShutdown()
