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
from dataclasses import dataclass, field
from enum import Enum

from ..devices import DeviceInfo
from ..units import format_size
from .quotas import Limits, Quotas

DAY = 86400.0
MiB = 1 << 20


class KernelState(str, Enum):
    COLD = "cold"
    QUEUED = "queued"
    RESTORING = "restoring"
    RUNNING = "running"
    RESIDENT = "resident"
    OFFLOADING = "offloading"
    OFFLOADED = "offloaded"
    SPILLED = "spilled"
    ERROR = "error"


LEASE_STATES = (KernelState.RUNNING, KernelState.RESTORING)
OFF_DEVICE_STATES = (KernelState.OFFLOADED, KernelState.SPILLED)


class BrokerError(Exception):
    """A request the core refuses outright (unknown kernel, wrong state), with a readable reason."""


@dataclass(frozen=True)
class Policy:
    """Tunable knobs of the decisions, all with defaults that suit an interactive machine."""

    idle_timeout: float = 0.0
    """Seconds before an idle resident kernel is offloaded without pressure; 0 = only under pressure."""
    margin_fraction: float = 0.10
    margin_bytes: int = 256 * MiB
    """A known kernel reserves its largest recent peak plus this much, so a slightly larger cell fits."""
    peak_history: int = 5
    migration: bool = True
    """Whether offloaded state may be restored onto another device of the same chip type."""
    fair_share_rate: float = 0.1
    fair_share_cap: float = 300.0
    """A request is queued as if it arrived ``min(cap, rate * GPU-seconds used today / priority)``
    seconds later: heavy users yield to light ones, but never by more than ``cap``, so none starves."""
    host_memory_limit: int = 0
    """Bytes of offloaded state kept in host memory; beyond it the least recently used kernels'
    host copies spill to disk. 0 = no limit."""
    pinned_per_kernel: int = 0
    """Pinned host memory one kernel may keep for its offloads (0: none, offloads use pageable
    memory)."""
    pinned_total: int | None = None
    """Pinned host memory all kernels together may keep (None: only the per-kernel bound). Pinned
    memory cannot be swapped, and kernels keep their pools while resident, so on a busy machine
    the per-kernel bound alone could pin much of the host's memory."""


# ---------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Grant:
    kernel_id: str
    request_id: str
    device: int
    reservation: int
    restore: bool
    start: float
    hold: bool = True
    """False for an explicit restore: the kernel comes back resident, no cell holds a lease."""
    pool_allowance: int = 0
    """Pinned host memory the kernel may keep for its offloads (it never shrinks for a kernel)."""


@dataclass(frozen=True)
class Deny:
    kernel_id: str
    request_id: str
    reason: str


@dataclass(frozen=True)
class Wait:
    kernel_id: str
    request_id: str
    position: int
    reason: str


@dataclass(frozen=True)
class Offload:
    kernel_id: str
    device: int
    reason: str


@dataclass(frozen=True)
class LeaseEnded:
    kernel_id: str
    request_id: str
    user: str
    device: int
    end: float
    seconds: float
    peak_bytes: int | None


@dataclass(frozen=True)
class StateChanged:
    kernel_id: str
    user: str
    old: KernelState | None
    new: KernelState | None
    device: int | None
    reason: str
    time: float


@dataclass(frozen=True)
class Forget:
    """The kernel left the pool: release its host copies, spill files, channel and key."""

    kernel_id: str


@dataclass(frozen=True)
class Spill:
    """Move the kernel's host copy to disk: host memory is over its budget."""

    kernel_id: str
    reason: str


Action = Grant | Deny | Wait | Offload | Spill | LeaseEnded | StateChanged | Forget


# ------------------------------------------------------------------------------------------ state


@dataclass
class Lease:
    request_id: str
    device: int
    reservation: int
    start: float
    hold: bool


@dataclass
class Request:
    request_id: str
    kernel_id: str
    memory: int | None
    order: tuple[float, int]
    hold: bool
    claimed: int | None = None
    position: int = 0
    reason: str = ""
    device: int | None = None
    """The one device a cold kernel can use: something in it initialised CUDA already."""


@dataclass
class Kernel:
    kernel_id: str
    user: str
    groups: tuple[str, ...]
    notebook: str
    home: int | None
    last_activity: float
    state: KernelState = KernelState.COLD
    device: int | None = None
    gpu_bytes: int = 0
    host_bytes: int = 0
    disk_bytes: int = 0
    pinned: bool = False
    peaks: list[int] = field(default_factory=list)
    lease: Lease | None = None
    request: Request | None = None
    refused: str = ""
    """Why the kernel refused its last offload; it is not evicted again until its next cell ends."""
    used_gpu: bool = False
    """Whether the kernel ever held a lease: off the device it is then offloaded, not cold."""
    spilling: bool = False
    offload_asked: str = ""
    """Why someone asked to offload the kernel while a cell ran: done when the cell ends."""
    spill_refused: str = ""
    """Why the last spill failed; not retried until the kernel is restored."""
    pool_allowance: int = 0
    """Pinned host memory the kernel may keep for its offloads (see Policy.pinned_total)."""

    def booking(self) -> int:
        if self.device is None:
            return 0
        if self.lease is not None:
            return max(self.lease.reservation, self.gpu_bytes)
        return self.gpu_bytes

    def to_dict(self) -> dict:
        return {
            "kernel_id": self.kernel_id,
            "user": self.user,
            "notebook": self.notebook,
            "state": self.state.value,
            "device": self.device,
            "home": self.home,
            "gpu_bytes": self.gpu_bytes,
            "booked_bytes": self.booking(),
            "host_bytes": self.host_bytes,
            "disk_bytes": self.disk_bytes,
            "pinned": self.pinned,
            "last_activity": self.last_activity,
            "peak_bytes": max(self.peaks) if self.peaks else None,
            "lease": None
            if self.lease is None
            else {
                "request_id": self.lease.request_id,
                "device": self.lease.device,
                "reservation": self.lease.reservation,
                "start": self.lease.start,
            },
            "offload_refused": self.refused or None,
            "pool_allowance": self.pool_allowance,
        }


@dataclass
class _Placement:
    """What the core decided for one queued request in one scheduling pass."""

    device: int | None = None
    reservation: int = 0
    victims: list[Kernel] = field(default_factory=list)
    wait: str = ""
    deny: str = ""


# ------------------------------------------------------------------------------------------- core


class BrokerCore:
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
        sizes = {d.total_bytes for d in self.devices.values()}
        self._uniform = len(sizes) == 1
        self._largest = max(sizes, default=0)
        # Indexes kept in step with every kernel's device and user, so a scheduling pass never
        # walks all kernels.
        self._by_device: dict[int, dict[str, Kernel]] = {d: {} for d in self.devices}
        self._by_user: dict[str, dict[str, Kernel]] = {}
        self.pool_allowances = 0
        """The sum of every kernel's ``pool_allowance``."""

    # ----------------------------------------------------------------------------- public events

    def register(
        self, kernel_id: str, user: str, now: float, groups: Iterable[str] = (), notebook: str = ""
    ) -> list[Action]:
        """A new kernel joins the pool; its home is the device with the most unbooked memory."""
        if kernel_id in self.kernels:
            raise BrokerError(f"kernel {kernel_id} is already registered")
        home = None
        if self.devices:
            booked = self._booked_by_device()
            homed = dict.fromkeys(self.devices, 0)
            for other in self.kernels.values():
                if other.home is not None:
                    homed[other.home] += 1
            home = max(
                self.devices, key=lambda d: (self.devices[d].total_bytes - booked[d], -homed[d], -d)
            )
        kernel = Kernel(kernel_id, user, tuple(groups), notebook, home, now)
        self.kernels[kernel_id] = kernel
        self._by_user.setdefault(user, {})[kernel_id] = kernel
        self._emit_state(kernel, None, KernelState.COLD, "registered", now)
        return self._drain()

    def unregister(self, kernel_id: str, now: float, reason: str = "kernel gone") -> list[Action]:
        """The kernel died or was shut down: free its booking, lease and request, then reschedule."""
        kernel = self.kernels.pop(kernel_id, None)
        if kernel is None:
            return []
        del self._by_user[kernel.user][kernel_id]
        self.pool_allowances -= kernel.pool_allowance
        device = kernel.device
        self._move(kernel, None)
        if kernel.lease is not None:
            self._end_lease(kernel, now, None)
        if kernel.request is not None:
            self._actions.append(Deny(kernel_id, kernel.request.request_id, "kernel is gone"))
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
        kernel.request = None
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
    ) -> list[Action]:
        """The cell ended. Its peak teaches the core the kernel's footprint for the next reservation."""
        kernel = self._kernel(kernel_id)
        if kernel.lease is None or kernel.lease.request_id != request_id:
            return []
        if peak_bytes is not None:
            kernel.peaks = [*kernel.peaks, peak_bytes][-self.policy.peak_history :]
        if gpu_bytes is not None:
            kernel.gpu_bytes = gpu_bytes
        kernel.refused = ""
        kernel.last_activity = now
        self._end_lease(kernel, now, peak_bytes)
        self._set_state(kernel, KernelState.RESIDENT, "cell finished", now)
        if kernel.offload_asked and kernel.request is None:
            self._start_offload(kernel, kernel.offload_asked, now)
        kernel.offload_asked = ""
        self._relieve_overcommit(kernel.device, now)
        self._schedule(now)
        return self._drain()

    def restored(self, kernel_id: str, now: float, gpu_bytes: int | None = None) -> list[Action]:
        """The kernel's state is back on its device."""
        kernel = self._kernel(kernel_id)
        if kernel.state != KernelState.RESTORING:
            return []
        if gpu_bytes is not None:
            kernel.gpu_bytes = gpu_bytes
        kernel.host_bytes = kernel.disk_bytes = 0
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

    def offloaded(
        self, kernel_id: str, now: float, host_bytes: int, disk_bytes: int = 0, gpu_bytes: int = 0
    ) -> list[Action]:
        """The kernel's state left the GPU; ``gpu_bytes`` is what stayed (e.g. a CUDA context)."""
        kernel = self._kernel(kernel_id)
        if kernel.state != KernelState.OFFLOADING:
            return []
        kernel.host_bytes, kernel.disk_bytes, kernel.gpu_bytes = host_bytes, disk_bytes, gpu_bytes
        if kernel.gpu_bytes == 0:
            self._move(kernel, None)
        elif not (host_bytes or disk_bytes):
            # Nothing could be moved off: it stays resident, and asking again before its next cell
            # would free nothing either (and would loop: evict, report, evict...).
            kernel.refused = "offloading freed no more GPU memory"
        new = KernelState.QUEUED if kernel.request is not None else self._settled_state(kernel)
        self._set_state(kernel, new, "offload finished", now)
        self._schedule(now)
        self._enforce_host_budget(now)
        return self._drain()

    def spilled(self, kernel_id: str, now: float, host_bytes: int, disk_bytes: int) -> list[Action]:
        """The kernel's host copy moved (partly) to disk to respect the host-memory budget."""
        kernel = self._kernel(kernel_id)
        kernel.spilling = False
        if kernel.state not in OFF_DEVICE_STATES and kernel.state != KernelState.QUEUED:
            return self._drain()
        kernel.host_bytes, kernel.disk_bytes = host_bytes, disk_bytes
        if host_bytes:
            # What stayed cannot leave memory now (pinned memory of a process the driver holds
            # checkpointed): asking again before the kernel next runs would move nothing.
            kernel.spill_refused = "part of the host copy stays in memory until the kernel runs"
        if kernel.request is None:
            self._set_state(kernel, self._settled_state(kernel), "spilled to disk", now)
        self._enforce_host_budget(now)
        return self._drain()

    def spill_failed(self, kernel_id: str, reason: str, now: float) -> list[Action]:
        """The spill could not complete (a full disk); the host copy is intact and stays."""
        kernel = self._kernel(kernel_id)
        kernel.spilling = False
        kernel.spill_refused = reason
        self._enforce_host_budget(now)
        return self._drain()

    def offload_failed(self, kernel_id: str, reason: str, now: float) -> list[Action]:
        """The kernel could not be offloaded safely and stays resident (nothing was lost)."""
        kernel = self._kernel(kernel_id)
        if kernel.state != KernelState.OFFLOADING:
            return []
        kernel.refused = reason
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

    def notebook_moved(self, old: str, new: str) -> list[str]:
        """The file or folder ``old`` was renamed or moved to ``new``: kernels whose notebook is that
        file, or lies under that folder, show the new path. Returns their ids (nothing else changes,
        so there are no actions)."""
        if not old or old == new:
            return []
        folder = old.rstrip("/") + "/"
        moved = []
        for kernel in self.kernels.values():
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
        self._schedule(now)
        self._enforce_host_budget(now)
        return self._drain()

    def tick(self, now: float) -> list[Action]:
        """Time passed: start a new accounting day, offload kernels idle longer than the timeout."""
        self._roll_day(now)
        timeout = self.policy.idle_timeout
        if timeout > 0:
            for kernel in list(self.kernels.values()):
                if self._evictable(kernel) and now - kernel.last_activity >= timeout:
                    self._start_offload(kernel, f"idle for {now - kernel.last_activity:.0f} s", now)
        self._schedule(now)
        return self._drain()

    # ---------------------------------------------------------------------------------- queries

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
        midnight = _midnight(now)
        running = sum(
            _seconds_since(k.lease.start, midnight, now)
            for k in self.kernels.values()
            if k.user == user and k.lease is not None and k.lease.hold
        )
        return self._ended_today(user, now) + running

    def queue(self) -> list[Request]:
        return sorted(
            (k.request for k in self.kernels.values() if k.request is not None),
            key=lambda r: r.order,
        )

    def device_bookings(self) -> dict[int, int]:
        return self._booked_by_device()

    def snapshot(self, now: float) -> dict:
        booked = self._booked_by_device()
        return {
            "devices": [
                {**d.to_dict(), "booked_bytes": booked[d.index]} for d in self.devices.values()
            ],
            "kernels": [k.to_dict() for k in self.kernels.values()],
            "queue": [
                {
                    "kernel_id": r.kernel_id,
                    "request_id": r.request_id,
                    "position": r.position,
                    "reason": r.reason,
                    "memory": r.memory,
                    "device": r.claimed,
                }
                for r in self.queue()
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
        try:
            return self.kernels[kernel_id]
        except KeyError:
            raise BrokerError(f"unknown kernel {kernel_id}") from None

    def _drain(self) -> list[Action]:
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
        if kernel.device is not None:
            self._by_device[kernel.device].pop(kernel.kernel_id, None)
            if self._pass is not None:
                self._pass.changed(kernel.device)
        kernel.device = device
        if device is not None:
            self._by_device[device][kernel.kernel_id] = kernel
            if self._pass is not None:
                self._pass.changed(device)

    def _booked_by_device(self) -> dict[int, int]:
        booked = dict.fromkeys(self.devices, 0)
        for kernel in self.kernels.values():
            if kernel.device is not None:
                booked[kernel.device] += kernel.booking()
        return booked

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
        self._actions.append(Offload(kernel.kernel_id, kernel.device, reason))
        if self._pass is not None:
            self._pass.changed(kernel.device)

    def _enforce_host_budget(self, now: float) -> None:
        """Spill the least recently used idle kernels' host copies while host memory is over the
        pool's budget or a user's ``host_memory`` quota."""
        idle = sorted(
            (
                k
                for k in self.kernels.values()
                if k.host_bytes
                and k.state in OFF_DEVICE_STATES
                and k.request is None
                and not k.spilling
                and not k.spill_refused
            ),
            key=lambda k: k.last_activity,
        )
        if not idle:
            return
        by_user: dict[str, int] = {}
        for kernel in self.kernels.values():
            if kernel.host_bytes and not kernel.spilling:
                by_user[kernel.user] = by_user.get(kernel.user, 0) + kernel.host_bytes
        total = sum(by_user.values())
        limit = self.policy.host_memory_limit
        for kernel in idle:
            user_limit = self.limits(kernel.user, kernel.groups).host_memory
            over_pool = bool(limit) and total > limit
            over_user = user_limit is not None and by_user[kernel.user] > user_limit
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

    def _relieve_overcommit(self, device: int | None, now: float) -> None:
        """A cell may end with a larger footprint than it reserved; evict idle kernels to fit again."""
        if device is None:
            return
        total = self.devices[device].total_bytes
        on_device = list(self._by_device[device].values())
        booked = sum(k.booking() for k in on_device if k.state != KernelState.OFFLOADING)
        for victim in sorted(
            (k for k in on_device if self._evictable(k)), key=lambda k: self._eviction_key(k, now)
        ):
            if booked <= total:
                return
            self._start_offload(victim, "device over-committed", now)
            booked -= victim.booking()

    def _reservation(
        self, kernel: Kernel, request: Request, device: DeviceInfo, limits: Limits
    ) -> int:
        """Explicit memory, else the predicted peak, else (first GPU cell) the whole device."""
        cap = (
            device.total_bytes
            if limits.gpu_memory is None
            else min(device.total_bytes, limits.gpu_memory)
        )
        # Never less than the kernel's own state, which a restore brings back onto the device.
        state = kernel.gpu_bytes + kernel.host_bytes + kernel.disk_bytes
        if request.memory is not None:
            return max(request.memory, state)
        if not kernel.peaks:
            return max(cap, state)
        peak = max(kernel.peaks)
        predicted = int(peak * (1 + self.policy.margin_fraction)) + self.policy.margin_bytes
        return max(min(predicted, cap), state, peak)

    def _candidates(self, kernel: Kernel, request: Request) -> list[int]:
        """Devices the kernel may run on: the one holding its GPU state; for state offloaded to the
        host, any device of the same chip when migration is possible, else its home; any when cold
        (unless CUDA in the kernel chose one already)."""
        if kernel.device is not None:
            return [kernel.device]
        if (kernel.host_bytes or kernel.disk_bytes) and kernel.home is not None:
            if not self.policy.migration:
                return [kernel.home]
            chip = self.devices[kernel.home].chip
            return [d for d, info in self.devices.items() if info.chip == chip]
        return list(self.devices) if request.device is None else [request.device]

    def _schedule(self, now: float) -> None:
        """One pass over the queue in fair-share order.

        A request that cannot run yet *claims* the device it will run on; no later request is granted
        there until it has run. This costs some packing but guarantees that every waiting request runs
        once the leases ahead of it end.
        """
        queue = self.queue()
        if not queue:
            return
        self._pass = _Pass(self, now)
        try:
            claimed: set[int] = set()
            position = 0
            for request in queue:
                kernel = self.kernels[request.kernel_id]
                if kernel.lease is not None:
                    # Its explicit restore is under way; the cell is granted once it is back.
                    position += 1
                    self._tell_position(request, position, "waiting for its restore to finish")
                    continue
                if len(claimed) == len(self.devices):
                    # Every device is claimed by a request ahead: only a denial can be decided.
                    placement = _Placement(
                        deny=self._time_quota_denial(kernel, request, now),
                        wait="queued behind earlier requests for the same GPU",
                    )
                else:
                    placement = self._place(kernel, request, claimed, now)
                if placement.deny:
                    kernel.request = None
                    self._actions.append(Deny(kernel.kernel_id, request.request_id, placement.deny))
                    if kernel.state == KernelState.QUEUED:
                        self._set_state(kernel, self._settled_state(kernel), "request denied", now)
                    continue
                if placement.device is not None and not placement.victims and not placement.wait:
                    self._grant(kernel, request, placement, now)
                    continue
                position += 1
                if placement.device is not None:
                    request.claimed = placement.device
                    claimed.add(placement.device)
                for victim in placement.victims:
                    if victim.state == KernelState.RESIDENT:
                        self._start_offload(
                            victim, f"making room for kernel {kernel.kernel_id[:8]}", now
                        )
                reason = placement.wait or "waiting for idle kernels to be offloaded"
                if kernel.state in (*OFF_DEVICE_STATES, KernelState.COLD, KernelState.ERROR):
                    self._set_state(kernel, KernelState.QUEUED, reason, now)
                self._tell_position(request, position, reason)
        finally:
            self._pass = None

    def _tell_position(self, request: Request, position: int, reason: str) -> None:
        if (position, reason) != (request.position, request.reason):
            request.position, request.reason = position, reason
            self._actions.append(Wait(request.kernel_id, request.request_id, position, reason))

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
        kernel.request = None
        self._move(kernel, device)
        kernel.home = device
        kernel.used_gpu = True
        kernel.lease = Lease(request.request_id, device, placement.reservation, now, request.hold)
        if self._pass is not None:
            self._pass.changed(device)
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

    def _place(self, kernel: Kernel, request: Request, claimed: set[int], now: float) -> _Placement:
        limits = self.limits(kernel.user, kernel.groups)
        denial = self._time_quota_denial(kernel, request, now)
        if denial:
            return _Placement(deny=denial)
        candidates = self._candidates(kernel, request)
        if not candidates:
            return _Placement(deny="this pool has no GPU devices")
        if (
            request.memory is not None
            and limits.gpu_memory is not None
            and request.memory > limits.gpu_memory
        ):
            return _Placement(
                deny=f"asked for {format_size(request.memory)} but the GPU memory quota of "
                f"{kernel.user} is {format_size(limits.gpu_memory)}"
            )
        largest = (
            self._largest
            if len(candidates) == len(self.devices)
            else max(self.devices[d].total_bytes for d in candidates)
        )
        if request.memory is not None and request.memory > largest:
            return _Placement(
                deny=f"asked for {format_size(request.memory)} but the largest GPU it may use has "
                f"{format_size(largest)}"
            )
        if kernel.state == KernelState.OFFLOADING:
            # Granting now would run the cell on state that is on its way off the GPU (and the
            # offload report would then be ignored): wait until it is offloaded, then restore.
            return _Placement(wait="waiting for this kernel's offload to finish")

        quota_victims, quota_wait, quota_deny = self._quota_room(
            kernel, request, limits, candidates, now
        )
        if quota_deny:
            return _Placement(deny=quota_deny)
        if quota_wait:
            return _Placement(wait=quota_wait)

        assert self._pass is not None
        if claimed.issuperset(candidates):
            # Every device it could use is claimed by an earlier request: nothing to decide yet.
            return _Placement(wait="queued behind earlier requests for the same GPU")
        # Within a pass room only shrinks (grants book it, offloads started are not yet done), so a
        # request of a kernel that may use any device and asks at least as much as one that found
        # every free device busy is busy too: it claims the least busy one without a search.
        anywhere = (
            self._uniform
            and kernel.device is None
            and not quota_victims
            and len(candidates) == len(self.devices)
        )
        asked = 0
        if anywhere:
            asked = self._reservation(kernel, request, self.devices[candidates[0]], limits)
            floor = self._pass.busy_floor
            if floor is not None and asked >= floor:
                device = self._pass.least_busy(claimed)
                return _Placement(
                    device=device,
                    reservation=asked,
                    wait=f"GPU {device} is busy with running cells",
                )
        own_fixed = kernel.booking() if _unfreeable(kernel) else 0
        best: tuple | None = None
        eventual = False
        reservations: dict[int, int] = {}  # by device size: the only thing it depends on
        for d in candidates:
            if d in claimed:
                # An earlier request runs here first; this one is looked at again after it.
                eventual = True
                continue
            info = self.devices[d]
            view = self._pass.view(d)
            own = kernel.booking() if kernel.device == d else 0
            leaving = (
                sum(v.booking() for v in quota_victims if v.device == d) if quota_victims else 0
            )
            free = info.total_bytes - (view.booked - own - leaving)
            freeable = info.total_bytes - (view.fixed - (own_fixed if kernel.device == d else 0))
            reservation = reservations.get(info.total_bytes)
            if reservation is None:
                reservation = reservations[info.total_bytes] = self._reservation(
                    kernel, request, info, limits
                )
            if request.memory is None and not kernel.peaks:
                # "The whole device" for a first cell means all that can be made free there.
                state = kernel.gpu_bytes + kernel.host_bytes + kernel.disk_bytes
                reservation = max(min(reservation, freeable), state)
            if freeable < reservation:
                continue  # never fits here without someone unpinning
            affinity = 0 if d in (kernel.device, kernel.home) else 1
            victims: list[Kernel] = []
            if free >= reservation:
                key = (0, affinity, free - reservation, d)
            else:
                need = reservation - free
                pending = view.offloading
                for victim in self._pass.victims(d):
                    if pending >= need:
                        break
                    if victim is kernel or victim in quota_victims or not self._evictable(victim):
                        continue
                    victims.append(victim)
                    pending += victim.booking()
                if pending >= need:
                    key = (1, affinity, sum(v.booking() for v in victims), d)
                else:
                    key = (2, affinity, view.running, d)
            if best is None or key < best[0]:
                best = (key, d, reservation, victims)
        if best is None:
            if eventual:
                return _Placement(wait="queued behind earlier requests for the same GPU")
            sizes = ", ".join(
                f"GPU {d}: {format_size(self._reservation(kernel, request, self.devices[d], limits))}"
                for d in candidates
            )
            return _Placement(
                deny=f"no GPU can make room for this request ({sizes}) while pinned or "
                "non-offloadable kernels hold their memory; unpin a kernel or ask for less with "
                "%%singularity --memory SIZE"
            )
        (tier, *_), device, reservation, victims = best
        if anywhere and tier == 2:
            floor = self._pass.busy_floor
            self._pass.busy_floor = asked if floor is None else min(floor, asked)
        for victim in quota_victims:
            if victim.state == KernelState.RESIDENT:
                victims = [*victims, victim]
        if tier == 0 and not victims:
            return _Placement(device=device, reservation=reservation)
        if tier == 2:
            return _Placement(
                device=device,
                reservation=reservation,
                wait=f"GPU {device} is busy with running cells",
            )
        if not victims and self._pass.view(device).offloading:
            return _Placement(
                device=device,
                reservation=reservation,
                wait="waiting for idle kernels to be offloaded",
            )
        return _Placement(device=device, reservation=reservation, victims=victims)

    def _time_quota_denial(self, kernel: Kernel, request: Request, now: float) -> str:
        limits = self.limits(kernel.user, kernel.groups)
        if not request.hold or limits.gpu_seconds_per_day is None:
            return ""
        used = self.used_seconds(kernel.user, now)
        if used < limits.gpu_seconds_per_day:
            return ""
        return (
            f"GPU-time quota reached: {kernel.user} used {used / 3600:.2f} of "
            f"{limits.gpu_seconds_per_day / 3600:.2f} GPU-hours today (resets at 00:00 UTC)"
        )

    def _quota_room(
        self, kernel: Kernel, request: Request, limits: Limits, candidates: list[int], now: float
    ) -> tuple[list[Kernel], str, str]:
        """Own idle kernels to offload so this request stays within the user's memory and
        resident-kernel quotas; else why it must wait (for the user's running cells) or be denied."""
        if limits.gpu_memory is None and limits.max_resident_kernels is None:
            return [], "", ""
        assert self._pass is not None
        users_kernels = self._pass.of_user(kernel.user)
        mine = [
            k
            for k in users_kernels
            if k is not kernel and k.device is not None and k.state != KernelState.OFFLOADING
        ]
        leaving = [k for k in users_kernels if k.state == KernelState.OFFLOADING]
        need = max(self._reservation(kernel, request, self.devices[d], limits) for d in candidates)
        booked = sum(k.booking() for k in mine)
        resident = sum(1 for k in mine if k.state in (*LEASE_STATES, KernelState.RESIDENT))
        victims: list[Kernel] = []

        def fits() -> bool:
            return (limits.gpu_memory is None or booked + need <= limits.gpu_memory) and (
                limits.max_resident_kernels is None or resident + 1 <= limits.max_resident_kernels
            )

        for victim in sorted(
            (k for k in mine if self._evictable(k)), key=lambda k: self._eviction_key(k, now)
        ):
            if fits():
                break
            victims.append(victim)
            booked -= victim.booking()
            resident -= 1
        if fits():
            if not victims and leaving:
                # Their memory is only free once the offload is reported: count it until then.
                booked += sum(k.booking() for k in leaving)
                resident += len(leaving)
                if not fits():
                    return (
                        [],
                        f"GPU quota of {kernel.user}: waiting for kernels to be offloaded",
                        "",
                    )
            return victims, "", ""
        if limits.gpu_memory is not None and booked + need > limits.gpu_memory:
            what = (
                f"GPU memory quota: needs {format_size(need)}, {kernel.user}'s other kernels hold "
                f"{format_size(booked)} of {format_size(limits.gpu_memory)}"
            )
        else:
            what = (
                f"resident-kernel quota: {resident} of {limits.max_resident_kernels} kernels of "
                f"{kernel.user} hold GPU state"
            )
        if any(k.lease is not None for k in mine) or leaving:
            return [], f"{what}; waiting for their cells to finish", ""
        return [], "", f"{what}; offload or unpin one of them first"


def _midnight(now: float) -> float:
    """UTC midnight of ``now``'s day, where daily GPU-time quotas reset (as the ledger's
    ``day_start``)."""
    return now - now % DAY


def _seconds_since(start: float, midnight: float, now: float) -> float:
    """The seconds of a lease begun at ``start`` that fall between ``midnight`` and ``now``."""
    return max(0.0, now - max(start, midnight))


def _unfreeable(kernel: Kernel) -> bool:
    """Memory no eviction can free: pinned, refused or failed kernels, and what an offload left
    behind (e.g. a CUDA context), which stays until the kernel runs again."""
    return (
        kernel.pinned
        or bool(kernel.refused)
        or kernel.state == KernelState.ERROR
        or (
            kernel.lease is None
            and kernel.state not in (KernelState.RESIDENT, KernelState.OFFLOADING)
        )
    )


@dataclass
class _DeviceView:
    """Aggregates of one device, computed once per scheduling pass (and again after it changes)."""

    booked: int
    fixed: int
    offloading: int
    running: int
    evictable: list[Kernel]
    ordered: bool = False


class _Pass:
    """Per-pass caches, so a pass costs about O(requests x devices), not O(requests x kernels)."""

    def __init__(self, core: BrokerCore, now: float) -> None:
        self.core = core
        self.now = now
        self._running_seconds: dict[str, float] | None = None
        self._views: dict[int, _DeviceView] = {}
        self.busy_floor: int | None = None
        """The smallest reservation that found every unclaimed device busy in this pass."""
        self._by_busyness: list[int] | None = None

    def least_busy(self, claimed: set[int]) -> int:
        """The unclaimed device with the fewest bytes under running leases."""
        if self._by_busyness is None:
            self._by_busyness = sorted(self.core.devices, key=lambda d: (self.view(d).running, d))
        return next(d for d in self._by_busyness if d not in claimed)

    def running_seconds(self, user: str) -> float:
        """Seconds the user's running leases held a device today (since midnight)."""
        if self._running_seconds is None:
            self._running_seconds = {}
            midnight = _midnight(self.now)
            for kernels in self.core._by_device.values():
                for kernel in kernels.values():
                    if kernel.lease is not None and kernel.lease.hold:
                        self._running_seconds[kernel.user] = self._running_seconds.get(
                            kernel.user, 0.0
                        ) + _seconds_since(kernel.lease.start, midnight, self.now)
        return self._running_seconds.get(user, 0.0)

    def of_user(self, user: str) -> list[Kernel]:
        return list(self.core._by_user.get(user, {}).values())

    def view(self, device: int) -> _DeviceView:
        view = self._views.get(device)
        if view is None:
            view = self._views[device] = _DeviceView(0, 0, 0, 0, [])
            for kernel in self.core._by_device[device].values():
                booking = kernel.booking()
                view.booked += booking
                if _unfreeable(kernel):
                    view.fixed += booking
                if kernel.state == KernelState.OFFLOADING:
                    view.offloading += kernel.gpu_bytes
                if kernel.lease is not None:
                    view.running += booking
                elif self.core._evictable(kernel):
                    view.evictable.append(kernel)
        return view

    def victims(self, device: int) -> list[Kernel]:
        """The device's evictable kernels in eviction order (sorted on first use in a pass)."""
        view = self.view(device)
        if not view.ordered:
            view.evictable.sort(key=lambda k: self.core._eviction_key(k, self.now))
            view.ordered = True
        return view.evictable

    def changed(self, device: int) -> None:
        """Something on ``device`` changed during the pass: recompute its view when next asked."""
        self._views.pop(device, None)
