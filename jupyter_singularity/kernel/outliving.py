"""What may use the kernel's GPU memory while the tensor tier moves it, between cells.

- A thread a cell started that still runs (the user's own, a DataLoader's pin-memory thread): it
  may read or write a storage as it is copied or freed, which tears the copy or touches freed
  memory.
- Another CUDA library in the process (CuPy, JAX, Numba, TensorFlow, PyCUDA): torch memory it took
  through DLPack or ``__cuda_array_interface__`` would point at freed memory after a move, its
  data silently wrong.

A running thread keeps the kernel on its GPU (no tier can move state under it safely); another
library makes the tensor tier step aside, and the driver tier takes the whole process off the GPU,
its device addresses kept (see .pushes). Not seen here: asyncio tasks a cell left running on the
kernel's event loop, threads started before the first cell (a startup script's), and memory
shared with a library this list does not name.
"""

from __future__ import annotations

import sys
import threading

#: Modules whose presence means GPU memory may be shared with torch's.
FOREIGN_CUDA_LIBRARIES = ("cupy", "jax", "numba.cuda", "tensorflow", "pycuda")
#: The runtime's own threads (started at any time, never touching the user's tensors).
OWN_THREAD_PREFIX = "singularity-"
#: Where the kernel's own thread classes come from: ipykernel starts some after the first cell
#: (a subshell for each JupyterLab asks for, ``subshell-<id>``), which are not a cell's work.
KERNEL_THREAD_MODULES = ("ipykernel.", "IPython.", "jupyter_client.", "zmq.")


class OutlivingWork:
    """Tells, at an offload, which of the above this kernel has now."""

    def __init__(self) -> None:
        self._kernel_threads: set[threading.Thread] | None = None

    def first_cell(self) -> None:
        """Called as each cell starts: before the first, every thread alive is the kernel's."""
        if self._kernel_threads is None:
            self._kernel_threads = set(threading.enumerate())

    def running_threads(self) -> str:
        """Why moving the kernel's GPU state now is unsafe because of threads its cells started
        that still run ("" when none does). Neither tier can move state under them: the tensor
        tier would tear or free what they use, and while the driver holds the process a thread's
        CUDA call blocks holding the GIL, so the kernel could not even ask for its restore."""
        kernel = self._kernel_threads
        if kernel is None:  # no cell ran yet: no thread is a cell's
            return ""
        threads = sorted(
            thread.name
            for thread in threading.enumerate()
            if thread not in kernel
            and thread.is_alive()
            and not thread.name.startswith(OWN_THREAD_PREFIX)
            and not type(thread).__module__.startswith(KERNEL_THREAD_MODULES)
        )
        if not threads:
            return ""
        named = ", ".join(threads[:4]) + (", ..." if len(threads) > 4 else "")
        return (
            f"thread(s) started by its cells still run ({named}): it stays on its GPU until they "
            "end, since moving its state under them could tear what they compute"
        )

    def shared_memory(self) -> str:
        """Why torch's storages may not be moved by the tensor tier because another CUDA library
        may share them ("" when none is imported); the driver tier keeps their addresses."""
        shared = [name for name in FOREIGN_CUDA_LIBRARIES if name in sys.modules]
        if not shared:
            return ""
        return (
            f"{', '.join(shared)} may share torch's GPU memory (DLPack, "
            "__cuda_array_interface__), which moving it would leave pointing at freed memory"
        )
