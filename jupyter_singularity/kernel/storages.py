"""Which torch storages an object holds: a tensor's (sparse ones have several, and its
gradient's), an untyped or a typed storage's. The engine's scan (:mod:`.offload`) and the lost
state's bookkeeping (:mod:`.damage`) find storages alike through these.

torch is passed in, never imported here (see :mod:`.offload`).
"""

from __future__ import annotations

import contextlib
from typing import Any


def of_kinds(objects: list[Any], kinds: list[type], wanted: set[type]) -> list[Any]:
    """The objects whose type (``kinds[i]`` is ``type(objects[i])``) is one of ``wanted``."""
    found = []
    for kind in wanted:
        at = -1
        with contextlib.suppress(ValueError):  # (no more of this kind)
            while True:
                at = kinds.index(kind, at + 1)
                found.append(objects[at])
    return found


def holder_types_of(torch: Any) -> tuple[type, ...]:
    return (torch.Tensor, torch.UntypedStorage, torch.TypedStorage)


def storages_held(torch: Any, holder: Any) -> list[Any]:
    """The storages behind a tensor, an untyped or a typed storage."""
    kind = type(holder)
    if issubclass(kind, torch.Tensor):
        return storages_of(torch, holder)
    if issubclass(kind, torch.UntypedStorage):
        return [holder]
    return [holder._untyped_storage]


def storages_of(torch: Any, tensor: Any) -> list[Any]:
    """The storages behind a tensor (sparse ones have several) and behind its gradient."""
    grad = grad_of(tensor)
    return parts_of(torch, tensor) + ([] if grad is None else parts_of(torch, grad))


def grad_of(tensor: Any) -> Any:
    """The gradient a leaf (or a tensor that retains it) holds, if any."""
    try:
        if tensor.is_leaf or tensor.retains_grad:
            return tensor.grad
    except Exception:
        pass  # tensor subclasses without a usable .grad: the scan must go on
    return None


def parts_of(torch: Any, tensor: Any) -> list[Any]:
    """The storages behind one tensor: sparse ones have several, some subclasses none."""
    try:
        layout = tensor.layout
        if layout == torch.sparse_coo:
            parts = [tensor._indices(), tensor._values()]
        elif layout in (torch.sparse_csr, torch.sparse_bsr):
            parts = [tensor.crow_indices(), tensor.col_indices(), tensor.values()]
        elif layout in (torch.sparse_csc, torch.sparse_bsc):
            parts = [tensor.ccol_indices(), tensor.row_indices(), tensor.values()]
        else:
            parts = [tensor]
        return [part.untyped_storage() for part in parts]
    except Exception:
        return []  # no storage torch exposes (nested, functional, fake, wrapper subclasses)
