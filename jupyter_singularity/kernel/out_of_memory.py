"""A cell that runs out of GPU memory says, under its traceback, how much its lease booked and how
to book more. The pool makes room for what a lease books: beyond it, other kernels' state may
hold the rest of the GPU (a kernel's first cell under the admin's ``first_cell_memory``, or a
cell larger than its kernel's earlier ones), and torch's out-of-memory error alone does not say
that ``%%singularity --memory`` books more.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ..units import format_size

Booked = Callable[[], tuple[int, int] | None]
"""What the running cell's lease booked and its GPU's size, in bytes; None without a lease."""


def explain_out_of_memory(shell: Any, torch: Any, booked: Booked) -> None:
    """Show the hint under torch's out-of-memory errors in ``shell``'s cells. IPython calls the
    handler for that exception only, so other cells pay nothing; a handler the notebook set
    itself is left alone."""
    kind = getattr(torch, "OutOfMemoryError", None)
    if shell is None or kind is None or getattr(shell, "custom_exceptions", ()):
        return

    def handler(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None):
        shell.showtraceback((etype, value, tb), tb_offset=tb_offset, running_compiled_code=True)
        found = booked()
        hint = None if found is None else hint_for(*found)
        if hint:
            print(hint, file=sys.stderr)

    shell.set_custom_exc((kind,), handler)


def hint_for(reservation: int, total: int) -> str | None:
    """The hint for a cell whose lease booked ``reservation`` of a GPU of ``total`` bytes; None
    where it booked the whole GPU (then nothing else held any of it)."""
    if not 0 < reservation < total:
        return None
    return (
        f"jupyter-singularity: this cell had {format_size(reservation)} of the GPU's "
        f"{format_size(total)} booked, and other kernels' state may hold the rest. Put "
        "`%%singularity --memory SIZE` at the top of the cell and run it again: the pool then "
        "makes room for SIZE (it moves idle kernels' state off the GPU; nothing of theirs is lost)."
    )
