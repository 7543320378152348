"""Large pages for the memory the tensor tier copies into: its host buffers and, on simulated
devices, the "device" memory itself.

A copy into freshly mapped memory is bound by page faults, not by memory bandwidth: the system
maps and zeroes each page at its first touch. With 4 KiB pages a 1 GiB copy takes 262,144 faults,
about 0.75 s of system time on a 2-core VM against about 0.3 s for the copy itself; with
transparent huge pages (2 MiB) it takes 512. A GPU maps its memory in 2 MiB pages too, so a
simulated device that faults in 4 KiB pages at every restore pays a cost no GPU pays; and two
kernels faulting at once (a swap) slow each other down.

Both are asked for, not forced: where the system's transparent huge pages are ``never`` (or the
call is unsupported) memory stays in 4 KiB pages, as before.
"""

from __future__ import annotations

import contextlib
import mmap
import os

#: A transparent huge page (x86-64 and arm64 with 4 KiB base pages).
LARGE_PAGE = 2 << 20

#: torch's CPU allocator puts allocations of 2 MiB and more in transparent huge pages when this
#: is "1"; it reads it once, at its first allocation.
TORCH_LARGE_PAGES = "THP_MEM_ALLOC_ENABLE"


def advise_large_pages(mapping: mmap.mmap) -> None:
    """Ask for transparent huge pages for a host buffer of the engine's own."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return
    with contextlib.suppress(OSError):  # unavailable: 4 KiB pages, as before
        mapping.madvise(advice)


def give_back(mapping: mmap.mmap, address: int, start: int, end: int) -> int:
    """Give the memory of bytes ``start`` to ``end`` of a host buffer (a mapping of its own at
    ``address``) back to the system, in whole large pages unless ``end`` is the mapping's end
    (splitting one costs more than it frees); those bytes read as zeros afterwards. Returns
    where the memory given back ends, where the next call for the same buffer starts."""
    if end < len(mapping):
        end = max(start, (address + end) // LARGE_PAGE * LARGE_PAGE - address)
    low = -(-(address + start) // mmap.PAGESIZE) * mmap.PAGESIZE - address
    if end > low:
        mapping.madvise(mmap.MADV_DONTNEED, low, end - low)
    return end


def simulated_device_pages() -> None:
    """Simulated devices: torch's CPU memory is the device memory; give it large pages, as a
    GPU's, unless the user chose otherwise. Must run before torch allocates (before its import)."""
    os.environ.setdefault(TORCH_LARGE_PAGES, "1")
