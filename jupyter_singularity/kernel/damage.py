"""What a failed restore means for the user: what was lost, in the notebook's names, and what to do.

The engine knows which storages a damaged spill file lost (:class:`~.offload.Damage`); a user
knows names. Each lost storage is mapped to the names of the user namespace that use it: top-level
tensors (and their ``.grad``), the parameters, gradients and buffers of modules
(``model.fc.weight``, ``model.fc.weight.grad``), optimizer state
(``opt.state[model.fc.weight]['exp_avg']``) and tensors one level inside a dict, list or tuple
(``batch['x']``).

The two kinds of failure get different advice: lost state says exactly what was lost and that
``%singularity discard`` drops it (a retry cannot help); any other failure may pass, so running the
cell again is worth it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from itertools import islice
from typing import Any

from ..units import format_size
from .offload import Damage, StateDamaged
from .storages import grad_of, parts_of

#: Names listed in a message; the others are counted ("and 12 more").
MAX_NAMES = 10
#: Items looked at inside one dict, list or tuple of the namespace.
MAX_ITEMS = 1000


def where_state_is(engine: Any) -> str:
    """Where the kernel's offloaded state waits: in host memory, on disk, or both."""
    host, disk = engine.host_bytes, engine.disk_bytes
    if host and disk:
        return "in host memory and on disk"
    return "on disk" if disk else "in host memory"


def restore_failure(err: BaseException, engine: Any, shell: Any) -> str:
    """The message of a failed restore, after its headline: what happened and what to do."""
    if isinstance(err, StateDamaged):
        damage = err.damage
        return (
            f"{'; '.join(damage.reasons)}. Lost for good: {describe_lost(damage, shell)}. Intact: "
            f"{format_size(damage.intact_bytes)}, {where_state_is(engine)}. To go on with the "
            "intact part, run %singularity discard in a cell of its own: it drops what was lost "
            "(a lost tensor stays empty and raises an error when used; it never reads as zeros) "
            "and the rest comes back with the next cell. Restarting the kernel drops everything."
        )
    return (
        f"{err}. Nothing was lost: the kernel's state is kept {where_state_is(engine)}. This "
        "failure may pass (the saved state is not known to be damaged), so running the cell again "
        "retries the restore; restarting the kernel drops the state."
    )


def discarded(damage: Damage, engine: Any, shell: Any) -> str:
    """What ``%singularity discard`` dropped, and what happens to the rest."""
    after = (
        f"The rest of the kernel's state ({format_size(damage.intact_bytes)}, "
        f"{where_state_is(engine)}) is intact and comes back with the next cell (or %singularity "
        "restore)."
        if engine.offloaded
        else "Nothing else of the kernel's state was offloaded."
    )
    return (
        f"discarded what the damaged spill file(s) lost: {describe_lost(damage, shell)}. Those "
        "tensors stay empty: using one raises an error (it never reads as zeros); assign new ones "
        f"to go on. {after}"
    )


def describe_lost(damage: Damage, shell: Any) -> str:
    """``64.0 MiB: w (32.0 MiB), model.fc.weight (32.0 MiB), and 3 more``, and what no name
    holds."""
    named, unnamed = lost_names(damage, shell)
    parts = [f"{name} ({format_size(nbytes)})" for name, nbytes in named[:MAX_NAMES]]
    if len(named) > MAX_NAMES:
        parts.append(f"and {len(named) - MAX_NAMES} more")
    if unnamed:
        parts.append(
            f"{len(unnamed)} storage(s) of {format_size(sum(unnamed))} that no name of the "
            "notebook holds directly"
        )
    return f"{format_size(damage.nbytes)}: " + ", ".join(parts)


def lost_names(damage: Damage, shell: Any) -> tuple[list[tuple[str, int]], list[int]]:
    """The names of the user namespace whose tensors use a lost storage, each with the bytes it
    lost, and the sizes of the lost storages that no name reaches."""
    torch = sys.modules.get("torch")
    sizes = {storage._cdata: nbytes for storage, nbytes in damage.storages}
    named: list[tuple[str, int]] = []
    reached: set[int] = set()
    if torch is not None and shell is not None:
        for name, tensor in _named_tensors(torch, shell):
            keys = {storage._cdata for storage in parts_of(torch, tensor)} & sizes.keys()
            if keys:
                named.append((name, sum(sizes[key] for key in keys)))
                reached |= keys
    return named, [nbytes for key, nbytes in sizes.items() if key not in reached]


def _named_tensors(torch: Any, shell: Any) -> Iterator[tuple[str, Any]]:
    """Every tensor the user's names reach (see the module docstring), with its name."""
    hidden = getattr(shell, "user_ns_hidden", {})
    params: dict[int, str] = {}
    optimizers = []
    for name, value in list(shell.user_ns.items()):
        if name.startswith("_") or (name in hidden and hidden[name] is value):
            continue  # IPython's own names: In, Out, _, _1, _i...
        kind = type(value)
        if issubclass(kind, torch.Tensor):
            yield from _with_grad(name, value)
        elif issubclass(kind, torch.nn.Module):
            for inner, parameter in value.named_parameters():
                params.setdefault(id(parameter), f"{name}.{inner}")
                yield from _with_grad(f"{name}.{inner}", parameter)
            for inner, buffer in value.named_buffers():
                yield f"{name}.{inner}", buffer
        elif issubclass(kind, torch.optim.Optimizer):
            optimizers.append((name, value))
        elif kind in (dict, list, tuple):
            items = value.items() if isinstance(value, Mapping) else enumerate(value)
            for key, item in islice(items, MAX_ITEMS):
                if issubclass(type(item), torch.Tensor):
                    yield from _with_grad(f"{name}[{key!r}]", item)
    for name, optimizer in optimizers:
        for group, parameters in enumerate(g["params"] for g in optimizer.param_groups):
            for index, parameter in enumerate(parameters):
                params.setdefault(id(parameter), f"{name}.param_groups[{group}]['params'][{index}]")
        for parameter, state in list(optimizer.state.items()):
            label = params.get(id(parameter), "?")
            for key, item in state.items():
                if issubclass(type(item), torch.Tensor):
                    yield f"{name}.state[{label}][{key!r}]", item


def _with_grad(name: str, tensor: Any) -> Iterator[tuple[str, Any]]:
    yield name, tensor
    grad = grad_of(tensor)
    if grad is not None:
        yield f"{name}.grad", grad
