"""What the kernel process can learn about itself cheaply: malloc'ed bytes, whether CUDA's driver
is initialised, and NVML's figure for its GPU memory."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def cuda_driver_initialised() -> bool:
    """Whether this process initialised the CUDA driver (``cuInit``), without initialising it."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1", mode=os.RTLD_NOLOAD)
    except OSError:
        return False  # not even loaded
    count = ctypes.c_int()
    return libcuda.cuDeviceGetCount(ctypes.byref(count)) == 0  # else CUDA_ERROR_NOT_INITIALIZED


def heap_probe() -> Callable[[], int] | None:
    """Bytes malloc'ed by the process right now (glibc ``mallinfo2``, about 1 µs), or None.

    On simulated devices the "device" state is large CPU tensors, and finding them takes a scan of all
    live objects (tens of ms): too slow for every cell. Their data is malloc'ed, so a cell that did not
    change the malloc'ed total by at least the engine's minimum storage size cannot have changed the
    device footprint, and the previous scan still holds.
    """
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def probe() -> int:
        info = mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return probe


def nvml_process_bytes(pid: int) -> int | None:
    """This process's memory on its GPU according to NVML, or None where NVML cannot tell (no
    NVML, or the process is not listed, as in a container with its own pid namespace)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if visible.startswith(("GPU-", "MIG-")):
            handles = [pynvml.nvmlDeviceGetHandleByUUID(visible.split(",")[0])]
        else:
            count = pynvml.nvmlDeviceGetCount()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        for handle in handles:
            for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if process.pid == pid:
                    return int(process.usedGpuMemory or 0)
        return None
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
