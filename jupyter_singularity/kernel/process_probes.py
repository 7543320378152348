"""What the kernel process can learn about itself cheaply: its mapped and resident bytes, whether
CUDA's driver is initialised, and NVML's figure for its GPU memory."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable

#: A bare CUDA context of a torch process (DESIGN §5: 612 MiB on an H100), counted as on the GPU
#: when NVML cannot say what the process holds.
CONTEXT_ESTIMATE = 612 << 20

_libcuda: ctypes.CDLL | None = None


def cuda_driver_initialised() -> bool:
    """Whether this process initialised the CUDA driver (``cuInit``), without initialising it:
    cheap enough to ask at every cell's end (about 50 µs while libcuda is not loaded, one driver
    call once it is). Any library may have done it (torch, but also CuPy, JAX, Numba, or
    torch's pinned memory, which skips torch's gate)."""
    global _libcuda
    if _libcuda is None:
        try:
            _libcuda = ctypes.CDLL("libcuda.so.1", mode=os.RTLD_NOLOAD)
        except OSError:
            return False  # not even loaded
    count = ctypes.c_int()
    return _libcuda.cuDeviceGetCount(ctypes.byref(count)) == 0  # else CUDA_ERROR_NOT_INITIALIZED


def driver_gpu_bytes() -> int:
    """GPU memory this process holds through the CUDA driver, whichever library allocated it:
    NVML's figure, a CUDA context's estimate where NVML cannot tell, 0 before ``cuInit``."""
    if not cuda_driver_initialised():
        return 0
    own = nvml_process_bytes(os.getpid())
    return CONTEXT_ESTIMATE if own is None else own


def memory_probe() -> Callable[[], tuple[int, int]] | None:
    """The process's mapped and resident bytes now (``/proc/self/statm``: a few µs whatever the
    size or state of its heap), or None where the system does not say.

    On simulated devices the "device" state is large CPU tensors: their memory is mapped when
    allocated and resident once written, so a cell that moved neither figure by the engine's
    minimum storage size has not changed the device footprint. (glibc's ``mallinfo2`` would tell
    the malloc'ed total, but walks every free chunk: milliseconds in a fragmented heap.)
    """
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        page = os.sysconf("SC_PAGE_SIZE")
        os.pread(fd, 128, 0)
    except (OSError, ValueError, AttributeError):
        return None

    def probe() -> tuple[int, int]:
        size, resident = os.pread(fd, 128, 0).split()[:2]
        return int(size) * page, int(resident) * page

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
