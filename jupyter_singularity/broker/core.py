"""The pool broker's decision core: pure and deterministic.

State and a clock come in, actions go out; nothing here does I/O. The asyncio service
(:mod:`.service`) feeds it events (a kernel registered, a cell asked for a lease, an offload finished)
and carries out the actions it returns (grant, deny, offload kernel K, restore K onto device D). Keeping
the decisions pure lets the hypothesis state machine in the tests drive it through millions of
interleavings, and lets the benchmark time a decision without any I/O in the way.

Memory rule: every kernel with state on a device *books* memory there — its footprint while idle, and
``max(reservation, footprint)`` while it holds a lease. Bookings on a device never exceed its size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from ..devices import DeviceInfo
from .host_budget import HostBudget
from .incremental import Incremental
from .model import (
    DAY,
    OFF_DEVICE_STATES,
    SPILLABLE_STATES,
    Action,
    BrokerError,
    Deny,
    Forget,
    Grant,
    Kernel,
    KernelState,
    Lease,
    LeaseEnded,
    Offload,
    Policy,
    Request,
    StateChanged,
    _midnight,
    _seconds_since,
)
from .placement import Placement, _Pass, _Placement
from .quotas import Limits, Quotas
from .rejoin import Rejoin
from .scheduling import Scheduling

# ------------------------------------------------------------------------------------------- core


class BrokerCore(Scheduling, HostBudget, Placement, Rejoin):
    """All decisions of the pool. Every public method takes ``now`` and returns the actions to carry out."""

    def __init__(
        self,
        devices: Iterable[DeviceInfo],
        quotas: Quotas | None = None,
        policy: Policy | None = None,
        usage_today: dict[str, float] | None = None,
        now: float = 0.0,
    ) -> None:
        self.devices: dict[int, DeviceInfo] = {d.index: d for d in devices}
        self.quotas = quotas or Quotas({})
        self.policy = policy or Policy()
        self.kernels: dict[str, Kernel] = {}
        self.usage_today: dict[str, float] = dict(usage_today or {})
        self.day = int(now // DAY)
        self._seq = itertools.count()
        self._actions: list[Action] = []
        self._limits_cache: dict[tuple[str, tuple[str, ...]], Limits] = {}
        self._pass: _Pass | None = None
        self._incremental = Incremental(self)
        sizes = {d.total_bytes for d in self.devices.values()}
        self._uniform = len(sizes) == 1
        # Lists of candidates every request of a kind shares (never changed in place).
        self._every_device = list(self.devices)
        self._devices_of_chip: dict[str, list[int]] = {}
        for d, info in self.devices.items():
            self._devices_of_chip.setdefault(info.chip, []).append(d)
        # Indexes kept in step with every kernel's device and user, so a scheduling pass never
        # walks all kernels.
        self._by_device: dict[int, dict[str, Kernel]] = {d: {} for d in self.devices}
        self._homed = dict.fromkeys(self.devices, 0)
        self._by_user: dict[str, dict[str, Kernel]] = {}
        self.unavailable: dict[int, str] = {}
        """Devices that take no new grant, and why (see :meth:`set_device_unavailable`)."""
        self.pool_allowances = 0
        """The sum of every kernel's ``pool_allowance``."""
        self.host_held = 0
        self._host_held_by_user: dict[str, int] = {}
        self._host_recheck: set[str] = set()
        self._host_over: set[str] = set()
        self._queue: list[Request] = []
        self.expected: dict[str, int] = {}
        self.expected_until = now

    # ----------------------------------------------------------------------------- public events

    def register(
        self, kernel_id: str, user: str, now: float, groups: Iterable[str] = (), notebook: str = ""
    ) -> list[Action]:
        """A new kernel joins the pool; its home is the device with the most unbooked memory."""
        if kernel_id in self.kernels:
            raise BrokerError(f"kernel {kernel_id} is already registered")
        home = None
        if self.devices:
            booked, homed = self._incremental.booked(), self._homed
            home = max(
                self.devices, key=lambda d: (self.devices[d].total_bytes - booked[d], -homed[d], -d)
            )
        kernel = Kernel(kernel_id, user, tuple(groups), notebook, None, now)
        self._set_home(kernel, home)
        self.kernels[kernel_id] = kernel
        self._by_user.setdefault(user, {})[kernel_id] = kernel
        self._incremental.touch(kernel)
        self._host_quota_changed(user)
        self._registered(kernel, now)
        return self._drain()

    def unregister(self, kernel_id: str, now: float, reason: str = "kernel gone") -> list[Action]:
        """The kernel died or was shut down: free its booking, lease and request, then reschedule."""
        kernel = self.kernels.pop(kernel_id, None)
        if kernel is None:
            return []
        self._incremental.touch(kernel)
        self._forget_expected(kernel_id)
        self._hold_host(kernel, 0, 0)
        del self._by_user[kernel.user][kernel_id]
        if kernel.home is not None:
            self._homed[kernel.home] -= 1
        self._host_quota_changed(kernel.user)
        self.pool_allowances -= kernel.pool_allowance
        device = kernel.device
        self._move(kernel, None)
        if kernel.lease is not None:
            self._end_lease(kernel, now, None)
        if kernel.request is not None:
            self._actions.append(Deny(kernel_id, kernel.request.request_id, "kernel is gone"))
            self._left(kernel)
        self._actions.append(
            StateChanged(kernel_id, kernel.user, kernel.state, None, device, reason, now)
        )
        self._actions.append(Forget(kernel_id))
        self._schedule(now)
        return self._drain()

    def acquire(
        self,
        kernel_id: str,
        request_id: str,
        now: float,
        memory: int | None = None,
        device: int | None = None,
    ) -> list[Action]:
        """A cell wants the GPU. ``memory`` is the user's explicit reservation, if any;
        ``device`` the only device the kernel can use (its CUDA driver chose already).

        A cell started during an explicit restore is not refused: a queued restore becomes the
        cell's request (keeping its place), and a restore under way finishes before the cell's
        grant."""
        kernel = self._kernel(kernel_id)
        if device is not None and device not in self.devices:
            raise BrokerError(f"no device {device} in the pool")
        request = kernel.request
        if (kernel.lease is not None and kernel.lease.hold) or (
            request is not None and request.hold
        ):
            self._actions.append(
                Deny(kernel_id, request_id, "this kernel already holds or awaits a GPU lease")
            )
            return self._drain()
        if request is not None:
            request.request_id, request.memory, request.hold = request_id, memory, True
            request.position, request.reason = 0, ""  # so the cell hears where it waits
        else:
            self._enqueue(kernel, request_id, memory, hold=True, now=now)
            assert kernel.request is not None
            kernel.request.device = device
        self._schedule(now)
        return self._drain()

    def restore(self, kernel_id: str, now: float) -> list[Action]:
        """Bring an offloaded kernel back onto a device without running a cell (a user's request)."""
        kernel = self._kernel(kernel_id)
        if kernel.state not in OFF_DEVICE_STATES:
            raise BrokerError(f"kernel is {kernel.state.value}, not offloaded: nothing to restore")
        if kernel.request is not None:
            return []
        self._enqueue(kernel, f"restore-{next(self._seq)}", None, hold=False, now=now)
        self._schedule(now)
        return self._drain()

    def cancel(self, kernel_id: str, request_id: str, now: float) -> list[Action]:
        """The waiting cell was interrupted: leave the queue without a trace."""
        kernel = self.kernels.get(kernel_id)
        if kernel is None or kernel.request is None or kernel.request.request_id != request_id:
            return []
        self._left(kernel)
        if kernel.state == KernelState.QUEUED:
            self._set_state(kernel, self._settled_state(kernel), "request cancelled", now)
        self._schedule(now)
        return self._drain()

    def release(
        self,
        kernel_id: str,
        request_id: str,
        now: float,
        peak_bytes: int | None = None,
        gpu_bytes: int | None = None,
        idle_seconds: float = 0.0,
    ) -> list[Action]:
        """The cell ended. Its peak teaches the core the kernel's footprint for the next reservation.
        ``idle_seconds``: how long the kernel kept the lease after its last cell (not charged)."""
        kernel = self._kernel(kernel_id)
        if kernel.lease is None or kernel.lease.request_id != request_id:
            return self._last_run_cell_ended(kernel, now, peak_bytes, gpu_bytes)
        self._set_footprint(kernel, peak_bytes, gpu_bytes, now)
        self._end_lease(kernel, max(kernel.lease.start, now - idle_seconds), peak_bytes)
        self._set_state(kernel, KernelState.RESIDENT, "cell finished", now)
        if kernel.offload_asked and kernel.request is None:
            self._start_offload(kernel, kernel.offload_asked, now)
        kernel.offload_asked = ""
        self._relieve_overcommit(kernel.device, now)
        self._schedule(now)
        return self._drain()

    def _set_footprint(
        self, kernel: Kernel, peak_bytes: int | None, gpu_bytes: int | None, now: float
    ) -> None:
        """A cell ended with this peak and this much left on the device; the kernel is idle."""
        if peak_bytes is not None:
            kernel.peaks = [*kernel.peaks, peak_bytes][-self.policy.peak_history :]
        if gpu_bytes is not None:
            kernel.gpu_bytes = gpu_bytes
        kernel.refused = ""
        kernel.last_activity = now

    def restored(self, kernel_id: str, now: float, gpu_bytes: int | None = None) -> list[Action]:
        """The kernel's state is back on its device."""
        kernel = self._kernel(kernel_id)
        if kernel.state != KernelState.RESTORING:
            return []
        if gpu_bytes is not None:
            kernel.gpu_bytes = gpu_bytes
        self._hold_host(kernel, host_bytes=0)
        kernel.disk_bytes = 0
        kernel.spill_refused = ""
        kernel.last_activity = now
        if kernel.lease is not None and kernel.lease.hold:
            self._set_state(kernel, KernelState.RUNNING, "restored", now)
        else:
            kernel.lease = None
            self._set_state(kernel, KernelState.RESIDENT, "restored", now)
            self._schedule(now)
        return self._drain()

    def restore_failed(self, kernel_id: str, reason: str, now: float) -> list[Action]:
        """Restoring failed; the host copy is intact (it is only freed after a restore completes)."""
        kernel = self._kernel(kernel_id)
        if kernel.state != KernelState.RESTORING:
            return []
        if kernel.lease is not None:
            self._end_lease(kernel, now, None)
        kernel.gpu_bytes = 0
        self._move(kernel, None)
        self._set_state(kernel, KernelState.ERROR, f"restore failed: {reason}", now)
        self._schedule(now)
        return self._drain()

    def process_unusable(
        self,
        kernel_id: str,
        reason: str,
        now: float,
        host_bytes: int,
        disk_bytes: int = 0,
        gpu_bytes: int | None = None,
    ) -> list[Action]:
        """A failed driver checkpoint left the kernel's process unable to use CUDA: never handed
        on as offloaded, it keeps what it holds where it is (its GPU memory booked, its host
        copy counted) until it is restarted, and its record says why."""
        kernel = self._kernel(kernel_id)
        if kernel.lease is not None:
            self._end_lease(kernel, now, None)
        self._hold_host(kernel, host_bytes, reserved=0)
        kernel.disk_bytes = disk_bytes
        if gpu_bytes is not None:
            kernel.gpu_bytes = gpu_bytes
        self._set_state(kernel, KernelState.ERROR, reason, now)
        self._schedule(now)
        return self._drain()

    def discarded(
        self, kernel_id: str, now: float, host_bytes: int, disk_bytes: int
    ) -> list[Action]:
        """The kernel dropped the part of its offloaded state a damaged spill file lost
        (``%singularity discard``): out of ``error``, it waits with what is left, if anything."""
        kernel = self._kernel(kernel_id)
        if kernel.state not in (KernelState.ERROR, *OFF_DEVICE_STATES) or kernel.lease is not None:
            return []
        self._hold_host(kernel, host_bytes=host_bytes)
        kernel.disk_bytes = disk_bytes
        if kernel.request is None:
            self._set_state(kernel, self._settled_state(kernel), "damaged state discarded", now)
        self._schedule(now)
        return self._drain()

    def offloaded(
        self, kernel_id: str, now: float, host_bytes: int, disk_bytes: int = 0, gpu_bytes: int = 0
    ) -> list[Action]:
        """The kernel's state left the GPU; ``gpu_bytes`` is what stayed (e.g. a CUDA context)."""
        kernel = self._kernel(kernel_id)
        if kernel.state != KernelState.OFFLOADING:
            return []
        self._hold_host(kernel, host_bytes, reserved=0)
        kernel.disk_bytes, kernel.gpu_bytes = disk_bytes, gpu_bytes
        if kernel.gpu_bytes == 0:
            self._move(kernel, None)
        elif not (host_bytes or disk_bytes):
            # Nothing could be moved off: it stays resident, and asking again before its next cell
            # would free nothing either (and would loop: evict, report, evict...).
            kernel.refused = "offloading freed no more GPU memory"
        new = KernelState.QUEUED if kernel.request is not None else self._settled_state(kernel)
        self._set_state(kernel, new, "offload finished", now)
        self._schedule(now)
        return self._drain()

    def context_back(self, kernel_id: str, device: int, nbytes: int, now: float) -> list[Action]:
        """The driver tier brought the process of a kernel whose state is off the GPU back onto
        ``device`` ahead of its grant (a swap: see broker/swaps.py): its CUDA context (``nbytes``,
        in host memory until now) is booked there, as one the driver tier never took, until its
        restore."""
        kernel = self._kernel(kernel_id)
        if (  # (its host copy idle, queued or not)
            kernel.state not in SPILLABLE_STATES
            or kernel.lease is not None
            or kernel.device not in (None, device)
        ):
            return []  # granted meanwhile: its lease books the device
        self._move(kernel, device)
        kernel.gpu_bytes = nbytes
        self._hold_host(kernel, max(0, kernel.host_bytes - nbytes))
        self._schedule(now)
        return self._drain()

    def context_off(self, kernel_id: str, nbytes: int, now: float) -> list[Action]:
        """The driver tier took back the process of a kernel whose context a swap had brought
        back (``context_back``) and that was not granted: the context (``nbytes``) is in host
        memory again, off the GPU."""
        kernel = self._kernel(kernel_id)
        if (
            kernel.state not in SPILLABLE_STATES
            or kernel.lease is not None
            or kernel.device is None
        ):
            return []
        self._move(kernel, None)
        kernel.gpu_bytes = 0
        self._hold_host(kernel, kernel.host_bytes + nbytes, reserved=0)
        self._schedule(now)
        return self._drain()

    def spilled(self, kernel_id: str, now: float, host_bytes: int, disk_bytes: int) -> list[Action]:
        """The kernel's host copy moved (partly) to disk to respect the host-memory budget."""
        kernel = self._kernel(kernel_id)
        kernel.spilling = False
        if kernel.state not in SPILLABLE_STATES:
            return self._drain()
        self._hold_host(kernel, host_bytes)
        kernel.disk_bytes = disk_bytes
        if host_bytes:
            # What stayed cannot leave memory now (pinned memory of a process the driver holds
            # checkpointed): asking again before the kernel next runs would move nothing.
            kernel.spill_refused = "part of the host copy stays in memory until the kernel runs"
        if kernel.request is None:
            self._set_state(kernel, self._settled_state(kernel), "spilled to disk", now)
        return self._drain()

    def spill_failed(self, kernel_id: str, reason: str, now: float) -> list[Action]:
        """The spill could not complete (a full disk); the host copy is intact and stays."""
        kernel = self._kernel(kernel_id)
        kernel.spilling = False
        kernel.spill_refused = reason
        return self._drain()

    def offload_failed(
        self, kernel_id: str, reason: str, now: float, host_full: bool = False
    ) -> list[Action]:
        """The kernel could not be offloaded safely and stays resident (nothing was lost).
        ``host_full``: its state did not fit the host room it was given and ``reason`` is why the
        rest could not go to disk."""
        kernel = self._kernel(kernel_id)
        if kernel.state != KernelState.OFFLOADING:
            return []
        self._hold_host(kernel, reserved=0)
        kernel.refused = self._host_full(kernel, reason) if host_full else reason
        reason = kernel.refused
        self._set_state(kernel, KernelState.RESIDENT, f"offload refused: {reason}", now)
        self._schedule(now)
        return self._drain()

    def offload(self, kernel_id: str, now: float, reason: str = "requested") -> list[Action]:
        """Offload a resident kernel (a user's or admin's request): now if it is idle, else as soon
        as its running cell ends."""
        kernel = self._kernel(kernel_id)
        if kernel.state in OFF_DEVICE_STATES or kernel.state == KernelState.OFFLOADING:
            return []
        if kernel.state == KernelState.RUNNING and kernel.lease is not None and kernel.lease.hold:
            kernel.offload_asked = reason
            return []
        if kernel.state != KernelState.RESIDENT or kernel.lease is not None:
            raise BrokerError(
                f"kernel is {kernel.state.value}: only an idle resident kernel can be offloaded"
            )
        self._start_offload(kernel, reason, now)
        return self._drain()

    def set_pinned(self, kernel_id: str, pinned: bool, now: float) -> list[Action]:
        """A pinned kernel is never evicted to make room for others."""
        kernel = self._kernel(kernel_id)
        kernel.pinned = pinned
        self._schedule(now)
        return self._drain()

    def notebook_moved(self, old: str, new: str, user: str | None = None) -> list[str]:
        """The file or folder ``old`` was renamed or moved to ``new``: kernels (``user``'s, if
        given) whose notebook is that file, or lies under that folder, show the new path. Returns
        their ids (nothing else changes, so there are no actions)."""
        if not old or old == new:
            return []
        folder = old.rstrip("/") + "/"
        moved = []
        kernels = self.kernels.values() if user is None else self._by_user.get(user, {}).values()
        for kernel in kernels:
            if kernel.notebook == old:
                kernel.notebook = new
            elif kernel.notebook.startswith(folder):
                kernel.notebook = new.rstrip("/") + "/" + kernel.notebook[len(folder) :]
            else:
                continue
            moved.append(kernel.kernel_id)
        return moved

    def set_quotas(self, quotas: Quotas, now: float) -> list[Action]:
        self.quotas = quotas
        self._limits_cache.clear()
        self._host_quota_changed()
        self._schedule(now)
        return self._drain()

    def set_stalled(self, kernel_id: str, since: float | None, now: float) -> list[Action]:
        """The kernel stopped answering the broker (``since``: when it last answered), or answers
        again (None). A stalled kernel is never asked to make room (it would not answer), and the
        memory it holds or is giving back counts as taken until it answers again."""
        kernel = self._kernel(kernel_id)
        if kernel.stalled_since == since:
            return []
        kernel.stalled_since = since
        # Its state does not change, but its history (and the browser) should show it.
        note = "stopped answering the broker" if since is not None else "answers again"
        self._emit_state(kernel, kernel.state, kernel.state, note, now)
        self._schedule(now)
        return self._drain()

    def revoke(self, kernel_id: str, now: float, reason: str) -> list[Action]:
        """The lease of a stalled kernel was taken back: the driver tier checkpointed its process
        off the GPU, whose memory is free now. Its state waits with the driver (like a CUDA
        context it checkpointed after an offload) until a restore brings it back."""
        kernel = self._kernel(kernel_id)
        if kernel.lease is None or kernel.device is None:
            return []
        # Its footprint (gpu_bytes) stays known: the restore books it again on a GPU.
        kernel.gpu_bytes = kernel.booking()
        self._end_lease(kernel, now, None)
        self._move(kernel, None)
        self._set_state(kernel, KernelState.OFFLOADED, f"lease revoked: {reason}", now)
        self._schedule(now)
        return self._drain()

    def tick(self, now: float) -> list[Action]:
        """Time passed: start a new accounting day, offload kernels idle longer than the timeout."""
        self._roll_day(now)
        self._expire_rejoins(now)
        timeout = self.policy.idle_timeout
        if timeout > 0:
            for kernel in list(self.kernels.values()):
                if self._evictable(kernel) and now - kernel.last_activity >= timeout:
                    self._start_offload(kernel, f"idle for {now - kernel.last_activity:.0f} s", now)
        self._schedule(now)
        return self._drain()

    # ---------------------------------------------------------------------------------- queries

    def booked_by(self, user: str) -> int:
        """GPU memory the user's kernels book, on every device."""
        return sum(kernel.booking() for kernel in self._by_user.get(user, {}).values())

    def limits(self, user: str, groups: Iterable[str] = ()) -> Limits:
        key = (user, tuple(groups))
        limits = self._limits_cache.get(key)
        if limits is None:
            limits = self._limits_cache[key] = self.quotas.limits_for(user, key[1])
        return limits

    def used_seconds(self, user: str, now: float) -> float:
        """GPU-seconds used today, including the running leases' time so far (since midnight, for
        a lease that started the day before)."""
        if self._pass is not None and self._pass.now == now:
            return self._ended_today(user, now) + self._pass.running_seconds(user)
        return self._ended_today(user, now) + self._running_seconds(user, now)

    def _running_seconds(self, user: str, now: float) -> float:
        """Seconds the user's running leases held a device today (since midnight)."""
        midnight = _midnight(now)
        return sum(
            _seconds_since(k.lease.start, midnight, now)
            for k in self._by_user.get(user, {}).values()
            if k.lease is not None and k.lease.hold
        )

    def device_bookings(self) -> dict[int, int]:
        return self._incremental.booked()

    def snapshot(self, now: float) -> dict:
        booked, closed = self._incremental.booked(), self.closed_devices()
        return {
            "devices": [
                {
                    **d.to_dict(),
                    "booked_bytes": booked[d.index],
                    "unavailable": closed.get(d.index),
                }
                for d in self.devices.values()
            ],
            "kernels": [k.to_dict() for k in self.kernels.values()],
            "queue": [
                {
                    "kernel_id": r.kernel_id,
                    "request_id": r.request_id,
                    "position": position,  # (a request told its place last may have moved up)
                    "reason": r.reason,
                    "memory": r.memory,
                    "device": r.claimed,
                }
                for position, r in enumerate(self.queue(), 1)
            ],
            "time": now,
        }

    # --------------------------------------------------------------------------------- internals

    def _roll_day(self, now: float) -> None:
        """Start a new accounting day (UTC) when ``now`` is in another day than the last event."""
        day = int(now // DAY)
        if day != self.day:
            self.day = day
            self.usage_today.clear()

    def _ended_today(self, user: str, now: float) -> float:
        """GPU-seconds of the user's ended leases charged to ``now``'s day (nothing yet if the day
        turned since the last event)."""
        return self.usage_today.get(user, 0.0) if int(now // DAY) == self.day else 0.0

    def _kernel(self, kernel_id: str) -> Kernel:
        if (kernel := self.kernels.get(kernel_id)) is None:
            raise BrokerError(f"unknown kernel {kernel_id}")
        self._incremental.touch(kernel)  # (the event changes it)
        return kernel

    def _drain(self) -> list[Action]:
        """The actions of this event, after any spill that host memory now calls for."""
        self._enforce_host_budget()
        actions, self._actions = self._actions, []
        return actions

    def _emit_state(
        self, kernel: Kernel, old: KernelState | None, new: KernelState, reason: str, now: float
    ) -> None:
        self._actions.append(
            StateChanged(kernel.kernel_id, kernel.user, old, new, kernel.device, reason, now)
        )

    def _set_state(self, kernel: Kernel, new: KernelState, reason: str, now: float) -> None:
        old = kernel.state
        if old == new:
            return
        kernel.state = new
        self._incremental.touch(kernel)
        self._emit_state(kernel, old, new, reason, now)

    def _settled_state(self, kernel: Kernel) -> KernelState:
        """The state a kernel without lease or request is in, given where its data is."""
        if kernel.disk_bytes and not kernel.host_bytes:
            return KernelState.SPILLED
        if kernel.host_bytes or kernel.disk_bytes:
            return KernelState.OFFLOADED
        if kernel.device is not None:
            return KernelState.RESIDENT
        return KernelState.OFFLOADED if kernel.used_gpu else KernelState.COLD

    def _move(self, kernel: Kernel, device: int | None) -> None:
        """Set where the kernel's GPU state is, keeping the device index in step."""
        self._incremental.touch(kernel)
        if kernel.device is not None:
            self._by_device[kernel.device].pop(kernel.kernel_id, None)
        kernel.device = device
        if device is not None:
            self._by_device[device][kernel.kernel_id] = kernel
            self._incremental.changed(device)

    def _set_home(self, kernel: Kernel, home: int | None) -> None:
        """Set the device the kernel returns to, keeping the count of kernels at home in step."""
        if kernel.home is not None:
            self._homed[kernel.home] -= 1
        kernel.home = home
        if home is not None:
            self._homed[home] += 1

    def _end_lease(self, kernel: Kernel, now: float, peak: int | None) -> None:
        lease = kernel.lease
        assert lease is not None
        kernel.lease = None
        if not lease.hold:
            return
        seconds = max(0.0, now - lease.start)
        # A lease that ran across midnight counts today only with its seconds after midnight; the
        # earlier ones belong to the day before (as in the ledger, which clips leases to a day).
        self._roll_day(now)
        today = _seconds_since(lease.start, _midnight(now), now)
        self.usage_today[kernel.user] = self.usage_today.get(kernel.user, 0.0) + today
        self._actions.append(
            LeaseEnded(
                kernel.kernel_id, lease.request_id, kernel.user, lease.device, now, seconds, peak
            )
        )

    def _evictable(self, kernel: Kernel) -> bool:
        return (
            kernel.state == KernelState.RESIDENT
            and kernel.lease is None
            and not kernel.pinned
            and not kernel.refused
            and kernel.device is not None
            and kernel.stalled_since is None
        )

    def _eviction_key(self, kernel: Kernel, now: float) -> tuple:
        """Who goes first: idle kernels not waiting to run, owners over their daily quota, lower
        priority, then least recently used."""
        limits = self.limits(kernel.user, kernel.groups)
        over = (
            limits.gpu_seconds_per_day is not None
            and self.used_seconds(kernel.user, now) >= limits.gpu_seconds_per_day
        )
        return (kernel.request is not None, not over, limits.priority, kernel.last_activity)

    def _start_offload(self, kernel: Kernel, reason: str, now: float) -> None:
        assert kernel.device is not None
        self._set_state(kernel, KernelState.OFFLOADING, reason, now)
        room = self._host_room(kernel)
        self._hold_host(kernel, reserved=room or 0)
        self._actions.append(Offload(kernel.kernel_id, kernel.device, reason, room))
        self._incremental.touch(kernel)

    def _relieve_overcommit(self, device: int | None, now: float) -> None:
        """A cell may end with a larger footprint than it reserved; evict idle kernels to fit again."""
        if device is None:
            return
        total, on_device = self.devices[device].total_bytes, list(self._by_device[device].values())
        booked = sum(k.booking() for k in on_device if k.state != KernelState.OFFLOADING)
        if booked <= total:
            return  # (the common case: no eviction order to find)
        for victim in sorted(
            filter(self._evictable, on_device), key=lambda k: self._eviction_key(k, now)
        ):
            if booked <= total:
                return
            self._start_offload(victim, "device over-committed", now)
            booked -= victim.booking()

    def _grant(
        self,
        kernel: Kernel,
        request: Request,
        placement: _Placement,
        now: float,
    ) -> None:
        device = placement.device
        assert device is not None
        restore = bool(kernel.host_bytes or kernel.disk_bytes)
        self._left(kernel)
        self._move(kernel, device)
        self._set_home(kernel, device)
        kernel.used_gpu = True
        kernel.lease = Lease(request.request_id, device, placement.reservation, now, request.hold)
        self._incremental.touch(kernel)
        kernel.last_activity = now
        self._allow_pool(kernel, placement.reservation)
        self._actions.append(
            Grant(
                kernel.kernel_id,
                request.request_id,
                device,
                placement.reservation,
                restore,
                now,
                request.hold,
                kernel.pool_allowance,
            )
        )
        if restore:
            self._set_state(kernel, KernelState.RESTORING, "restoring", now)
        elif request.hold:
            self._set_state(kernel, KernelState.RUNNING, "lease granted", now)
        else:
            kernel.lease = None
            self._set_state(kernel, KernelState.RESIDENT, "restored", now)

    def _allow_pool(self, kernel: Kernel, reservation: int) -> None:
        """Let the kernel pin host memory for its footprint (what this grant reserves, or its
        state), within the per-kernel bound and what the other kernels left of the total. An
        allowance only grows: a pool once pinned is kept for the next offload."""
        want = min(
            self.policy.pinned_per_kernel,
            max(reservation, kernel.gpu_bytes + kernel.host_bytes + kernel.disk_bytes),
        )
        if self.policy.pinned_total is not None:
            others = self.pool_allowances - kernel.pool_allowance
            want = min(want, max(0, self.policy.pinned_total - others))
        if want > kernel.pool_allowance:
            self.pool_allowances += want - kernel.pool_allowance
            kernel.pool_allowance = want
