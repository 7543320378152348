"""The replay: a trace played through the real decision core, on a virtual clock.

The driver plays the broker service and the kernels around :class:`~..broker.core.BrokerCore`,
as the service does (broker/service.py, broker/state_moves.py) and as the tests' state machine
does: a cell asks for a lease; a Grant starts it (after restoring its state, when it was
offloaded); its end releases the lease with the cell's peak; an Offload or a Spill is carried out
after the time its transfer takes and reported back (offloaded, spilled, restored). A cell that
needs more than its lease reserved (a first cell under ``first_cell_memory``, or one larger than
its kernel's earlier ones) and more than the other kernels on its GPU leave fails with
out-of-memory, as it would on a GPU: it counts as a cell that did not run. Events are
taken from a heap in time order; nothing sleeps.

Each cell asks for the GPU at its time in the trace, or when its kernel's previous cell ends if
that one ran late (a kernel runs one cell at a time). Its wait is how late it starts computing
compared with the trace: queueing, restoring, and the late cells ahead of it in its kernel, which
is what its user sees. A kernel ends at its end in the trace, or after its last cell if later. A
kernel's own moves run one after another, and so do the transfers of one GPU (its PCIe link).
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..broker.core import BrokerCore
from ..broker.model import Deny, Grant, LeaseEnded, Offload, Policy, Spill
from ..broker.quotas import Quotas
from .outcome import Outcome
from .site import Pool
from .trace import Session, Trace
from .transfers import Transfers

MODEL = "singularity"

Progress = Callable[[int], None]
"""Called with the number of cells done so far."""


@dataclass
class _Kernel:
    """One session as the driver plays it: its next cell, and where its state is."""

    session: Session
    index: int = 0
    request_id: str = ""
    asked: float = 0.0
    """When the current cell asked for the GPU in the trace: its wait counts from there."""
    gpu: int = 0
    host: int = 0
    disk: int = 0
    """Where its state is once the moves planned so far are done."""
    busy_until: float = 0.0
    """When its last planned move ends: the kernel moves its state one step at a time."""
    pinned: int = 0
    """Its pinned pool (the last Grant's pool_allowance): offloads through it run at full speed."""
    grant: Grant | None = None
    """The lease its current cell runs under (or waits for its restore under)."""
    overruns: bool = False
    """Whether its running cell holds more than its lease reserved."""


class Replay:
    """One trace on one pool (see the module docstring)."""

    def __init__(
        self,
        trace: Trace,
        pool: Pool,
        policy: Policy,
        quotas: Quotas | None = None,
        transfers: Transfers | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.transfers = transfers or Transfers()
        self.policy = policy
        self.progress = progress
        start = trace.span[0]
        self.core = BrokerCore(pool.devices, quotas, policy, now=start)
        self.outcome = Outcome(MODEL, pool.gpus)
        self.kernels = {s.kernel: _Kernel(s) for s in trace.sessions}
        self.link_free = dict.fromkeys((d.index for d in pool.devices), start)
        self.sizes = {d.index: d.total_bytes for d in pool.devices}
        self.overrunning: Counter[int] = Counter()
        """Per GPU, running cells that hold more than their lease reserved: while there are any,
        a cell within its own lease may find too little room too."""
        self._events: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._seq = itertools.count()
        self._done = 0
        self._start = start

    def run(self) -> Outcome:
        for kernel in self.kernels.values():
            self._at(kernel.session.cells[0].start, self._register, kernel)
        while self._events:
            now, _, handler, args = heapq.heappop(self._events)
            handler(now, *args)
        for kernel in self.kernels.values():
            if kernel.request_id:  # still waiting when nothing was left to happen
                self.outcome.failed(kernel.session.user, "never granted")
        return self.outcome

    # ------------------------------------------------------------------------------ events

    def _at(self, time: float, handler: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (time, next(self._seq), handler, args))

    def _register(self, now: float, kernel: _Kernel) -> None:
        session = kernel.session
        self._apply(now, self.core.register(session.kernel, session.user, now, session.groups))
        self._request(now, kernel)

    def _request(self, now: float, kernel: _Kernel) -> None:
        """The kernel's next cell asks for the GPU (with no hint: the core predicts its size)."""
        kernel.request_id = f"c{kernel.index}"
        kernel.asked = kernel.session.cells[kernel.index].start
        self._apply(now, self.core.acquire(kernel.session.kernel, kernel.request_id, now))

    def _start_cell(self, now: float, kernel: _Kernel) -> None:
        cell = kernel.session.cells[kernel.index]
        grant = kernel.grant
        assert grant is not None
        over = cell.memory > grant.reservation
        if over or self.overrunning[grant.device]:  # (else the bookings keep it in room)
            room = self._room(kernel, grant.device)
            if cell.memory > room:
                # More than the others leave (it or one of them took more than it booked): out
                # of GPU memory on a GPU, as a baseline's cell fails; its peak what it could take.
                self.outcome.failed(kernel.session.user, "out of memory")
                self._end_cell(now, kernel, kernel.request_id, peak=max(room, grant.reservation))
                return
        if over:
            self.overrunning[grant.device] += 1
            kernel.overruns = True
        self.outcome.waited(kernel.session.user, now - kernel.asked)
        self._at(now + cell.duration, self._end_cell, kernel, kernel.request_id)

    def _room(self, kernel: _Kernel, device: int) -> int:
        """GPU memory a cell of ``kernel`` can have on ``device`` now: the device's, less what
        the other kernels there hold (their state, or their running cell's peak)."""
        used = 0
        for kernel_id, record in self.core.kernels.items():
            if record.device != device or kernel_id == kernel.session.kernel:
                continue
            other = self.kernels[kernel_id]
            running = record.lease is not None and other.grant is not None
            cell = other.session.cells[other.index].memory if running else 0
            used += max(record.gpu_bytes, cell)
        return self.sizes[device] - used

    def _end_cell(
        self, now: float, kernel: _Kernel, request_id: str, peak: int | None = None
    ) -> None:
        """The cell ended (``peak``: it failed with that much, its state as before it)."""
        cell = kernel.session.cells[kernel.index]
        if peak is None:
            kernel.gpu = peak = cell.memory
        if kernel.overruns:
            assert kernel.grant is not None
            self.overrunning[kernel.grant.device] -= 1
        kernel.request_id, kernel.grant, kernel.overruns = "", None, False
        actions = self.core.release(
            kernel.session.kernel, request_id, now, peak_bytes=peak, gpu_bytes=kernel.gpu
        )
        self._apply(now, actions)
        if self.policy.idle_timeout > 0:
            self._at(now + self.policy.idle_timeout, self._tick)
        self._next_cell(now, kernel)

    def _next_cell(self, now: float, kernel: _Kernel) -> None:
        self._done += 1
        if self.progress is not None:
            self.progress(self._done)
        session = kernel.session
        kernel.index += 1
        if kernel.index < len(session.cells):
            self._at(session.resume(kernel.index, now), self._request, kernel)
        else:
            self._at(max(session.end, now), self._unregister, kernel)

    def _unregister(self, now: float, kernel: _Kernel) -> None:
        self.outcome.span = max(self.outcome.span, now - self._start)
        self._apply(now, self.core.unregister(kernel.session.kernel, now, "shut down"))

    def _tick(self, now: float) -> None:
        self._apply(now, self.core.tick(now))

    def _restored(self, now: float, kernel: _Kernel) -> None:
        if kernel.session.kernel in self.core.kernels:
            self._apply(now, self.core.restored(kernel.session.kernel, now, gpu_bytes=kernel.gpu))
            self._start_cell(now, kernel)

    def _offloaded(self, now: float, kernel: _Kernel, host: int, disk: int) -> None:
        if kernel.session.kernel in self.core.kernels:
            actions = self.core.offloaded(
                kernel.session.kernel, now, host_bytes=host, disk_bytes=disk, gpu_bytes=0
            )
            self._apply(now, actions)

    def _spilled(self, now: float, kernel: _Kernel, disk: int) -> None:
        if kernel.session.kernel in self.core.kernels:
            actions = self.core.spilled(kernel.session.kernel, now, host_bytes=0, disk_bytes=disk)
            self._apply(now, actions)

    # ----------------------------------------------------------------------------- actions

    def _apply(self, now: float, actions: list) -> None:
        """Carry out what the core decided, as the service would."""
        for action in actions:
            if isinstance(action, Grant):
                self._granted(now, action)
            elif isinstance(action, Offload):
                self._offload(now, action)
            elif isinstance(action, Spill):
                self._spill(now, action)
            elif isinstance(action, LeaseEnded):
                start = action.end - action.seconds
                self.outcome.held(action.user, action.device, start, action.end)
            elif isinstance(action, Deny):
                kernel = self.kernels[action.kernel_id]
                if action.request_id == kernel.request_id:
                    kernel.request_id = ""
                    self.outcome.failed(kernel.session.user, "denied")
                    self._next_cell(now, kernel)

    def _granted(self, now: float, grant: Grant) -> None:
        kernel = self.kernels[grant.kernel_id]
        if grant.request_id != kernel.request_id:
            return  # (an explicit restore: the driver never asks for one)
        kernel.pinned, kernel.grant = grant.pool_allowance, grant
        if not grant.restore:
            self._start_cell(now, kernel)
            return
        host, disk = kernel.host, kernel.disk
        end = self._move(now, kernel, grant.device, host, disk)
        kernel.gpu, kernel.host, kernel.disk = kernel.gpu + host + disk, 0, 0
        self.outcome.moved["restored"] += host + disk
        self._at(end, self._restored, kernel)

    def _offload(self, now: float, offload: Offload) -> None:
        kernel = self.kernels[offload.kernel_id]
        moved = kernel.gpu
        host = moved if offload.host_limit is None else min(moved, offload.host_limit)
        end = self._move(now, kernel, offload.device, host, moved - host)
        kernel.gpu, kernel.host, kernel.disk = 0, kernel.host + host, kernel.disk + moved - host
        self.outcome.evictions += 1
        self.outcome.moved["offloaded"] += moved
        self._at(end, self._offloaded, kernel, kernel.host, kernel.disk)

    def _spill(self, now: float, spill: Spill) -> None:
        kernel = self.kernels[spill.kernel_id]
        moved = kernel.host
        end = max(now, kernel.busy_until) + self.transfers.spill_seconds(moved)
        kernel.busy_until = end
        kernel.host, kernel.disk = 0, kernel.disk + moved
        self.outcome.moved["spilled"] += moved
        self._at(end, self._spilled, kernel, kernel.disk)

    def _move(self, now: float, kernel: _Kernel, device: int, host: int, disk: int) -> float:
        """When an offload or restore of ``host`` + ``disk`` bytes ends: its copies run over
        ``device``'s link after the kernel's earlier moves and the link's earlier copies; the
        driver tier's part holds only the kernel."""
        copies = self.transfers.copy_seconds(host, disk, kernel.pinned)
        self.link_free[device] = max(now, kernel.busy_until, self.link_free[device]) + copies
        kernel.busy_until = self.link_free[device] + self.transfers.context_seconds
        return kernel.busy_until
