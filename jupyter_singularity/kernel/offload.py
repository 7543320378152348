"""Tensor tier: move a kernel's torch device state to host memory and back, in place.

The engine finds every live device storage with a gc scan and moves *storages*, not tensors: each
storage is copied to a host buffer and then resized to zero bytes, so every tensor, view,
``.detach()`` alias, parameter, gradient and optimizer state entry stays the same Python object
and keeps sharing memory with the others; restore resizes the storages back and copies the bytes
in. Host buffers come from a pool that is kept between offloads (pinned on CUDA: pinning costs
0.42 s/GiB, so it is paid once), up to ``pinned_limit``; what does not fit goes to pageable memory,
and so does what the system refuses to pin (a failed ``cudaHostAlloc``: locked-memory limits,
fragmentation), with no later try to pin more. A lower ``pinned_limit`` (the broker's allowance
shrank) gives the excess back, at once or when the offloaded state is restored.
Pool chunks are powers of two: torch's pinned allocator rounds every request up to one, so any
other size would pin up to twice the memory asked for, past the limit.

An offload may keep only part of the state in host memory (the broker's host budget): the rest
is written to a spill file straight from the device storages (on CUDA through one staging buffer
of at most ``STAGING`` bytes), never first copied whole into host memory.

With ``simulated=True`` (machines without GPUs) the "device" is the CPU: every torch CPU storage
of at least ``min_bytes`` that torch owns is device state, moved through the same code.

torch is never imported here: a process that has not imported it has no tensors to move, and a
kernel without torch must still load the runtime. CUDA is never initialised here either (its
first initialisation waits for a lease): without it there is no CUDA storage.

Unsafe state is refused before any device memory changes (``UnsafeStateError``); on a GPU the
driver tier then moves the whole process instead, its device addresses kept (see .pushes), and
on simulated devices the kernel stays resident:

- CUDA graphs: a stream capturing now, or any live ``torch.cuda.CUDAGraph`` (also those kept by
  ``torch.compile(mode="reduce-overhead")``): graphs replay raw device addresses that a move
  changes. A capture runs on the stream current in the thread that began it, not the one an
  offload runs on, so every live ``torch.cuda.Stream`` is asked; and this is found before any
  CUDA call of the offload, which could break a capture in progress.
- Storages shared with another process: found in torch.multiprocessing's sharing cache (storages
  sent or received through it: CUDA IPC and CPU shared memory) and, on CPU, ``is_shared()``. Moving
  one would split the processes' views of the data. Storages shared by calling ``_share_cuda_()``
  directly, bypassing torch.multiprocessing, are not visible.
- On CUDA, memory torch does not own: non-resizable storages (``from_blob``, DLPack, IPC handles
  opened here) and, with the native caching allocator, storages outside its segments. In simulated
  mode such storages (numpy arrays, ``frombuffer``, mmap) are host memory of another library, not
  device state, and are left alone.

What the scan cannot see (tensors held only by C++, such as the saved activations of an autograd
graph not yet backpropagated, unless they share a storage with a visible tensor) stays on the
device, as do storages below ``min_bytes``; on CUDA the bytes torch still has allocated after an
offload are reported in ``Transfer.left_bytes``, for the driver tier to take.

A spill file found damaged on the way back (:class:`~.spill.SpillDamaged`) loses the storages with
bytes in its damaged pieces, for good: the restore raises :class:`StateDamaged`, which says which
storages, and every later restore raises it again without reading. ``discard_damaged`` drops them
(their tensors are marked lost, :mod:`.lost`) and keeps the rest offloaded. Any other failure to
read a file may pass: the restore raises a plain :class:`OffloadError` and may be retried.
"""

from __future__ import annotations

import bisect
import ctypes
import gc
import logging
import mmap
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cuda_probes import (
    allocator_segments,
    capture_in_progress,
    inside,
    multiprocessing_shared,
)
from .device_room import device_room
from .host_tape import (
    Buffer,
    Slot,
    Tape,
    aligned,
    bytes_of,
    host_view,
    tape_bytes,
    tape_end,
)
from .large_pages import advise_device_memory, advise_large_pages
from .lost import mark_lost
from .spill import (
    Ranges,
    SpillDamaged,
    SpillError,
    read_spill,
    remove_spill,
    write_spill,
)
from .storages import grad_of, holder_types_of, of_kinds, parts_of, storages_held

if TYPE_CHECKING:
    import torch

    from .swap import RoomReport

Progress = Callable[[int, int], None]

log = logging.getLogger(__name__)

#: The smallest pool chunk; the pool grows by powers of two of it.
POOL_UNIT = 2 << 20
#: The largest pool chunk: pinning one takes about 0.42 s (a cell that starts while the pool is
#: prepared waits at most that long for CUDA's calls; see ``prepare``).
POOL_CHUNK_MAX = 1 << 30
#: Host memory one CUDA offload passes the state beyond its host room through, on its way to disk.
STAGING = 64 << 20


class OffloadError(Exception):
    """An offload or restore failed; the state was rolled back and nothing was lost."""


class UnsafeStateError(OffloadError):
    """State the engine cannot move safely; the message says what, and the kernel stays resident."""


class HostFullError(OffloadError):
    """The state did not fit the host memory the offload may use and the rest could not be written
    to disk (the message says why); nothing was changed, the kernel stays resident."""


@dataclass(frozen=True)
class Damage:
    """What damaged spill files lost: every storage with bytes in one of them."""

    storages: tuple[tuple[torch.UntypedStorage, int], ...]
    """Each lost storage (freed, 0 bytes now) with its size before the offload."""
    reasons: tuple[str, ...]
    """Why each damaged file is unusable (checksum mismatch, truncated, missing...)."""
    intact_bytes: int
    """Bytes of the other offloaded storages, which can still be restored."""
    ranges: dict[int, Ranges]
    """The lost bytes of each damaged buffer's file, by the buffer's place on the tape."""

    @property
    def nbytes(self) -> int:
        return sum(nbytes for _, nbytes in self.storages)


class StateDamaged(OffloadError):
    """Part of the offloaded state is lost for good (see ``damage``): retrying cannot bring it back;
    ``TensorEngine.discard_damaged`` drops it and keeps the rest. Nothing else changed."""

    def __init__(self, damage: Damage) -> None:
        self.damage = damage
        super().__init__(
            f"part of the offloaded state is lost: {'; '.join(damage.reasons)}; "
            f"{len(damage.storages)} storage(s) of {_mib(damage.nbytes)} had bytes there, "
            f"{_mib(damage.intact_bytes)} is intact"
        )


@dataclass(frozen=True)
class Transfer:
    """What one offload or restore moved and how long it took."""

    nbytes: int
    seconds: float
    storages: int
    #: CUDA bytes torch still had allocated after an offload (unseen or small storages).
    left_bytes: int = 0

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def _allocate_host(nbytes: int, pinned: bool) -> torch.Tensor:
    """One host buffer; the single place host memory is allocated (tests count the calls).

    A pageable one is a private anonymous mapping of its own, so that a restore can give it back
    off the cell's path (:func:`_unmap_later`): freeing a torch allocation holds the GIL through
    the whole munmap (about 50 ms/GiB), ``mmap.close`` releases it; and in large pages
    (:mod:`.large_pages`)."""
    import torch

    if pinned or nbytes == 0:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advise_large_pages(mapping)
    tensor = torch.frombuffer(mapping, dtype=torch.uint8)
    tensor._singularity_mapping = mapping  # type: ignore[attr-defined]
    return tensor


def _unmap_later(tensors: list[torch.Tensor]) -> None:
    """Give the memory of host buffers that nothing uses any more back to the system, on a thread
    of its own: the cell waiting for the restore starts meanwhile. Their tensors must not be read
    again (pinned ones, not mappings of their own, go when their last reference does)."""
    mappings = [getattr(tensor, "_singularity_mapping", None) for tensor in tensors]
    mappings = [mapping for mapping in mappings if mapping is not None]
    if mappings:
        threading.Thread(
            target=_unmap, args=(mappings,), name="singularity-unmap", daemon=True
        ).start()


def _unmap(mappings: list[mmap.mmap]) -> None:
    for mapping in mappings:
        mapping.close()


def _copy(dst: torch.Tensor, src: torch.Tensor, one_thread: bool = False) -> None:
    """One byte-range copy between host and device (asynchronous from/to pinned memory).

    ``one_thread`` (simulated devices, one side of a swap): a memmove on the calling thread,
    without the interpreter's lock, as a GPU's copy engine serves one direction. torch copies
    CPU memory on every core, so the two sides of a swap, in two processes, took each other's
    cores (and torch's spinning workers the rest): on the 2-core VM a swap of 1 GiB took
    0.31-0.36 s, with one thread a side 0.26-0.30 s (four runs each). A copy is bound by memory:
    one thread alone gets about three quarters of what torch's copy gets."""
    if one_thread and _plain_bytes(dst, src):
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.nbytes)
    else:
        dst.copy_(src, non_blocking=True)


def _plain_bytes(dst: torch.Tensor, src: torch.Tensor) -> bool:
    """Two CPU byte ranges of one size, each in one piece: what a memmove may copy."""
    cpu = dst.device.type == src.device.type == "cpu"
    return cpu and dst.nbytes == src.nbytes and dst.is_contiguous() and src.is_contiguous()


def _resize(storage: torch.UntypedStorage, nbytes: int) -> None:
    """Free (0) or reallocate a device storage in place; every tensor on it follows."""
    storage.resize_(nbytes)


@dataclass
class _Scan:
    """What a scan found that makes moving the state unsafe, by reason."""

    problems: dict[str, list[int]] = field(default_factory=dict)  # reason -> storage sizes

    def refuse(self, reason: str, nbytes: int | None = None) -> None:
        sizes = self.problems.setdefault(reason, [])
        if nbytes is not None:
            sizes.append(nbytes)

    def raise_if_unsafe(self) -> None:
        if not self.problems:
            return
        parts = [
            f"{len(sizes)} {reason} ({_mib(sum(sizes))})" if sizes else reason
            for reason, sizes in self.problems.items()
        ]
        raise UnsafeStateError(
            "cannot offload safely, the kernel stays resident: " + "; ".join(parts)
        )


class TensorEngine:
    """Offload, spill and restore the torch device state of this process, losing nothing."""

    def __init__(self, *, simulated: bool, pinned_limit: int, min_bytes: int = 1 << 20) -> None:
        self.simulated = simulated
        self._pinned_limit = pinned_limit
        self.min_bytes = min_bytes
        self._pin = not simulated
        #: Why the system refused to pin more host memory, once it did (the pool grows no more).
        self.pin_refused = ""
        self._pool: list[torch.Tensor] = []
        self._tape: Tape | None = None
        self._slots: list[Slot] = []
        self._offloaded = False
        self._damage: Damage | None = None
        self._name = f"tensors-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # The runtime offloads from a background thread; magics may ask for sizes meanwhile.
        self._lock = threading.RLock()

    @property
    def offloaded(self) -> bool:
        return self._offloaded

    @property
    def pinned_limit(self) -> int:
        """Host memory the pool may keep (the broker's allowance for this kernel)."""
        return self._pinned_limit

    @pinned_limit.setter
    def pinned_limit(self, nbytes: int) -> None:
        """A lower limit gives the pool's excess back: now if no move is under way and nothing is
        offloaded (the pool then holds the offloaded state), else once it is restored."""
        self._pinned_limit = nbytes
        if self._lock.acquire(blocking=False):
            try:
                self._trim_pool()
            finally:
                self._lock.release()

    @property
    def damage(self) -> Damage | None:
        """What damaged spill files lost, once a restore found it (until discard_damaged)."""
        return self._damage

    @property
    def host_bytes(self) -> int:
        """Bytes of host copies held in memory (the retained pool is ``pool_bytes``)."""
        if self._tape is None:
            return 0
        return sum(b.used for b in self._tape.buffers if b.tensor is not None)

    @property
    def disk_bytes(self) -> int:
        if self._tape is None:
            return 0
        return sum(b.spill.nbytes for b in self._tape.buffers if b.spill is not None)

    @property
    def pool_bytes(self) -> int:
        """Host memory kept for reuse by the next offload, also while resident (≤ pinned_limit)."""
        return sum(chunk.numel() for chunk in self._pool)

    def device_bytes(self, objects: Iterable[Any] | None = None) -> int:
        """Bytes of live device storages now, each storage counted once (unsafe ones included).

        ``objects``: the tensors and storages to look at (default: every object the garbage
        collector tracks, a walk of the whole heap)."""
        with self._lock:
            torch = self._torch()
            if torch is None:
                return 0
            found = _Scan()
            movable = sum(storage.nbytes() for storage in self._find(torch, found, objects=objects))
            return movable + sum(sum(sizes) for sizes in found.problems.values())

    def offload(
        self,
        progress: Progress | None = None,
        host_limit: int | None = None,
        directory: Path | None = None,
        swap: RoomReport | None = None,
    ) -> Transfer:
        """Copy every device storage to host memory, then free it on the device.

        At most ``host_limit`` bytes (None: no limit) stay in host memory; the rest is written to
        a spill file in ``directory`` straight from the device storages, before any is freed. If
        it cannot be (no directory, a full disk), nothing changes: HostFullError says why.

        Copies start while the scan still runs, into the pool kept from the last offload, so on
        CUDA the copy engines overlap the Python scan; what does not fit is copied after it.
        ``progress(done, total)`` is called once the total is known, then after each storage.
        With ``swap`` (:mod:`.swap`) each storage is freed as soon as its copy is done, after
        the scan and the spill file, and ``swap`` hears of every byte freed. So is every storage
        on simulated devices, swap or not: there the device memory is host memory too, and the
        host copy of each next storage then faults in the pages just freed, not fresh ones (on a
        virtual machine that hands free memory back to its host, fresh pages cost several times
        the copy), and the offload never holds the state twice.
        """
        with self._lock:
            if self._offloaded:
                return Transfer(0, 0.0, 0)
            started = time.perf_counter()
            torch = self._torch()
            if torch is None:
                self._commit_offload(Tape([]), [], [])
                return Transfer(0, time.perf_counter() - started, 0)
            room = None if host_limit is None else max(0, host_limit)
            tape = Tape([Buffer.of_pool(chunk) for chunk in self._pool])
            if room is not None and tape.end > room:
                tape.trim(room)
            slots: list[Slot] = []
            new_chunks: list[torch.Tensor] = []
            idle: set[Any] = set()
            free_early = swap is not None or self.simulated
            try:
                with torch.no_grad():
                    found, later = _Scan(), []
                    for storage in self._find(torch, found, stop_if_unsafe=True):
                        if not free_early and tape.end - tape_end(slots) >= storage.nbytes():
                            self._copy_out(torch, tape, slots, storage, idle)
                        else:
                            later.append(storage)
                    found.raise_if_unsafe()
                    total = tape_end(slots) + sum(aligned(s.nbytes()) for s in later)
                    host_end = total if room is None else min(total, room)
                    if host_end < total and directory is None:
                        raise HostFullError("no spill directory is configured (spill_dir)")
                    new_chunks = self._grow(tape, host_end)
                    tape.trim(host_end)
                    done = sum(slot.nbytes for slot in slots)
                    moved = done + sum(storage.nbytes() for storage in later)
                    if progress is not None:
                        progress(done, moved)
                    for storage in later:
                        self._copy_out(torch, tape, slots, storage, idle, copy=not free_early)
                        done += storage.nbytes()
                        if progress is not None:
                            progress(done, moved)
                    if tape_end(slots) > tape.end:
                        assert directory is not None
                        self._write_rest(torch, tape, slots, directory)
                    else:
                        tape.trim(tape_end(slots))
                    self._synchronize(torch, slots)
            except Exception as exc:
                self._synchronize(torch, slots)  # the pool is reused: no copy may still land in it
                if isinstance(exc, OffloadError):
                    raise
                raise OffloadError(
                    f"offload failed while copying to host, nothing was changed: {exc}"
                ) from exc
            self._shrink(torch, slots, tape, new_chunks, free_early, swap)
            self._commit_offload(tape, slots, new_chunks)
            self._release_device(torch)
            return Transfer(
                moved, time.perf_counter() - started, len(slots), self._left_bytes(torch, slots)
            )

    def restore(
        self, progress: Progress | None = None, room: Callable[[int], None] | None = None
    ) -> Transfer:
        """Bring every offloaded storage back, bit-identical; host copies go only after success.
        ``room(nbytes)`` is asked before each storage is reallocated, with the bytes back on the
        device once it is: it waits until that much may be (a swap, :mod:`.swap`), or raises to
        stop the restore, which then frees what it refilled."""
        with self._lock:
            if not self._offloaded:
                return Transfer(0, 0.0, 0)
            if self._damage is not None:
                raise StateDamaged(self._damage)  # lost for good: reading again cannot help
            started = time.perf_counter()
            tape = self._tape
            assert tape is not None
            moved = sum(slot.nbytes for slot in self._slots)
            if not self._slots:
                self._finish_restore()
                return Transfer(0, time.perf_counter() - started, 0)
            torch = self._torch()
            assert torch is not None  # storages were moved, so torch is imported
            spilled = any(b.tensor is None and b.spill is not None for b in tape.buffers)
            total = moved + (self.disk_bytes if spilled else 0)
            if spilled:
                self._read_back(tape, progress, total)
            try:
                self._bring_back(torch, self._slots, tape, progress, total, room)
            except Exception as exc:
                raise OffloadError(
                    f"restore failed, the state stays offloaded with its host copy: {exc}"
                ) from exc
            count = len(self._slots)
            self._finish_restore()
            return Transfer(moved, time.perf_counter() - started, count)

    def spill(self, directory: Path, keep_pool: bool = False) -> int:
        """Move the host copies to files in ``directory``; host memory goes once all are durable.

        ``keep_pool`` leaves the pool's buffers in memory: on CUDA they are pinned, and freeing
        pinned memory is a CUDA call, which waits forever in a process that the driver tier holds
        checkpointed. Only the other buffers move then."""
        with self._lock:
            tape = self._tape
            if tape is None or self.host_bytes == 0:
                return 0
            written: list[Buffer] = []
            try:
                for index, buffer in enumerate(tape.buffers):
                    in_memory = buffer.tensor is not None  # not a buffer discard_damaged dropped
                    if in_memory and buffer.spill is None and not (keep_pool and buffer.pooled):
                        view = host_view(buffer.tensor, buffer.used)
                        buffer.spill = write_spill(directory, f"{self._name}-{index}.spill", view)
                        written.append(buffer)
            except SpillError as exc:
                for buffer in written:
                    assert buffer.spill is not None
                    remove_spill(buffer.spill)
                    buffer.spill = None
                raise OffloadError(f"spill failed, the host copy is kept: {exc}") from exc
            for buffer in written:
                buffer.tensor = None
            if not keep_pool:
                self._pool = []
                self._release_pinned()
            return sum(b.used for b in written)

    def discard_damaged(self) -> Damage | None:
        """Drop what damaged spill files lost and keep the rest offloaded, for the next restore.

        The lost storages stay freed and every tensor (and gradient) on them is marked lost: any
        use raises, it never reads as zeros or crashes the process. A damaged file's bad pieces
        are no longer checked; files and buffers that hold nothing else go. Returns what was
        dropped, or None when nothing is damaged."""
        with self._lock:
            damage, tape = self._damage, self._tape
            if damage is None or tape is None:
                return None
            lost = {storage._cdata for storage, _ in damage.storages}
            self._mark_lost(self._torch(), lost)
            self._slots = [slot for slot in self._slots if slot.storage._cdata not in lost]
            self._damage = None
            for index, ranges in damage.ranges.items():
                spill = tape.buffers[index].spill
                if spill is not None:  # its damaged pieces hold nothing needed now
                    tape.buffers[index].spill = spill.dropping(ranges)
            self._drop_unused(tape)
            if not self._slots:
                self._finish_restore()  # nothing is left to bring back
            return damage

    def discard(self) -> None:
        """The kernel is ending: free host buffers and the pool, delete spill files."""
        with self._lock:
            self._damage = None
            if self._tape is not None:
                for buffer in self._tape.buffers:
                    if buffer.spill is not None:
                        remove_spill(buffer.spill)
                    buffer.tensor = None
            self._tape = None
            self._slots = []
            self._pool = []
            self._offloaded = False
            self._release_pinned()

    # -- scanning ---------------------------------------------------------------------------

    def holder_types(self) -> tuple[type, ...] | None:
        """The types of the objects that hold storages (what ``device_bytes`` looks at), or None
        while this process can hold no device storage (torch not imported, or still importing)."""
        torch = self._torch()
        return None if torch is None else holder_types_of(torch)

    def device_storage_keys(self, obj: Any) -> list[int]:
        """The device storages of ``min_bytes`` or more that ``obj`` (a tensor or a storage)
        holds, by key (the same for every storage object over the same memory)."""
        torch = self._torch()
        if torch is None:
            return []
        device_type = "cpu" if self.simulated else "cuda"
        return [
            storage._cdata
            for storage in storages_held(torch, obj)
            if storage.device.type == device_type and storage.nbytes() >= max(self.min_bytes, 1)
        ]

    def _torch(self) -> Any:
        """torch if this process could hold device storages now, else None (nothing to do)."""
        torch = sys.modules.get("torch")
        if torch is None or not hasattr(torch, "UntypedStorage"):
            return None  # not imported, or still importing
        if not self.simulated and not torch.cuda.is_initialized():
            return None  # never initialised CUDA: no CUDA storage can exist
        return torch

    def _find(
        self,
        torch: Any,
        found: _Scan,
        stop_if_unsafe: bool = False,
        objects: Iterable[Any] | None = None,
    ) -> Iterator[torch.UntypedStorage]:
        """Yield each live, movable device storage once; record in ``found`` what is unsafe.

        CUDA graphs and captures are looked for first, before any CUDA call the caller makes for
        a storage yielded; with ``stop_if_unsafe`` nothing is yielded once one is found. The
        storages are those of ``objects`` (default: every object the garbage collector tracks)."""
        device_type = "cpu" if self.simulated else "cuda"
        smallest = max(self.min_bytes, 1)
        seen = self._own_storages()
        shared = multiprocessing_shared()
        holders = holder_types_of(torch)
        graph_type = None if self.simulated else torch.cuda.CUDAGraph
        stream_type = None if self.simulated else torch.cuda.Stream
        objects = gc.get_objects() if objects is None else list(objects)
        # By type, never isinstance (it reads __class__, which proxies may fake); each type is
        # judged once, and the objects of a wanted one are found by C-level scans of the list:
        # a heap of 300,000 objects costs milliseconds, not a Python loop's 100 ms.
        kinds = list(map(type, objects))
        holder_kinds, graph_kinds, stream_kinds = set(), set(), set()
        for kind in set(kinds):
            if issubclass(kind, holders):
                holder_kinds.add(kind)
            elif graph_type is not None and issubclass(kind, graph_type):
                graph_kinds.add(kind)
            elif stream_type is not None and issubclass(kind, stream_type):
                stream_kinds.add(kind)
        candidates = of_kinds(objects, kinds, holder_kinds)
        graphs = sum(map(kinds.count, graph_kinds))
        streams = of_kinds(objects, kinds, stream_kinds)
        if graphs:
            found.refuse(
                f"{graphs} live CUDA graph(s) (torch.cuda.CUDAGraph, also kept by torch.compile "
                "mode='reduce-overhead'): they replay fixed device addresses; delete them first"
            )
        if not self.simulated and capture_in_progress(torch, streams):
            found.refuse("a CUDA graph capture is in progress")
        if stop_if_unsafe and found.problems:
            return
        segments = None if self.simulated else allocator_segments(torch)
        for obj in candidates:
            for storage in storages_held(torch, obj):
                key = storage._cdata
                if key in seen or storage.device.type != device_type:
                    continue
                seen.add(key)
                nbytes = storage.nbytes()
                if nbytes < smallest:
                    continue
                if key in shared or (self.simulated and storage.is_shared()):
                    found.refuse(
                        "storage(s) shared with another process (torch.multiprocessing / IPC)",
                        nbytes,
                    )
                elif not storage.resizable():
                    # Simulated, this is numpy/mmap/frombuffer memory: another library's, no device state.
                    if not self.simulated:
                        found.refuse(
                            "storage(s) torch does not own (from_blob / DLPack / IPC)", nbytes
                        )
                elif segments is not None and not inside(segments, storage.data_ptr()):
                    found.refuse(
                        "storage(s) outside torch's CUDA allocator (memory it cannot move)", nbytes
                    )
                else:
                    yield storage

    def _own_storages(self) -> set[int]:
        """The pool and tape buffers: CPU storages too, which a simulated scan must not move."""
        tensors = list(self._pool)
        if self._tape is not None:
            tensors += [b.tensor for b in self._tape.buffers if b.tensor is not None]
        return {t.untyped_storage()._cdata for t in tensors}

    # -- host memory ------------------------------------------------------------------------

    def _copy_out(
        self,
        torch: Any,
        tape: Tape,
        slots: list[Slot],
        storage: Any,
        idle: set[Any],
        copy: bool = True,
    ) -> None:
        """Start copying one storage to the next free place on the tape (``copy=False``: only
        give it its place, :meth:`_shrink` copies it).

        The first copy from a device waits for that device to finish what the last cell queued: a
        cell returns before its GPU work ends, and work on its own streams is not ordered with
        the copy. ``idle`` holds the devices already waited for."""
        if not self.simulated and storage.device not in idle:
            torch.cuda.synchronize(storage.device)
            idle.add(storage.device)
        slot = Slot(storage, storage.nbytes(), tape_end(slots))
        slots.append(slot)
        if copy:
            _copy_to_tape(torch, tape, slot)

    def _write_rest(self, torch: Any, tape: Tape, slots: list[Slot], directory: Path) -> None:
        """Write the tape's bytes past its host buffers to one spill file, read straight from the
        device storages, and put the file on the tape (as a spilled buffer, which a restore reads
        back). On failure no file is left and HostFullError says why."""
        start, end = tape.end, tape_end(slots)
        staging = None if self.simulated else self._staging(tape, end - start)
        pieces = tape_bytes(torch, slots, start, end, staging)
        del staging  # the generator's, and freed with it
        try:
            spill = write_spill(directory, f"{self._name}-{len(tape.buffers)}.spill", pieces)
        except SpillError as exc:
            raise HostFullError(exc.strerror or str(exc)) from exc
        finally:
            pieces.close()
            self._release_pinned()
        tape.append(Buffer(None, end - start, pooled=False, spill=spill))

    def _staging(self, tape: Tape, nbytes: int) -> torch.Tensor:
        """Host memory to pass device bytes through on their way to disk: a pool chunk this
        offload does not use (pinned already), else a new buffer of at most STAGING bytes."""
        on_tape = {id(buffer.tensor) for buffer in tape.buffers}
        spare = [chunk for chunk in self._pool if id(chunk) not in on_tape]
        size = min(STAGING, nbytes)
        if spare:
            chunk = max(spare, key=lambda c: c.numel())
            return chunk[: min(chunk.numel(), size)]
        return self._pool_memory(size)[0]

    def prepare(self, nbytes: int, idle: Callable[[], bool] = lambda: True) -> int:
        """Grow the reusable host pool towards ``nbytes`` (at most ``pinned_limit``) ahead of the
        first offload: pinned allocation costs about 0.42 s/GiB, paid here while the kernel idles
        rather than inside an eviction another cell waits for. It stops at the first chunk that
        ``idle()`` finds a cell running: pinning slows the cell's own CUDA calls (measured on an
        H200: a GPU loop run while a 16 GiB pool was pinned took 1.3-1.7x as long). Returns the
        pool's size."""
        with self._lock:
            if not self._offloaded:
                for size in self._pool_growth(nbytes - self.pool_bytes):
                    if not idle():
                        break
                    chunk = self._pin_chunk(size)
                    if chunk is None:
                        break
                    self._pool.append(chunk)
                self._trim_pool()  # the limit may have been lowered meanwhile
            return self.pool_bytes

    def _pool_growth(self, nbytes: int) -> list[int]:
        """Sizes of the chunks that grow the pool by ``nbytes``, as far as pinned_limit allows
        (none once the system refused to pin more)."""
        if self.pin_refused:
            return []
        room = (self.pinned_limit - self.pool_bytes) // POOL_UNIT * POOL_UNIT
        return _chunk_sizes(max(0, min(-(-nbytes // POOL_UNIT) * POOL_UNIT, room)))

    def _pin_chunk(self, nbytes: int) -> torch.Tensor | None:
        """A new pool chunk (pinned where the pool is); None when the system will not pin it,
        or refused before: ``pin_refused`` says why, once, and later offloads do not try again."""
        if not self._pin:
            return _allocate_host(nbytes, False)
        if self.pin_refused:
            return None
        try:
            return _allocate_host(nbytes, True)
        except (RuntimeError, MemoryError) as exc:  # cudaHostAlloc failed
            self.pin_refused = f"pinning {_mib(nbytes)} failed: {exc}"
            log.warning(
                "jupyter-singularity: %s; offloads use pageable memory beyond the %s pinned",
                self.pin_refused,
                _mib(self.pool_bytes),
            )
            return None

    def _pool_memory(self, nbytes: int) -> tuple[torch.Tensor, bool]:
        """Host memory of the pool's kind (pinned where the pool is) where the system grants
        it, else pageable; and whether it is of the pool's kind."""
        chunk = self._pin_chunk(nbytes)
        if chunk is not None:
            return chunk, True
        return _allocate_host(nbytes, False), False

    def _trim_pool(self) -> None:
        """Keep no more pool than ``pinned_limit`` allows, the largest chunks that fit, while
        nothing is offloaded (the pool holds the offloaded state then)."""
        if self._offloaded or self.pool_bytes <= self.pinned_limit:
            return
        self._pool = _largest_within(self._pool, self.pinned_limit)
        self._release_pinned()  # (no name here may still refer to a dropped chunk)

    def _grow(self, tape: Tape, total: int) -> list[torch.Tensor]:
        """Make the tape hold ``total`` bytes: the pool grows up to pinned_limit, then pageable
        memory takes the rest (also what the system refuses to pin). Returns the new pool chunks,
        kept only if the offload succeeds."""
        new_chunks: list[torch.Tensor] = []
        try:
            for size in self._pool_growth(total - tape.end):
                chunk = self._pin_chunk(size)
                if chunk is None:
                    break
                new_chunks.append(chunk)
                tape.append(Buffer.of_pool(chunk))
            if tape.end < total:
                extra = total - tape.end
                tape.append(Buffer(_allocate_host(extra, False), extra, pooled=False))
        except Exception as exc:
            raise OffloadError(
                f"cannot allocate {_mib(total)} of host memory for the offload, "
                f"nothing was changed: {exc}"
            ) from exc
        return new_chunks

    def _commit_offload(
        self, tape: Tape, slots: list[Slot], new_chunks: list[torch.Tensor]
    ) -> None:
        self._pool += new_chunks
        self._tape = tape
        self._slots = slots
        self._offloaded = True

    def _read_back(self, tape: Tape, progress: Progress | None, total: int) -> None:
        """Reload spilled buffers from disk, verified; on failure stay spilled, memory freed again.

        A damaged file does not stop the reading: the others are checked too, so that the
        StateDamaged raised at the end names everything that was lost."""
        done = 0
        damaged: dict[int, SpillDamaged] = {}
        try:
            for index, buffer in enumerate(tape.buffers):
                if buffer.tensor is None and buffer.spill is not None:
                    try:
                        self._load(buffer)
                    except SpillDamaged as exc:
                        damaged[index] = exc
                        buffer.tensor = None
                    done += buffer.used
                    if progress is not None:
                        progress(done, total)
            if damaged:
                self._damage = self._damage_of(tape, damaged)
                raise StateDamaged(self._damage)
        except Exception as exc:
            for buffer in tape.buffers:
                if buffer.spill is not None:
                    buffer.tensor = None
            if isinstance(exc, StateDamaged):
                raise
            raise OffloadError(f"restore failed reading the spilled state back: {exc}") from exc
        if not self._pool:  # the pool went to disk with the copies: it comes back with them
            self._pool = [b.tensor for b in tape.buffers if b.pooled and b.tensor is not None]

    def _damage_of(self, tape: Tape, damaged: dict[int, SpillDamaged]) -> Damage:
        """The storages with bytes in the damaged ranges of the buffers' files."""
        ranges = [
            (tape.starts[index] + start, tape.starts[index] + end)
            for index, exc in damaged.items()
            for start, end in exc.ranges
        ]
        lost = [
            slot
            for slot in self._slots
            if any(slot.offset < end and start < slot.offset + slot.nbytes for start, end in ranges)
        ]
        intact = sum(slot.nbytes for slot in self._slots) - sum(slot.nbytes for slot in lost)
        return Damage(
            tuple((slot.storage, slot.nbytes) for slot in lost),
            tuple(str(exc) for exc in damaged.values()),
            intact,
            {index: exc.ranges for index, exc in damaged.items()},
        )

    def _drop_unused(self, tape: Tape) -> None:
        """Free the buffers, and delete the files, that hold no byte of a remaining storage."""
        used = [False] * len(tape.buffers)
        for slot in self._slots:
            first = bisect.bisect_right(tape.starts, slot.offset) - 1
            last = bisect.bisect_right(tape.starts, slot.offset + slot.nbytes - 1) - 1
            used[first : last + 1] = [True] * (last + 1 - first)
        for buffer, keep in zip(tape.buffers, used, strict=True):
            if not keep:
                if buffer.spill is not None:
                    remove_spill(buffer.spill)
                buffer.tensor = buffer.spill = None

    def _mark_lost(self, torch: Any, keys: set[int]) -> None:
        """Mark every tensor, and gradient, over the storages ``keys`` as lost (see .lost)."""
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor):
                for tensor in (obj, grad_of(obj)):
                    parts = [] if tensor is None else parts_of(torch, tensor)
                    if any(storage._cdata in keys for storage in parts):
                        mark_lost(tensor)

    def _load(self, buffer: Buffer) -> None:
        """Read a spilled buffer back into host memory, verified (a pooled one whole, so that it
        returns to the pool)."""
        assert buffer.spill is not None
        if buffer.pooled:
            buffer.tensor, buffer.pooled = self._pool_memory(buffer.capacity)
        else:
            buffer.tensor = _allocate_host(buffer.used, False)
        read_spill(buffer.spill, host_view(buffer.tensor, buffer.used))

    def _finish_restore(self) -> None:
        """Only now, with every storage back, may the host and disk copies go (the pool stays)."""
        assert self._tape is not None
        done: list[torch.Tensor] = []
        for buffer in self._tape.buffers:
            if buffer.spill is not None:
                remove_spill(buffer.spill)
            if buffer.tensor is not None and not buffer.pooled:
                done.append(buffer.tensor)
            buffer.tensor = None
        _unmap_later(done)
        self._tape = None
        self._slots = []
        self._offloaded = False
        self._trim_pool()

    # -- device side ------------------------------------------------------------------------

    def _shrink(
        self,
        torch: Any,
        slots: list[Slot],
        tape: Tape,
        new_chunks: list[torch.Tensor],
        free_early: bool = False,
        swap: RoomReport | None = None,
    ) -> None:
        """Free every device storage; if one cannot be freed, bring the freed ones back. With
        ``free_early``, copy each to the tape first, just before it is freed. With ``swap``,
        report the bytes freed; a failure then waits for ``swap`` to say that the room freed so
        far is back before refilling it."""
        shrunk: list[Slot] = []
        freed = 0
        meter = device_room(torch, [slot.storage for slot in slots], self.simulated)
        try:
            for slot in slots:
                if free_early:
                    _copy_to_tape(torch, tape, slot, one_thread=swap is not None and self.simulated)
                    self._synchronize(torch, [slot])
                _resize(slot.storage, 0)
                shrunk.append(slot)
                if swap is not None:
                    freed += slot.nbytes
                    swap.freed(freed, meter.handed_back)
        except Exception as exc:
            spilled = [buffer for buffer in tape.buffers if buffer.spill is not None]
            try:
                if swap is not None and shrunk:
                    swap.wait_room_back()
                for buffer in spilled:  # what went straight to disk comes back through memory
                    self._load(buffer)
                self._bring_back(torch, shrunk, tape, None, 0)
            except Exception as again:
                # Could not undo: those storages stay offloaded with their host and disk copies.
                for buffer in spilled:
                    buffer.tensor = None
                self._commit_offload(tape, shrunk, new_chunks)
                raise OffloadError(
                    f"offload failed while freeing device memory ({exc}) and undoing it failed "
                    f"({again}); {len(shrunk)} storages stay offloaded, restore() brings them back"
                ) from exc
            for buffer in spilled:
                remove_spill(buffer.spill)
            raise OffloadError(
                f"offload failed while freeing device memory, nothing was changed: {exc}"
            ) from exc

    def _bring_back(
        self,
        torch: Any,
        slots: list[Slot],
        tape: Tape,
        progress: Progress | None,
        total: int,
        room: Callable[[int], None] | None = None,
    ) -> None:
        """Reallocate and refill ``slots``; on failure free the refilled ones again and raise.

        On simulated devices each storage's new memory is asked for in large pages, as a GPU's
        (:mod:`.large_pages`), and the host copy of each storage refilled is given back to the
        system at once (whole large pages), so that the next storage's new device memory reuses
        those pages rather than fresh ones (on a virtual machine that hands free memory back to its
        host, fresh pages cost several times the copy) and the restore never holds the state
        twice. A failure then copies the refilled storages back to the tape before freeing
        them: the host copy stays whole."""
        restored: list[Slot] = []
        one_thread = room is not None and self.simulated  # the incoming side of a swap
        meter = device_room(torch, [slot.storage for slot in slots], self.simulated)
        done = total - sum(slot.nbytes for slot in slots)
        back = 0
        given_back = 0  # the tape's bytes before this may be gone from host memory
        try:
            with torch.no_grad():
                for slot in slots:
                    back += slot.nbytes
                    if room is not None:
                        room(meter.needed(back, slot.nbytes))
                    restored.append(slot)
                    _resize(slot.storage, slot.nbytes)
                    if self.simulated:
                        advise_device_memory(slot.storage.data_ptr(), slot.nbytes)
                    device_bytes = bytes_of(torch, slot.storage)
                    for host, start, length in tape.pieces(slot.offset, slot.nbytes):
                        _copy(device_bytes[start : start + length], host, one_thread)
                    done += slot.nbytes
                    if self.simulated:
                        given_back = tape.give_back(given_back, slot.offset + slot.nbytes)
                    if progress is not None:
                        progress(done, total)
                self._synchronize(torch, slots)
        except BaseException:
            self._synchronize(torch, restored)
            for slot in restored:
                if slot.offset < given_back:
                    _copy_to_tape(torch, tape, slot)
            for slot in restored:
                _resize(slot.storage, 0)
            self._release_device(torch)
            raise

    def _synchronize(self, torch: Any, slots: list[Slot]) -> None:
        """Wait for asynchronous copies on every device involved."""
        if self.simulated:
            return
        for device in {slot.storage.device for slot in slots}:
            torch.cuda.synchronize(device)

    def _release_device(self, torch: Any) -> None:
        """Hand freed blocks and cuBLAS workspaces back to the driver so other kernels can use them."""
        if self.simulated:
            return
        if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
            torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()

    def _release_pinned(self) -> None:
        """Freed pinned buffers sit in torch's host cache until emptied; give them back.

        Torch records an event on the streams a buffer's copies used when the buffer is dropped,
        and frees it only once that event has passed: hence the synchronize first."""
        torch = sys.modules.get("torch")
        if (
            self._pin
            and torch is not None
            and torch.cuda.is_initialized()
            and hasattr(torch._C, "_host_emptyCache")
        ):
            torch.cuda.synchronize()
            torch._C._host_emptyCache()

    def _left_bytes(self, torch: Any, slots: list[Slot]) -> int:
        if self.simulated:
            return 0
        devices = {slot.storage.device for slot in slots} or {torch.device("cuda")}
        return sum(torch.cuda.memory_allocated(device) for device in devices)


def _copy_to_tape(torch: Any, tape: Tape, slot: Slot, one_thread: bool = False) -> None:
    """Start copying a storage's bytes to its place on the tape (those past the tape's end go
    to disk, written by _write_rest)."""
    on_host = min(slot.nbytes, tape.memory_end - slot.offset)
    if on_host > 0:
        device_bytes = bytes_of(torch, slot.storage)
        for host, start, length in tape.pieces(slot.offset, on_host):
            _copy(host, device_bytes[start : start + length], one_thread)


def _largest_within(chunks: list[torch.Tensor], limit: int) -> list[torch.Tensor]:
    """The largest of ``chunks`` that fit in ``limit`` bytes together."""
    kept, total = [], 0
    for chunk in sorted(chunks, key=lambda c: c.numel(), reverse=True):
        if total + chunk.numel() <= limit:
            kept.append(chunk)
            total += chunk.numel()
    return kept


def _chunk_sizes(nbytes: int) -> list[int]:
    """``nbytes`` (a multiple of POOL_UNIT) as powers of two of POOL_UNIT, largest first, none
    above POOL_CHUNK_MAX."""
    whole, rest = divmod(nbytes, POOL_CHUNK_MAX)
    units = rest // POOL_UNIT
    powers = [POOL_UNIT << bit for bit in reversed(range(units.bit_length())) if units >> bit & 1]
    return [POOL_CHUNK_MAX] * whole + powers


def _mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"
