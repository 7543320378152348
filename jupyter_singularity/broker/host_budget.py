"""The host-memory budget of offloaded state: what is held, the room an offload gets, what spills.

A mixin of :class:`~.core.BrokerCore`. Every byte of offloaded state in host memory counts,
whatever its kernel's queue state, and so does the room given to each offload in flight, reserved
until the offload is reported, and the host memory the driver tier keeps a checkpointed process's
GPU memory in (reserved before the checkpoint, counted with the kernel's host copy). An offload is only ever given the room left (within the pool's
``host_memory_limit`` and its user's ``host_memory`` quota) and writes the rest of its state
straight to disk, so host memory holds to the budget while cells wait. Spills move the coldest
host copies to disk when the budget is exceeded all the same: a quota lowered, or a kernel that
kept more than it was given.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from ..units import format_size
from .model import SPILLABLE_STATES, Action, Kernel, KernelState, Policy, Spill
from .quotas import Limits


class HostBudget:
    """Host-memory accounting of :class:`~.core.BrokerCore` (see the module docstring)."""

    policy: Policy
    kernels: dict[str, Kernel]
    limits: Callable[..., Limits]
    _actions: list[Action]
    _by_user: dict[str, dict[str, Kernel]]
    host_held: int
    """Bytes of host memory held for offloaded state: host copies plus offloads' reserved room."""
    _host_held_by_user: dict[str, int]
    _host_recheck: set[str]
    """Users whose held host memory or host_memory quota may have changed since the last check."""
    _host_over: set[str]
    """Users holding more host memory than their quota, as of the last check."""

    def _hold_host(
        self, kernel: Kernel, host_bytes: int | None = None, reserved: int | None = None
    ) -> None:
        """Set the kernel's host copy and reserved room, keeping the held totals in step."""
        before = kernel.host_bytes + kernel.host_reserved
        if host_bytes is not None:
            kernel.host_bytes = host_bytes
        if reserved is not None:
            kernel.host_reserved = reserved
        change = kernel.host_bytes + kernel.host_reserved - before
        if change:
            self._host_recheck.add(kernel.user)
            self.host_held += change
            held = self._host_held_by_user.get(kernel.user, 0) + change
            if held:
                self._host_held_by_user[kernel.user] = held
            else:
                self._host_held_by_user.pop(kernel.user, None)

    def _host_room(self, kernel: Kernel) -> int | None:
        """Host memory an offload of ``kernel`` may use now: the room the pool's limit and the
        user's quota leave (None: neither is set). No more than its footprint, which is the most
        it can move, so that offloads started together share the room."""
        rooms = []
        if self.policy.host_memory_limit:
            rooms.append(self.policy.host_memory_limit - self.host_held)
        quota = self.limits(kernel.user, kernel.groups).host_memory
        if quota is not None:
            rooms.append(quota - self._host_held_by_user.get(kernel.user, 0))
        if not rooms:
            return None
        room = max(0, min(rooms))
        return min(room, kernel.gpu_bytes) if kernel.gpu_bytes else room

    def reserve_driver_copy(self, kernel_id: str, nbytes: int) -> bool:
        """Before the driver tier checkpoints a kernel's process, whose GPU memory the driver then
        keeps in host memory: hold room for the kernel's host memory with that copy, ``nbytes``
        in all (in place of the room an offload in flight was given). False, holding nothing
        more, where the pool's host_memory_limit or the user's quota has no such room: the
        driver tier is then not used."""
        kernel = self.kernels.get(kernel_id)
        if kernel is None:
            return False
        change = nbytes - kernel.host_bytes - kernel.host_reserved
        limit = self.policy.host_memory_limit
        if limit and self.host_held + change > limit:
            return False
        quota = self.limits(kernel.user, kernel.groups).host_memory
        if quota is not None and self._host_held_by_user.get(kernel.user, 0) + change > quota:
            return False
        self._hold_host(kernel, reserved=max(0, nbytes - kernel.host_bytes))
        return True

    def release_driver_copy(self, kernel_id: str) -> None:
        """The driver gave the process its GPU memory back (restored), or never took it (a
        failed checkpoint of a stalled kernel): its room goes back to the pool."""
        kernel = self.kernels.get(kernel_id)
        if kernel is not None and kernel.state != KernelState.OFFLOADING:
            self._hold_host(kernel, reserved=0)

    def _host_full(self, kernel: Kernel, why: str) -> str:
        """Why an offload that fit neither its host room nor the disk was refused: one line that
        names the setting which bounded its room."""
        quota = self.limits(kernel.user, kernel.groups).host_memory
        limit = self.policy.host_memory_limit
        quota_room = None if quota is None else quota - self._host_held_by_user.get(kernel.user, 0)
        if quota_room is not None and (not limit or quota_room < limit - self.host_held):
            setting = f"the host_memory quota of {kernel.user} ({format_size(quota)})"
        else:
            setting = f"host_memory_limit ({format_size(limit)})"
        why = " ".join(why.split())  # one line, whatever the kernel wrote
        return f"{setting} is full and the spill directory cannot take the rest: {why}"

    def _enforce_host_budget(self) -> None:
        """Spill host copies while host memory is over the pool's budget or a user's quota: idle
        kernels' first, then queued ones', the least recently used first. Copies already on their
        way to disk count as gone."""
        limit = self.policy.host_memory_limit
        for user in self._host_recheck:
            held = self._host_held_by_user.get(user)
            quota = None if held is None else self._quota_of(user)
            if quota is not None and held > quota:
                self._host_over.add(user)
            else:
                self._host_over.discard(user)
        self._host_recheck.clear()
        if not (limit and self.host_held > limit) and not self._host_over:
            return
        leaving = [k for k in self.kernels.values() if k.spilling]
        total = self.host_held - sum(k.host_bytes for k in leaving)
        # A kernel on its way to disk may hold nothing any more (its user then has no entry).
        by_user = Counter(self._host_held_by_user)
        for kernel in leaving:
            by_user[kernel.user] -= kernel.host_bytes
        candidates = sorted(
            (
                k
                for k in self.kernels.values()
                if k.host_bytes
                and k.state in SPILLABLE_STATES
                and k.lease is None
                and not k.spilling
                and not k.spill_refused
            ),
            key=lambda k: (k.request is not None, k.last_activity),
        )
        for kernel in candidates:
            quota = self.limits(kernel.user, kernel.groups).host_memory
            over_pool = bool(limit) and total > limit
            over_user = quota is not None and by_user[kernel.user] > quota
            if not (over_pool or over_user):
                continue
            kernel.spilling = True
            total -= kernel.host_bytes
            by_user[kernel.user] -= kernel.host_bytes
            reason = (
                "host memory of the pool is full"
                if over_pool
                else f"host memory quota of {kernel.user} reached"
            )
            self._actions.append(Spill(kernel.kernel_id, reason))

    def _host_quota_changed(self, user: str | None = None) -> None:
        """The host_memory quota of ``user`` (of everyone: None) may be another now: quotas
        changed, or the kernel whose groups make it came or went."""
        self._host_recheck.update(self._host_held_by_user if user is None else (user,))

    def _quota_of(self, user: str) -> int | None:
        """The user's host_memory quota, as the groups of (any of) their kernels make it."""
        kernel = next(iter(self._by_user.get(user, {}).values()), None)
        return None if kernel is None else self.limits(user, kernel.groups).host_memory
