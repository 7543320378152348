"""Real NVIDIA GPUs through NVML, degrading to an empty inventory instead of failing.

A Jupyter server must start on a laptop without a driver, so nothing here raises
because NVML is missing or misbehaving: the user sees a reason instead.

The pool is what this server was given, not the whole machine: Slurm, JupyterHub spawners and
container runtimes hand a server its GPUs in ``CUDA_VISIBLE_DEVICES``, and the pool honours it the
way CUDA reads it (indices or UUIDs, UUID prefixes, the list cut at the first entry that names no
device). A GPU in MIG mode is not one device but its MIG instances, each with its own UUID and
memory. A GPU that NVML cannot read is left out with a reason instead of emptying the pool.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import pynvml

from .base import DeviceInfo, DeviceInventory

# OSError covers a broken libnvidia-ml that pynvml fails to wrap in its own error;
# NVMLLibraryMismatchError (not an NVMLError) is what pynvml raises when the driver lacks a
# function it calls by its unversioned name.
_NVML_ERRORS: tuple[type[BaseException], ...] = (
    pynvml.NVMLError,
    OSError,
    *((pynvml.NVMLLibraryMismatchError,) if hasattr(pynvml, "NVMLLibraryMismatchError") else ()),
)

#: How CUDA (and so this inventory) is told which GPUs the server may use.
VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"


def _text(value: str | bytes) -> str:
    """Old pynvml versions return bytes for strings."""
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class _Found:
    """One usable device as NVML lists it: a whole GPU, or one MIG instance of a GPU."""

    gpu_index: int
    """The physical GPU's NVML index (PCI order, as nvidia-smi numbers them)."""
    gpu_uuid: str
    uuid: str
    name: str
    chip: str
    total_bytes: int
    handle: Any


class NvmlInventory(DeviceInventory):
    """GPUs enumerated once at open; live memory is queried from NVML on each call.

    Device indices are the pool's own, 0 to n-1 in NVML order among the devices this server may
    use, as CUDA numbers them inside the server; a device's UUID names it for the kernels.
    """

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
        """Initialise NVML and enumerate the GPUs this server may use (``CUDA_VISIBLE_DEVICES``),
        or return an empty inventory saying why not. ``reason`` also names the GPUs left out,
        when some were."""
        visible = os.environ.get(VISIBLE_DEVICES)
        try:
            pynvml.nvmlInit()
        except _NVML_ERRORS as exc:
            return cls([], {}, reason=f"no NVIDIA driver found (NVML: {exc})")
        try:
            count = pynvml.nvmlDeviceGetCount()
        except _NVML_ERRORS as exc:
            _shutdown()
            reason = f"NVIDIA driver found but GPUs could not be read (NVML: {exc})"
            return cls([], {}, reason=reason)
        found: list[_Found] = []
        notes: list[str] = []
        for index in range(count):
            try:
                found += _read_gpu(index)
            except _NVML_ERRORS as exc:
                notes.append(f"GPU {index} left out: NVML cannot read it ({exc})")
        chosen, note = _visible(found, visible)
        if note:
            notes.append(note)
        if not chosen:
            _shutdown()
            if not notes:
                notes.append("NVIDIA driver found but no GPU")
            return cls([], {}, reason="; ".join(notes))
        devices = [
            DeviceInfo(index, f.uuid, f.name, f.chip, f.total_bytes)
            for index, f in enumerate(chosen)
        ]
        return cls(devices, {i: f.handle for i, f in enumerate(chosen)}, reason="; ".join(notes))

    def devices(self) -> list[DeviceInfo]:
        """The devices enumerated at open, in NVML order."""
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
        processes = _compute_processes(handle)
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


def _read_gpu(index: int) -> list[_Found]:
    """The usable devices of the GPU at NVML ``index``: the GPU itself, or its MIG instances
    when MIG mode is on (each its own device for CUDA; the GPU as a whole is not)."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = _text(pynvml.nvmlDeviceGetName(handle))
    uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
    if not _mig_enabled(handle):
        # NVML has no separate chip id; the marketing name pins the model.
        total = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
        return [_Found(index, uuid, uuid, name, name, total, handle)]
    instances = []
    for slot in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except pynvml.NVMLError_NotFound:
            continue  # an empty slot: no instance created there
        mig_uuid = _text(pynvml.nvmlDeviceGetUUID(mig))
        mig_name = _text(pynvml.nvmlDeviceGetName(mig))
        total = int(pynvml.nvmlDeviceGetMemoryInfo(mig).total)
        # A MIG instance cannot be remapped by the driver tier: its chip is its own, so the
        # pool never restores a kernel onto another instance.
        instances.append(
            _Found(index, uuid, mig_uuid, mig_name, f"{mig_name} {mig_uuid}", total, mig)
        )
    return instances


def _mig_enabled(handle: Any) -> bool:
    """Whether MIG mode is on; GPUs without MIG support answer NotSupported."""
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
    except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound):
        return False
    return current == pynvml.NVML_DEVICE_MIG_ENABLE


def _visible(found: list[_Found], visible: str | None) -> tuple[list[_Found], str]:
    """The devices ``CUDA_VISIBLE_DEVICES`` lets this server use, read as CUDA reads it, and a
    note on what it left out (empty when nothing needs saying).

    Each entry is a GPU index (NVML's, which is CUDA's with CUDA_DEVICE_ORDER=PCI_BUS_ID or GPUs
    of one model) or a UUID or unique UUID prefix (``GPU-...``, ``MIG-...``); a GPU named by index
    or ``GPU-`` UUID brings its MIG instances when it is in MIG mode. Like CUDA, the list ends at
    the first entry that names no device."""
    if visible is None:
        return found, ""
    chosen: list[_Found] = []
    for entry in (part.strip() for part in visible.split(",")):
        matches = _named_by(found, entry)
        if not matches:
            if chosen:
                return chosen, (
                    f"{VISIBLE_DEVICES}={visible!r}: entry {entry!r} names no GPU here; like "
                    "CUDA, the pool ignores it and the entries after it"
                )
            named = f" (entry {entry!r} names no GPU here)" if entry else ""
            return [], f"{VISIBLE_DEVICES}={visible!r} gives this server no GPU{named}"
        chosen += [m for m in matches if m not in chosen]
    return chosen, ""


def _named_by(found: list[_Found], entry: str) -> list[_Found]:
    """The devices one ``CUDA_VISIBLE_DEVICES`` entry names (none: not a device here)."""
    if entry.isdigit():
        return [f for f in found if f.gpu_index == int(entry)]
    lowered = entry.lower()
    if lowered.startswith("gpu-") and len(entry) > 4:
        gpus = {f.gpu_uuid for f in found if f.gpu_uuid.lower().startswith(lowered)}
        return [f for f in found if f.gpu_uuid in gpus] if len(gpus) == 1 else []
    if lowered.startswith("mig-") and len(entry) > 4:
        instances = [
            f for f in found if f.uuid.lower().startswith(lowered) and f.uuid != f.gpu_uuid
        ]
        return instances if len(instances) == 1 else []
    return []


def _compute_processes(handle: Any) -> list[Any]:
    """The compute processes on a device; an older driver without the newest query gets the
    older one, and any NVML error gives none."""
    try:
        return list(pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
    except _NVML_ERRORS:
        pass
    older = getattr(pynvml, "nvmlDeviceGetComputeRunningProcesses_v2", None)
    if older is None:
        return []
    try:
        return list(older(handle))
    except _NVML_ERRORS:
        return []


def _shutdown() -> None:
    """nvmlShutdown that cannot raise, since it runs on error paths and at exit."""
    with contextlib.suppress(*_NVML_ERRORS):
        pynvml.nvmlShutdown()
