"""The acquire of the cell about to run, sent as soon as ipykernel dispatches its
``execute_request``: the round trip to the broker then overlaps ipykernel's and IPython's work
(publishing the input, transforming and compiling the cell), and the gate at the top of the cell
only waits for the answer. A cell that never reaches its gate gives the answer back.

The release stays where it is, in ``post_execute``, before the cell's reply: once a frontend sees
a cell finished, the broker has its release on the way, and a request another kernel sends then
does not queue behind a lease that already ended.

A mixin of :class:`~.runtime.Runtime`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .client import BrokerError
from .gate import WaitLine
from .membership import CANCEL_TIMEOUT, Membership, answer_of

if TYPE_CHECKING:
    from .runtime import Lease, Waiting

log = logging.getLogger(__name__)


class EarlyAcquire:
    """The acquire sent before the cell is prepared (see the module docstring)."""

    lease: Lease | None
    waiting: Waiting | None
    gpu_used: bool
    state: str
    engine: Any
    membership: Membership
    release: Callable[[Lease], None]
    finish_early_restore: Callable[[bool], Any]
    _send: Callable[[str, dict], None]
    _send_acquire: Callable[[int | None], tuple[Waiting, concurrent.futures.Future | None]]
    _granted: Callable[[str, dict], Lease]
    _restore_for_cell: Callable[[Lease, Waiting, WaitLine], None]
    _claim_kept: Callable[[], bool]
    _leave_cell: Callable[[], Lease | None]
    _depth: int
    _hand_back_kept: Callable[[], None]
    _early: tuple[Waiting, concurrent.futures.Future | None] | None = None
    _handler_patch: tuple[dict, Any, Any] | None = None

    def _send_early(self, code: str) -> None:
        """Send the acquire of the cell about to run before IPython prepares it (see the module
        docstring). Only for the plain case: a resident GPU kernel (a restore belongs inside the
        gate, where it shows), a cell that is not made only of ``%singularity`` line magics, and
        not a ``%%singularity`` cell (its reservation is read by the gate). A kept lease
        (:mod:`.kept_lease`) is the cell's if it will be gated, else given back first."""
        kept = self.lease
        if kept is not None and kept.kept_at is not None:
            if not needs_lease(code):
                self._hand_back_kept()
                return
            if self._claim_kept():
                return
        if self.lease is not None or self._early is not None or not self.gpu_used:
            return
        if self.membership.node and not self.membership.joined.is_set():
            return  # the gate waits for the broker, saying so
        engine = self.engine
        if self.state in ("offloaded", "spilled", "offloading", "error") or (
            engine is not None and engine.offloaded
        ):
            return
        if not needs_lease(code):
            return
        try:
            self._early = self._send_acquire(None)
        except BrokerError:
            self._early = None
            self.waiting = None

    def _pre_run_cell(self, info: Any) -> None:
        """Where the execute_request handler could not be wrapped, the earliest IPython hook."""
        self._send_early(getattr(info, "raw_cell", "") or "")

    def _wrap_execute_request(self, ipython: Any) -> None:
        """Send the acquire as soon as ipykernel dispatches an execute_request (before it
        publishes the input and IPython transforms the cell): about 0.25 ms earlier than
        ``pre_run_cell``. Silent requests are left to the gate."""
        handlers = getattr(getattr(ipython, "kernel", None), "shell_handlers", None)
        original = handlers.get("execute_request") if isinstance(handlers, dict) else None
        if original is None or not inspect.iscoroutinefunction(original):
            return
        runtime = self

        async def execute_request(stream: Any, ident: Any, parent: Any, *args: Any, **kw: Any):
            try:
                content = parent.get("content") or {}
                if not content.get("silent"):
                    runtime._send_early(str(content.get("code") or ""))
            except Exception:
                log.exception("jupyter-singularity: early lease request failed")
            try:
                return await original(stream, ident, parent, *args, **kw)
            finally:
                if not runtime._depth:  # interrupted before IPython ran the cell: no post_execute
                    runtime._leave_cell()

        handlers["execute_request"] = execute_request
        self._handler_patch = (handlers, original, execute_request)

    def _unwrap_execute_request(self) -> None:
        if self._handler_patch is not None:
            handlers, original, wrapper = self._handler_patch
            if handlers.get("execute_request") is wrapper:
                handlers["execute_request"] = original
            self._handler_patch = None

    def _abandon(self, early: tuple[Waiting, concurrent.futures.Future | None]) -> None:
        """The cell ended without reaching its gate (a syntax error, say): leave the queue, and
        give back a lease that was granted meanwhile, before any later acquire can be sent."""
        waiting, future = early
        self.finish_early_restore(True)
        if self.waiting is waiting:
            self.waiting = None
        if future is None:
            return
        self._send("cancel", {"request_id": waiting.request_id})
        self.membership.client.wait(future, CANCEL_TIMEOUT)  # (taken in here: see submit's collect)
        try:
            reply = answer_of(future, 0)
        except concurrent.futures.TimeoutError:
            return
        if not reply.get("granted"):
            return
        lease = self._granted(waiting.request_id, reply)
        if lease.restore:
            with contextlib.suppress(Exception):
                self._restore_for_cell(lease, waiting, WaitLine(False))
        if self.lease is lease:
            self.release(lease)


def needs_lease(raw_cell: str) -> bool:
    """Whether a cell's text will get a plain gate (see GateInserter): not empty, not made only
    of ``%singularity`` line magics, not a ``%%singularity`` cell."""
    lines = [
        line.strip()
        for line in raw_cell.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not lines or lines[0].startswith("%%singularity"):
        return False
    return not all(line == "%singularity" or line.startswith("%singularity ") for line in lines)
