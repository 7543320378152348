"""The queue and the scheduling pass: who runs next, who waits and where.

A mixin of :class:`~.core.BrokerCore`. The queue is kept in fair-share order as requests arrive
(a request's place never changes once it is queued), so a pass never sorts the pool's kernels.
A pass walks the queue in that order; once every device is claimed by a request ahead, the rest
of the queue can only wait or be denied (GPU-time quota), which the pass decides without a
placement search.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .incremental import Incremental, queue_order
from .model import (
    OFF_DEVICE_STATES,
    Action,
    Deny,
    Kernel,
    KernelState,
    Policy,
    Request,
    Wait,
)
from .placement import _Pass, _Placement

if TYPE_CHECKING:
    from ..devices import DeviceInfo
    from .quotas import Limits

_BEHIND = "queued behind earlier requests for the same GPU"
_RESTORING = "waiting for its restore to finish"
_FEW = 32
"""Requests left the queue since it was last read beyond which it is filtered in one walk."""
_WAITING_STATES = frozenset((*OFF_DEVICE_STATES, KernelState.COLD, KernelState.ERROR))
"""States of a kernel whose waiting request makes it ``queued``."""


class Scheduling:
    """The queue and the scheduling pass of :class:`~.core.BrokerCore` (see the module docstring)."""

    devices: dict[int, DeviceInfo]
    kernels: dict[str, Kernel]
    policy: Policy
    limits: Callable[..., Limits]
    _actions: list[Action]
    _pass: _Pass | None
    _seq: Iterator[int]
    _queue: list[Request]
    """Requests in fair-share order; one whose kernel no longer holds it is dropped when next read."""
    _queue_left: list[Request] | tuple[()] = ()
    """The requests that left the queue since it was last read (see :meth:`_left`)."""
    _ended_today: Callable[[str, float], float]
    _time_quota_denial: Callable[[Kernel, Request, float], str]
    _incremental: Incremental
    _grant: Callable[[Kernel, Request, _Placement, float], None]
    _start_offload: Callable[[Kernel, str, float], None]
    _set_state: Callable[[Kernel, KernelState, str, float], None]
    _settled_state: Callable[[Kernel], KernelState]

    def queue(self) -> list[Request]:
        return list(self._queued())

    def waiting(self) -> bool:
        """Whether any request waits."""
        return bool(self._queued())

    def _queued(self) -> list[Request]:
        """The waiting requests in fair-share order (the ones granted, denied or cancelled since
        the last read dropped)."""
        left, queue = self._queue_left, self._queue
        if not left:
            return queue
        self._queue_left = []
        if len(left) > _FEW:
            kernels = self.kernels
            self._queue = [
                r
                for r in queue
                if (kernel := kernels.get(r.kernel_id)) is not None and kernel.request is r
            ]
            return self._queue
        for request in left:  # (a few: each found by its place, not by a walk of the queue)
            at = bisect.bisect_left(queue, request.order, key=queue_order)
            if at < len(queue) and queue[at] is request:
                del queue[at]
        return queue

    def _enqueue(
        self, kernel: Kernel, request_id: str, memory: int | None, hold: bool, now: float
    ) -> None:
        limits = self.limits(kernel.user, kernel.groups)
        used = self._ended_today(kernel.user, now)
        delay = min(
            self.policy.fair_share_cap, self.policy.fair_share_rate * used / limits.priority
        )
        kernel.request = Request(
            request_id, kernel.kernel_id, memory, (now + delay, next(self._seq)), hold
        )
        bisect.insort(self._queue, kernel.request, key=queue_order)

    def _schedule(self, now: float) -> None:
        """One pass over the queue in fair-share order.

        A request that cannot run yet *claims* the device it will run on; no later request is granted
        there until it has run. This costs some packing but guarantees that every waiting request runs
        once the leases ahead of it end.
        """
        queue = self._queued()
        if not queue:
            return
        self._pass = _Pass(self, now)
        incremental = self._incremental
        claimed: set[int] = set()
        incremental.begin(now, claimed, queue)
        try:
            position = 0
            everywhere = len(self.devices)
            index = 0
            while index < len(queue):
                if len(claimed) == everywhere:
                    # Every device is claimed by a request ahead: only a denial can be decided.
                    incremental.behind(queue[index:])
                    self._wait_behind(queue[index:], position, now)
                    return
                # (The quiet requests before it wait as they did, and stay in the queue.)
                at = incremental.next_request(queue, index)
                position += at - index
                if len(claimed) == everywhere:  # (filled by claims carried over: see there)
                    index = at
                    continue
                if at == len(queue):
                    return
                request = queue[at]
                index = at + 1
                kernel = self.kernels[request.kernel_id]
                if kernel.lease is not None:
                    # Its explicit restore is under way; the cell is granted once it is back.
                    position += 1
                    self._tell_position(request, position, _RESTORING)
                    continue
                incremental.ahead(request.order)
                placement = incremental.place(kernel, request, claimed, now)
                if placement.deny:
                    self._deny(kernel, request, placement.deny, now)
                    continue
                if placement.device is not None and not placement.victims and not placement.wait:
                    self._grant(kernel, request, placement, now)
                    continue
                position += 1
                if placement.device != request.claimed:
                    incremental.reclaimed(kernel.kernel_id)
                    request.claimed = placement.device
                if placement.device is not None:
                    claimed.add(placement.device)
                    incremental.claim(request.order, placement.device, kernel.kernel_id)
                for victim in placement.victims:
                    if victim.state == KernelState.RESIDENT:
                        self._start_offload(
                            victim, f"making room for kernel {kernel.kernel_id[:8]}", now
                        )
                reason = placement.wait or "waiting for idle kernels to be offloaded"
                if kernel.state in _WAITING_STATES:
                    self._set_state(kernel, KernelState.QUEUED, reason, now)
                self._tell_position(request, position, reason)
                incremental.looked_at(kernel, request)
        finally:
            incremental.end()
            self._pass = None

    def _wait_behind(self, rest: list[Request], position: int, now: float) -> None:
        """The requests behind the last claim wait (or are denied for GPU time), in order."""
        kernels, over = self.kernels, self._incremental.over
        for request in rest:
            kernel = kernels[request.kernel_id]
            request.claimed = None  # (its placement is found again when it is next placed)
            if kernel.lease is not None:
                position += 1
                reason = _RESTORING
            else:
                denial = (
                    self._time_quota_denial(kernel, request, now)
                    if request.hold and kernel.user in over
                    else ""
                )
                if denial:
                    self._deny(kernel, request, denial, now)
                    continue
                position += 1
                reason = _BEHIND
                if kernel.state in _WAITING_STATES:
                    self._set_state(kernel, KernelState.QUEUED, reason, now)
            self._tell_position(request, position, reason)

    def _left(self, kernel: Kernel) -> None:
        """The kernel's request leaves the queue (granted, denied, cancelled, or the kernel gone):
        the next read of the queue drops it. Every such change goes through here."""
        self._incremental.left(kernel)
        if kernel.request is not None:
            if not self._queue_left:
                self._queue_left = []
            self._queue_left.append(kernel.request)
        kernel.request = None

    def _deny(self, kernel: Kernel, request: Request, reason: str, now: float) -> None:
        self._left(kernel)
        self._actions.append(Deny(kernel.kernel_id, request.request_id, reason))
        if kernel.state == KernelState.QUEUED:
            self._set_state(kernel, self._settled_state(kernel), "request denied", now)

    def _tell_position(self, request: Request, position: int, reason: str) -> None:
        """Tell a new request where it waits, and any request why, when that changes. A request
        that only moved up is not told here (a grant near the head would tell everyone behind
        it, within the decision): :meth:`positions` tells them, as often as the service asks."""
        if reason != request.reason or not request.position:
            request.position, request.reason = position, reason
            self._actions.append(Wait(request.kernel_id, request.request_id, position, reason))

    def positions(self) -> list[Wait]:
        """The waiting requests whose place in the queue changed since they were last told where
        they wait (a request's position is its place among the requests still waiting)."""
        waits = []
        for position, request in enumerate(self._queued(), 1):
            if request.position != position:
                request.position = position
                waits.append(Wait(request.kernel_id, request.request_id, position, request.reason))
        return waits
