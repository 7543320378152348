"""The host copies of one offload, laid end to end over several buffers (the tape).

Each device storage has its place on the tape (:class:`Slot`), aligned to a page; the tape's
bytes lie in host buffers (pooled chunks first, then buffers of its own) and, past what the host
may keep, in a spill file (:class:`Buffer` with no tensor). The engine (:mod:`.offload`) fills
and empties it; this module only lays it out and reads it.
"""

from __future__ import annotations

import bisect
import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .large_pages import give_back
from .spill import SpillFile

if TYPE_CHECKING:
    import torch

#: Each host copy starts at a multiple of this, so copies run on page-aligned addresses.
ALIGN = 4096


@dataclass
class Buffer:
    """A host buffer holding ``used`` bytes of the tape; ``tensor`` is None once spilled to disk.

    A pooled buffer is a whole pool chunk of ``capacity`` bytes, reallocated whole when it comes
    back from disk so that it returns to the pool."""

    tensor: torch.Tensor | None
    used: int
    pooled: bool
    capacity: int = 0
    spill: SpillFile | None = None

    @classmethod
    def of_pool(cls, chunk: torch.Tensor) -> Buffer:
        return cls(chunk, chunk.numel(), pooled=True, capacity=chunk.numel())


@dataclass
class Slot:
    """One device storage and where its bytes sit on the host tape."""

    storage: torch.UntypedStorage
    nbytes: int
    offset: int


class Tape:
    """The host copies of one offload, laid end to end over several buffers (pooled ones first)."""

    def __init__(self, buffers: list[Buffer]) -> None:
        self.buffers: list[Buffer] = []
        self.starts: list[int] = []
        self.end = 0
        for buffer in buffers:
            self.append(buffer)

    def append(self, buffer: Buffer) -> None:
        self.starts.append(self.end)
        self.buffers.append(buffer)
        self.end += buffer.used

    def trim(self, end: int) -> None:
        """Keep only the buffers that hold bytes below ``end`` (the pool keeps the others)."""
        keep = bisect.bisect_left(self.starts, end)
        del self.buffers[keep:], self.starts[keep:]
        if self.buffers:
            self.buffers[-1].used = end - self.starts[-1]
        self.end = end

    @property
    def memory_end(self) -> int:
        """Where the buffers in memory end (the spill file an offload writes lies past them)."""
        spilled = self.buffers and self.buffers[-1].tensor is None
        return self.starts[-1] if spilled else self.end

    def pieces(self, offset: int, nbytes: int) -> Iterator[tuple[torch.Tensor, int, int]]:
        """(host slice, offset in the storage, length) for the tape range of one storage."""
        index = bisect.bisect_right(self.starts, offset) - 1
        done = 0
        while done < nbytes:
            buffer = self.buffers[index]
            assert buffer.tensor is not None
            at = offset + done - self.starts[index]
            length = min(buffer.used - at, nbytes - done)
            yield buffer.tensor[at : at + length], done, length
            done += length
            index += 1

    def give_back(self, start: int, end: int) -> int:
        """Give back the memory of the tape's bytes ``start`` to ``end`` that sit in buffers
        mapped on their own (never the pool's). Returns where the memory given back ends (at
        most ``end``; the bytes before it may read as zeros now)."""
        index = max(0, bisect.bisect_right(self.starts, start) - 1)
        at = start
        while at < end and index < len(self.buffers):
            buffer, base = self.buffers[index], self.starts[index]
            stop = min(end, base + buffer.used)
            mapping = getattr(buffer.tensor, "_singularity_mapping", None)
            if mapping is not None and not buffer.pooled:
                released = give_back(mapping, buffer.tensor.data_ptr(), at - base, stop - base)
                if base + released < stop:
                    return base + released
            at = stop
            index += 1
        return at


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def tape_end(slots: list[Slot]) -> int:
    """Where the next storage goes on the tape: after the last one, aligned."""
    return aligned(slots[-1].offset + slots[-1].nbytes) if slots else 0


def bytes_of(torch: Any, storage: Any) -> Any:
    """A flat uint8 tensor over the whole storage, to copy it as raw bytes."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def host_view(tensor: Any, nbytes: int) -> memoryview:
    """The first ``nbytes`` of a contiguous host tensor as a writable memoryview (no numpy)."""
    return memory_at(tensor.data_ptr(), nbytes)


def memory_at(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_ubyte * nbytes).from_address(address)).cast("B")


def tape_bytes(
    torch: Any, slots: list[Slot], start: int, end: int, staging: Any
) -> Iterator[memoryview]:
    """The tape's bytes from ``start`` to ``end``, read from the device storages in tape order
    (alignment gaps as zeros). Without ``staging`` (simulated devices: the storages are host
    memory) each piece is the storage's own memory; on CUDA each is copied into ``staging``,
    synchronously, and must be consumed before the next is asked for."""
    at = start
    for slot in slots:
        low, high = max(slot.offset, start), min(slot.offset + slot.nbytes, end)
        if low >= high:
            continue
        if low > at:
            yield memoryview(bytes(low - at))
        if staging is None:
            yield memory_at(slot.storage.data_ptr() + low - slot.offset, high - low)
        else:
            device_bytes = bytes_of(torch, slot.storage)
            for piece in range(low - slot.offset, high - slot.offset, staging.numel()):
                length = min(staging.numel(), high - slot.offset - piece)
                staging[:length].copy_(device_bytes[piece : piece + length])  # blocking
                yield host_view(staging, length)
        at = high
    if end > at:
        yield memoryview(bytes(end - at))
