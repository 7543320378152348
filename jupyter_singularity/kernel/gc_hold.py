"""The garbage collector kept off while the CUDA driver may hold this process checkpointed.

A checkpointed process's CUDA calls block until it is restored (measured on an H200: an event
recorded on another thread returned only after the restore). Finalizers make such calls (a
``torch.cuda.Event`` or ``Stream`` collected, a pinned tensor freed), and a collection runs on
whichever thread allocates, holding the GIL, so one would stop every thread of the kernel, also
the one that answers the broker's spill request, until a restore. The collector is therefore held
off from an offload that leaves GPU memory to the driver tier until the kernel's next lease or
restore. Objects freed by their reference count alone can still call CUDA; an idle kernel frees
few, and none of the kernel's own threads frees CUDA objects.
"""

from __future__ import annotations

import gc


class GcHold:
    """Disables the collector once, and gives it back only if it was enabled before."""

    def __init__(self) -> None:
        self.held = False

    def hold(self) -> None:
        if not self.held and gc.isenabled():
            gc.disable()
            self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            gc.enable()
