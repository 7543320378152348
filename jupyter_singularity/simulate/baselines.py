"""What users would see without the pool, on the same trace and the same GPUs.

Three ways sites share GPUs today, each a configuration of one small model in which a kernel's
memory stays on its GPU until the kernel ends (nothing is offloaded):

- ``whole GPU``: static assignment (JupyterHub profiles): a GPU belongs to one user while any of
  their kernels lives; the user's kernels share it, other users wait for a free GPU.
- ``time-slicing``: Kubernetes time-slicing or MPS: kernels of any users share a GPU while their
  memory fits.
- ``idle culler``: time-slicing, plus jupyter_server's culler: a kernel idle for ``cull_after``
  seconds is killed, which frees its memory; its next cell first re-runs every cell the kernel had
  run (its state is rebuilt), and that time is the cell's wait.

Assumptions, each in the baselines' favour or neutral: a kernel starts (at its first cell) on the
GPU with the most free memory where that cell fits, and waits for one otherwise (first fit in
order of arrival: no out-of-memory at start); a later cell that needs more memory than its GPU
has free fails with out-of-memory at once, and the user goes on; cells sharing a GPU do not slow
each other down (nor in the replay of the pool); quotas do not apply.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .outcome import Outcome
from .replay import Progress
from .site import Pool
from .trace import Cell, Session, Trace

WHOLE_GPU, TIME_SLICING, IDLE_CULLER = "whole GPU", "time-slicing", "idle culler"


@dataclass(frozen=True)
class Baseline:
    name: str
    exclusive: bool
    """A GPU belongs to one user at a time."""
    cull_after: float | None = None
    """Seconds of idleness after which a kernel is killed (None: never)."""


def baselines(cull_after: float) -> list[Baseline]:
    return [
        Baseline(WHOLE_GPU, exclusive=True),
        Baseline(TIME_SLICING, exclusive=False),
        Baseline(IDLE_CULLER, exclusive=False, cull_after=cull_after),
    ]


@dataclass
class _Kernel:
    session: Session
    index: int = 0
    asked: float = 0.0
    device: int | None = None
    footprint: int = 0
    ran: list[Cell] = field(default_factory=list)
    lost: bool = False
    """Culled since its last cell: its next cell re-runs ``ran`` first."""
    idle_since: float | None = None


class SharedGpus:
    """One baseline's replay of a trace on a pool (see the module docstring)."""

    def __init__(
        self, trace: Trace, pool: Pool, baseline: Baseline, progress: Progress | None = None
    ) -> None:
        self.trace, self.baseline, self.progress = trace, baseline, progress
        self.start = trace.span[0]
        self.size = {d.index: d.total_bytes for d in pool.devices}
        self.used = dict.fromkeys(self.size, 0)
        self.owner: dict[int, str] = {}
        self.residents = dict.fromkeys(self.size, 0)
        self.waiting: list[_Kernel] = []
        self.outcome = Outcome(baseline.name, pool.gpus)
        self._events: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._seq = itertools.count()
        self._done = 0

    def run(self) -> Outcome:
        for session in self.trace.sessions:
            self._at(session.cells[0].start, self._request, _Kernel(session))
        while self._events:
            now, _, handler, args = heapq.heappop(self._events)
            handler(now, *args)
        for kernel in self.waiting:
            self.outcome.failed(kernel.session.user, "never granted")
        return self.outcome

    def _at(self, time: float, handler: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (time, next(self._seq), handler, args))

    def _request(self, now: float, kernel: _Kernel) -> None:
        kernel.asked, kernel.idle_since = kernel.session.cells[kernel.index].start, None
        if kernel.device is None:  # its first cell, or it was culled
            self.waiting.append(kernel)
            self._admit(now)
            return
        cell = kernel.session.cells[kernel.index]
        grow = cell.memory - kernel.footprint
        if grow > 0 and self.used[kernel.device] + grow > self.size[kernel.device]:
            self.outcome.failed(kernel.session.user, "out of memory")
            self._next(now, kernel)
            return
        if grow > 0:
            self.used[kernel.device] += grow
            kernel.footprint = cell.memory
        self._run(kernel, now)

    def _admit(self, now: float) -> None:
        """Start waiting kernels, in order of arrival, wherever they fit now."""
        for kernel in list(self.waiting):
            need = max(c.memory for c in [*kernel.ran, kernel.session.cells[kernel.index]])
            device = self._place(kernel.session.user, need)
            if device is None:
                continue
            self.waiting.remove(kernel)
            kernel.device, kernel.footprint = device, need
            self.used[device] += need
            self.residents[device] += 1
            self.owner[device] = kernel.session.user
            rerun = sum(c.duration for c in kernel.ran) if kernel.lost else 0.0
            if kernel.lost:
                self.outcome.rerun_cells += len(kernel.ran)
                self.outcome.held(kernel.session.user, device, now, now + rerun)
                kernel.lost = False
            self._run(kernel, now + rerun)

    def _place(self, user: str, need: int) -> int | None:
        if self.baseline.exclusive:
            mine = [d for d, owner in self.owner.items() if owner == user]
            candidates = mine or [d for d in self.size if d not in self.owner]
        else:
            candidates = list(self.size)
        fits = [d for d in candidates if self.size[d] - self.used[d] >= need]
        return max(fits, key=lambda d: (self.size[d] - self.used[d], -d), default=None)

    def _run(self, kernel: _Kernel, start: float) -> None:
        cell = kernel.session.cells[kernel.index]
        assert kernel.device is not None
        self.outcome.waited(kernel.session.user, start - kernel.asked)
        self.outcome.held(kernel.session.user, kernel.device, start, start + cell.duration)
        kernel.ran.append(cell)
        self._at(start + cell.duration, self._next, kernel)

    def _next(self, now: float, kernel: _Kernel) -> None:
        self._done += 1
        if self.progress is not None:
            self.progress(self._done)
        session = kernel.session
        kernel.index += 1
        kernel.idle_since = now
        if self.baseline.cull_after is not None:
            self._at(now + self.baseline.cull_after, self._cull, kernel, now)
        if kernel.index < len(session.cells):
            self._at(session.resume(kernel.index, now), self._request, kernel)
        else:
            self._at(max(session.end, now), self._end, kernel)

    def _cull(self, now: float, kernel: _Kernel, idle_since: float) -> None:
        if kernel.idle_since == idle_since and kernel.device is not None:
            kernel.lost = True
            self._leave(now, kernel)

    def _end(self, now: float, kernel: _Kernel) -> None:
        """The kernel shuts down (its replay ends here: the span runs to the last of these)."""
        self.outcome.span = max(self.outcome.span, now - self.start)
        self._leave(now, kernel)

    def _leave(self, now: float, kernel: _Kernel) -> None:
        device = kernel.device
        if device is None:
            return
        kernel.device, kernel.idle_since = None, None
        self.used[device] -= kernel.footprint
        self.residents[device] -= 1
        if not self.residents[device]:
            del self.owner[device]
        self._admit(now)
