"""The kernel's footprint on its device, read at the end of every cell at a cost that does not grow
with the size of the user's Python heap.

On CUDA the footprint is what torch's caching allocator holds (``torch.cuda.memory_reserved``): the
allocator measures it, nothing is scanned. On simulated devices the "device" state is the torch CPU
storages of at least ``min_bytes``, which no allocator counts apart from the rest of the heap, and
walking every live object to find them costs tens of milliseconds per 100k objects. So:

* :class:`LiveTensors` follows the tensors and storages without walking the heap (see there),
  and says when one holding ``min_bytes`` or more appeared or died;
* a cell that did neither, and moved neither the process's mapped nor its resident bytes
  (:func:`~.process_probes.memory_probe`, which sees a storage resized in place) by ``min_bytes``,
  has not changed the footprint: the last figure holds;
* otherwise the footprint is summed over the holders ``LiveTensors`` knows;
* after a restore the footprint is what the restore brought back: the engine's transfer says it.
"""

from __future__ import annotations

import gc
import itertools
import weakref
from collections.abc import Callable
from typing import Any

from .process_probes import memory_probe


class LiveTensors:
    """Every torch tensor and storage object the garbage collector tracks, found without walking
    the heap.

    Every object the collector tracks is born in its youngest generation and leaves it only
    through a collection, which calls ``gc.callbacks`` first. So one walk of the whole heap when
    watching starts, then a look at the youngest generation at the start of each collection (and
    at each :meth:`take_changed`), sees every holder once it exists: the cost follows what the
    user's code allocates (the youngest generation holds a few hundred objects), not the size of
    the heap. (This holds for CPython's generational collector up to 3.13 as for the incremental
    one of 3.14, whose young collections also start from generation 0.) Holders
    are kept by weak reference and dropped once dead. Objects ``gc.freeze()`` moved out of the
    collector's sight are not seen (neither does ``gc.get_objects()`` see them).

    ``device_storages(holder)`` names the device storages a holder holds (by key);
    :meth:`take_changed` tells whether a storage came to be held or stopped being held by any
    holder since it was last asked (a holder of one already held, as the storage objects made to
    look at a tensor, changes nothing).
    """

    def __init__(self, holders: tuple[type, ...], device_storages: Callable[[Any], list]) -> None:
        self._holders = holders
        self._device_storages = device_storages
        self._kinds: dict[type, bool] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._held: dict[int, tuple] = {}  # id of a holder's weak reference -> its storages
        self._holders_of: dict[Any, int] = {}  # storage -> how many holders hold it
        self._watching = False
        self._changed = False

    def start(self) -> None:
        """Take what exists (the one walk of the whole heap) and watch collections from now on."""
        if self._watching:
            return
        self._watching = True
        gc.callbacks.append(self._on_collection)
        self._take(gc.get_objects())

    def stop(self) -> None:
        self._watching = False
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)
        self._refs.clear()
        self._held.clear()
        self._holders_of.clear()

    def objects(self) -> list[Any]:
        """The holders alive now (as of the last :meth:`take_changed`)."""
        alive = []
        for key, ref in self._refs.copy().items():  # a collection may add to it meanwhile
            obj = ref()
            if obj is not None:
                alive.append(obj)
            elif self._refs.get(key) is ref:
                del self._refs[key]
        return alive

    def take_changed(self) -> bool:
        """Whether a holder of device state appeared or died since the last call."""
        self._take(gc.get_objects(generation=0))
        changed, self._changed = self._changed, False
        return changed

    def _died(self, ref: weakref.ref) -> None:
        for storage in self._held.pop(id(ref), ()):
            count = self._holders_of.pop(storage, 1) - 1
            if count > 0:
                self._holders_of[storage] = count
            else:
                self._changed = True

    def _on_collection(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._take(gc.get_objects(generation=0))

    def _take(self, objects: list[Any]) -> None:
        """Keep the holders among ``objects``; the filtering runs in C, one pass per kind seen."""
        kinds = {kind for kind in set(map(type, objects)) if self._is_holder(kind)}
        if not kinds:
            return
        refs = self._refs
        for obj in itertools.compress(objects, map(kinds.__contains__, map(type, objects))):
            known = refs.get(id(obj))
            if known is not None and known() is obj:
                continue
            try:
                storages = tuple(self._device_storages(obj))
            except Exception:  # (called from collections: never raise) a change, to be safe
                storages, self._changed = (), True
            try:
                ref = weakref.ref(obj, self._died) if storages else weakref.ref(obj)
            except TypeError:  # a holder without weak references: not kept
                continue
            refs[id(obj)] = ref
            if storages:
                self._held[id(ref)] = storages
                for storage in storages:
                    count = self._holders_of.get(storage, 0)
                    self._changed = self._changed or count == 0
                    self._holders_of[storage] = count + 1

    def _is_holder(self, kind: type) -> bool:
        known = self._kinds.get(kind)
        if known is None:
            # never isinstance on the objects: it reads __class__, which proxies may fake
            known = self._kinds[kind] = issubclass(kind, self._holders)
        return known


class Footprint:
    """The simulated device footprint of the kernel (see the module docstring)."""

    def __init__(self, min_bytes: int) -> None:
        self.min_bytes = min_bytes
        self._probe = memory_probe()
        self._mark: tuple[int, int] | None = None
        self._bytes: int | None = None
        self._tensors: LiveTensors | None = None

    def measure(self, engine: Any, force: bool = False) -> int:
        """Bytes of the engine's device storages now; summed again only when a holder of them
        appeared or died, or the process's memory moved by ``min_bytes``, since the last figure
        (or ``force``)."""
        holders = engine.holder_types()
        if holders is None:
            return 0
        if self._tensors is None:
            self._tensors = LiveTensors(holders, engine.device_storage_keys)
            self._tensors.start()
        changed = self._tensors.take_changed()
        if changed or force or self._bytes is None or self._moved():
            self._bytes = int(engine.device_bytes(self._tensors.objects()))
            self._mark = self._probe() if self._probe is not None else None
        return self._bytes

    @property
    def last(self) -> int | None:
        """The last figure, or None before the first (or after an offload)."""
        return self._bytes

    def known(self, nbytes: int) -> None:
        """The footprint is ``nbytes`` now (what a restore just brought back): no need to sum."""
        self._bytes = int(nbytes)
        self._mark = self._probe() if self._probe is not None else None

    def forget(self) -> None:
        """The state moved off the device: the next figure is summed again."""
        self._bytes = None

    def _moved(self) -> bool:
        if self._probe is None or self._mark is None:
            return True
        now = self._probe()
        return any(abs(a - b) >= self.min_bytes for a, b in zip(now, self._mark, strict=True))

    def close(self) -> None:
        if self._tensors is not None:
            self._tensors.stop()
            self._tensors = None
