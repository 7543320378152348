"""Tensors whose bytes were lost (a damaged spill file, dropped by ``%singularity discard``).

Their storages stay freed at 0 bytes, but torch does not check a storage's size in most
operations: on the CPU ``t.sum()`` over a 0-byte storage reads a null pointer and kills the
process, on a GPU it is an illegal memory access that poisons the CUDA context. So every tensor
over a lost storage is marked: its class becomes a subclass of its own class (a parameter stays a
``torch.nn.Parameter``) whose ``__torch_function__`` raises :class:`LostTensorError` for every
operation, printing included. Only metadata the engine's scan and a variable inspector read
(shape, dtype, grad, storage...) still answers. Assigning a new tensor to the name, or a new
``torch.nn.Parameter`` to the module attribute, replaces it.

torch is imported only when a tensor is marked.
"""

from __future__ import annotations

import functools
import types
from typing import Any


class LostTensorError(RuntimeError):
    """An operation on a tensor whose data was lost."""


class _Lost:
    """Mixin placed first in a lost tensor's class: nothing computes with it any more."""

    __slots__ = ()

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        __tracebackhide__ = True  # IPython shows the user's line, not this frame
        import torch

        if func in _metadata():
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise LostTensorError(
            "this tensor's data was lost: its spill file was damaged and %singularity discard "
            "dropped it; assign a new tensor (or a new model) to go on"
        )


_classes: dict[type, type] = {}

_GETTERS = ("grad", "is_leaf", "retains_grad", "layout", "shape", "dtype", "device", "ndim")
_METHODS = ("untyped_storage", "size", "dim", "numel", "element_size")


@functools.cache
def _metadata() -> frozenset:
    """Reads that touch no data: what the engine's scan and inspectors of the namespace need."""
    import torch

    tensor = torch.Tensor
    return frozenset(
        [getattr(tensor, name).__get__ for name in _GETTERS]
        + [getattr(tensor, name) for name in _METHODS]
    )


def mark_lost(tensor: Any) -> None:
    """Make every later operation on ``tensor`` raise LostTensorError (idempotent)."""
    kind = type(tensor)
    if issubclass(kind, _Lost):
        return
    lost = _classes.get(kind)
    if lost is None:
        lost = _classes[kind] = types.new_class(
            f"Lost{kind.__name__}",
            (_Lost, kind),
            exec_body=lambda ns: ns.update(__module__=__name__),
        )
    tensor.__class__ = lost


def is_lost(tensor: Any) -> bool:
    return issubclass(type(tensor), _Lost)
