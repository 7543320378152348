"""Large pages for the memory the tensor tier copies into: its host buffers and, on simulated
devices, the "device" memory a restore refills.

A copy into freshly mapped memory is bound by page faults, not by memory bandwidth: the system
maps and zeroes each page at its first touch. With 4 KiB pages a 1 GiB copy takes 262,144 faults,
about 0.75 s of system time on a 2-core VM against about 0.3 s for the copy itself; with
transparent huge pages (2 MiB) it takes 512. A GPU maps its memory in 2 MiB pages too, so a
simulated device that faults in 4 KiB pages at every restore pays a cost no GPU pays; and two
kernels faulting at once (a swap) slow each other down.

Only what the tier itself allocates is advised; the memory of the user's own allocations stays as
in any process. (torch's ``THP_MEM_ALLOC_ENABLE`` would put every CPU allocation of 2 MiB or more
in large pages, but in a mapping of its own, mapped and faulted afresh at each: a cell making a
4 MiB tensor paid about 0.8 ms where a plain kernel reuses its freed memory in 0.07 ms.)

Both are asked for, not forced: where the system's transparent huge pages are ``never`` (or the
call is unsupported) memory stays in 4 KiB pages, as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap

#: A transparent huge page (x86-64 and arm64 with 4 KiB base pages).
LARGE_PAGE = 2 << 20

#: The advice that asks for transparent huge pages; None where the system has none.
HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)

_LIBC = ctypes.CDLL(None)


def advise_large_pages(mapping: mmap.mmap) -> None:
    """Ask for transparent huge pages for a host buffer of the engine's own."""
    if HUGEPAGE is None:
        return
    with contextlib.suppress(OSError):  # unavailable: 4 KiB pages, as before
        mapping.madvise(HUGEPAGE)


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


def advise_device_memory(address: int, nbytes: int) -> None:
    """Simulated devices: ask for transparent huge pages for a storage just allocated (before
    its first touch), in the whole large pages within it."""
    start = -(-address // LARGE_PAGE) * LARGE_PAGE
    end = (address + nbytes) // LARGE_PAGE * LARGE_PAGE
    if HUGEPAGE is not None and end > start:  # (a failure leaves 4 KiB pages, as before)
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), HUGEPAGE)
