"""Where a queued request can run: reservations, candidate devices, victims, quota room.

A mixin of :class:`~.core.BrokerCore`: the core keeps the state and the order of the queue, this
finds, for one request in one scheduling pass, the device, the reservation and the idle kernels to
evict (or why it must wait, or be denied). ``_Pass`` caches per-device aggregates for one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..devices import DeviceInfo
from ..units import format_size
from .incremental import _Context, _DeviceView, _unfreeable
from .model import LEASE_STATES, Kernel, KernelState, Request
from .quotas import Limits

if TYPE_CHECKING:
    from .core import BrokerCore


_NO_KERNELS: tuple[Kernel, ...] = ()
"""No kernels to evict: shared by the ranks and placements that evict none (kept between passes,
a list of its own in each would be one more object for every garbage collection to walk)."""


@dataclass
class _Placement:
    """What the core decided for one queued request in one scheduling pass."""

    device: int | None = None
    reservation: int = 0
    victims: Sequence[Kernel] = _NO_KERNELS
    wait: str = ""
    deny: str = ""


class Placement:
    """Placement decisions of :class:`~.core.BrokerCore` (see the module docstring)."""

    def _reservation(
        self, kernel: Kernel, request: Request, device: DeviceInfo, limits: Limits
    ) -> int:
        """Explicit memory, else the predicted peak, else (first GPU cell) the policy's
        ``first_cell_memory``, by default the whole device."""
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
            first = self.policy.first_cell_memory
            return max(min(first, cap) if first else cap, state)
        peak = max(kernel.peaks)
        predicted = int(peak * (1 + self.policy.margin_fraction)) + self.policy.margin_bytes
        return max(min(predicted, cap), state, peak)

    def _whole_device(self, kernel: Kernel, request: Request) -> bool:
        """Whether the request books all a device can free: a kernel's first GPU cell, of no
        size named, where the policy sets no ``first_cell_memory``."""
        return request.memory is None and not kernel.peaks and not self.policy.first_cell_memory

    def _state_key(self, kernel: Kernel, request: Request) -> int:
        """What a device's rank for the request depends on beyond its reservation, where it is
        shared by requests alike: the state a whole-device request brings back (it books at
        least that), else -1."""
        if self._whole_device(kernel, request):
            return kernel.gpu_bytes + kernel.host_bytes + kernel.disk_bytes
        return -1

    def _candidates(self, kernel: Kernel, request: Request) -> list[int]:
        """Devices the kernel may run on: the one holding its GPU state; for state offloaded to the
        host, any device of the same chip when migration is possible, else its home; any when cold
        (unless CUDA in the kernel chose one already). A list of many is shared: never changed."""
        if kernel.device is not None:
            return [kernel.device]
        if (kernel.host_bytes or kernel.disk_bytes) and kernel.home is not None:
            if not self.policy.migration:
                return [kernel.home]
            return self._devices_of_chip[self.devices[kernel.home].chip]
        return self._every_device if request.device is None else [request.device]

    def _placing(self, kernel: Kernel, request: Request, now: float) -> _Context | _Placement:
        """What placing ``request`` finds before looking at any device, or its placement when
        that decides it already (a denial, or a wait its user's kernels or quotas make)."""
        limits = self.limits(kernel.user, kernel.groups)
        denial = self._time_quota_denial(kernel, request, now)
        if denial:
            return _Placement(deny=denial)
        candidates = self._candidates(kernel, request)
        if not candidates:
            return _Placement(deny="this pool has no GPU devices")
        closed = self.closed_devices()
        if closed:
            usable = [d for d in candidates if d not in closed]
            if not usable:
                return _Placement(
                    wait="; ".join(f"GPU {d} is unavailable: {closed[d]}" for d in candidates)
                )
            candidates = usable
        if (
            request.memory is not None
            and limits.gpu_memory is not None
            and request.memory > limits.gpu_memory
        ):
            return _Placement(
                deny=f"asked for {format_size(request.memory)} but the GPU memory quota of "
                f"{kernel.user} is {format_size(limits.gpu_memory)}"
            )
        found = self._incremental.candidates(candidates)
        if request.memory is not None and request.memory > found.largest:
            return _Placement(
                deny=f"asked for {format_size(request.memory)} but the largest GPU it may use has "
                f"{format_size(found.largest)}"
            )
        if kernel.state == KernelState.OFFLOADING:
            # Granting now would run the cell on state that is on its way off the GPU (and the
            # offload report would then be ignored): wait until it is offloaded, then restore.
            return _Placement(wait="waiting for this kernel's offload to finish")

        quota_victims, quota_wait, quota_deny = self._quota_room(
            kernel, request, limits, found.of_each_size, now
        )
        if quota_deny:
            return _Placement(deny=quota_deny)
        if quota_wait:
            return _Placement(wait=quota_wait)
        anywhere = (
            self._uniform
            and kernel.device is None
            and not quota_victims
            and len(candidates) == len(self.devices)
        )
        own_fixed = kernel.booking() if _unfreeable(kernel) else 0
        return _Context(
            limits,
            candidates,
            found.set,
            quota_victims,
            anywhere,
            own_fixed,
        )

    def _on_devices(
        self, kernel: Kernel, request: Request, context: _Context, claimed: set[int]
    ) -> tuple[_Placement, list[tuple] | None]:
        """The device ``request`` runs on, or waits for, and the ranks of its unclaimed
        candidates that could make room (None: decided without ranking them)."""
        candidates, limits = context.candidates, context.limits
        if len(claimed) >= len(candidates) and claimed.issuperset(candidates):
            # Every device it could use is claimed by an earlier request: nothing to decide yet.
            return _Placement(wait="queued behind earlier requests for the same GPU"), None
        assert self._pass is not None
        # Within a pass room only shrinks (grants book it, offloads started are not yet done), so a
        # request of a kernel that may use any device and asks at least as much as one that found
        # every free device busy is busy too: it claims the least busy one without a search.
        asked = 0
        if context.anywhere:
            asked = self._reservation(kernel, request, self.devices[candidates[0]], limits)
            floor = self._pass.busy_floor
            if floor is not None and asked >= floor:
                device = self._pass.least_busy(claimed, request.claimed)
                return _Placement(
                    device=device,
                    reservation=asked,
                    wait=f"GPU {device} is busy with running cells",
                ), None
        best = self._incremental.best_alike(kernel, request, context, claimed)
        if best is not None:
            return self._placement_on(kernel, context, best, asked), None
        # The best rank does not depend on the order devices are ranked in (ranks end with the
        # device), so unclaimed devices are taken as a set. A claimed one: an earlier request
        # runs there first, and this one is looked at again after it.
        unclaimed = context.candidate_set - claimed
        ranks = self._incremental.ranks(kernel, request, context, unclaimed)
        if not ranks:
            if len(unclaimed) < len(candidates):
                return _Placement(wait="queued behind earlier requests for the same GPU"), None
            sizes = ", ".join(
                f"GPU {d}: {format_size(self._reservation(kernel, request, self.devices[d], limits))}"
                for d in candidates
            )
            # Why kernels in the way refused to leave (a full host budget and disk, say).
            refusals = sorted(
                {
                    f"; kernel {k.kernel_id[:8]} stays: {k.refused}"
                    for d in candidates
                    for k in self._by_device[d].values()
                    if k.refused and k is not kernel
                }
            )
            return _Placement(
                deny=f"no GPU can make room for this request ({sizes}) while pinned or "
                "non-offloadable kernels hold their memory; unpin a kernel or ask for less with "
                "%%singularity --memory SIZE" + "".join(refusals)
            ), None
        return self._placement_on(kernel, context, min(ranks), asked), ranks

    def _rank(self, kernel: Kernel, request: Request, context: _Context, d: int) -> tuple | None:
        """How well device ``d`` suits the request, as (key, device, reservation, victims): the
        smallest key wins (victims: the kernels to evict, or the bytes the first kernels of the
        device's eviction order must free). None: it never fits there without someone unpinning. It depends on
        the device and the request alone."""
        assert self._pass is not None
        info = self.devices[d]
        view = self._incremental.view(d)
        reservation = context.reservations.get(info.total_bytes)
        if reservation is None:
            reservation = context.reservations[info.total_bytes] = self._reservation(
                kernel, request, info, context.limits
            )
        if kernel.device == d or d in context.quota_devices:
            return self._ranked_on(kernel, request, context, d, view, reservation)
        # Away from its own device and its quota victims, the rank depends on the device and
        # on these alone: requests alike share it until the device changes.
        key = (
            reservation,
            self._state_key(kernel, request),
            d == kernel.home,
            d == request.claimed,
        )
        rank = view.ranks.get(key, view)
        if rank is view:
            rank = view.ranks[key] = self._ranked_on(kernel, request, context, d, view, reservation)
        return rank

    def _ranked_on(
        self,
        kernel: Kernel,
        request: Request,
        context: _Context,
        d: int,
        view: _DeviceView,
        reservation: int,
    ) -> tuple | None:
        """The rank of device ``d`` for the request, found from the device's view."""
        assert self._pass is not None
        quota_victims = context.quota_victims
        info = self.devices[d]
        own = kernel.booking() if kernel.device == d else 0
        leaving = sum(v.booking() for v in quota_victims if v.device == d) if quota_victims else 0
        free = info.total_bytes - (view.booked - own - leaving)
        own_fixed = context.own_fixed if kernel.device == d else 0
        freeable = info.total_bytes - (view.fixed - own_fixed)
        if self._whole_device(kernel, request):
            # "The whole device" for a first cell means all that can be made free there: not
            # what a kernel that stopped answering holds, unless little else would be left
            # (then it waits for that kernel rather than run with next to nothing booked).
            state = kernel.gpu_bytes + kernel.host_bytes + kernel.disk_bytes
            room = freeable - view.stalled
            if room < min(reservation, self.policy.margin_bytes):
                room = freeable
            reservation = max(min(reservation, room), state)
        if freeable < reservation:
            return None
        # Only fits once a kernel that stopped answering gives its memory back.
        needs_stalled = freeable - view.stalled < reservation
        affinity = 0 if d in (kernel.device, kernel.home) else 1
        # Of devices that suit it alike (same tier, affinity and room), a waiting request keeps
        # the one it claims: requests behind one that left are not all moved by one device.
        stays = 0 if d == request.claimed else 1
        if free >= reservation:
            return ((0, affinity, free - reservation, stays, d), d, reservation, _NO_KERNELS)
        need = reservation - free
        pending = view.offloading
        victims: list[Kernel] | int = []
        freed: int | None
        if kernel.device != d and d not in context.quota_devices:
            # Every kernel in the device's eviction order may go: its shortest prefix, listed
            # only if this device is chosen (by the bytes it must free).
            victims = need - pending
            freed = self._incremental.freed_for(d, victims, self._pass.now)
        else:
            for victim in self._pass.victims(d):
                if pending >= need:
                    break
                if victim is kernel or victim in quota_victims:
                    continue
                victims.append(victim)
                pending += victim.booking()
            freed = None if pending < need else sum(v.booking() for v in victims)
        if freed is not None:
            return ((1, affinity, freed, stays, d), d, reservation, victims)
        if needs_stalled:
            return ((3, affinity, view.stalled, stays, d), d, reservation, _NO_KERNELS)
        return ((2, affinity, view.running, stays, d), d, reservation, _NO_KERNELS)

    def _placement_on(
        self, kernel: Kernel, context: _Context, best: tuple, asked: int
    ) -> _Placement:
        """The placement on the best device found (rank, device, reservation, victims)."""
        (tier, *_), device, reservation, victims = best
        assert self._pass is not None
        if isinstance(victims, int):
            victims = self._incremental.evict_for(device, victims, self._pass.now)
        if context.anywhere and tier == 2:
            floor = self._pass.busy_floor
            self._pass.busy_floor = asked if floor is None else min(floor, asked)
        for victim in context.quota_victims:
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
        if tier == 3:
            stalled = ", ".join(k.kernel_id[:8] for k in self._pass.view(device).stalled_kernels)
            return _Placement(
                device=device,
                reservation=reservation,
                wait=f"GPU {device}: kernel {stalled} holds memory there and stopped answering; "
                "waiting for it to answer or end",
            )
        if not victims and self._pass.view(device).offloading:
            return _Placement(
                device=device,
                reservation=reservation,
                wait="waiting for idle kernels to be offloaded",
            )
        return _Placement(device=device, reservation=reservation, victims=victims)

    def _time_quota_denial(self, kernel: Kernel, request: Request, now: float) -> str:
        """Why the request is denied for GPU time today (in a pass, at its ``now``), if it is."""
        if not request.hold or not self._incremental.reached_a_time_quota(kernel.user):
            return ""
        limits = self.limits(kernel.user, kernel.groups)
        if limits.gpu_seconds_per_day is None:
            return ""
        used = self.used_seconds(kernel.user, now)
        if used < limits.gpu_seconds_per_day:
            return ""
        return (
            f"GPU-time quota reached: {kernel.user} used {used / 3600:.2f} of "
            f"{limits.gpu_seconds_per_day / 3600:.2f} GPU-hours today (resets at 00:00 UTC)"
        )

    def _quota_room(
        self, kernel: Kernel, request: Request, limits: Limits, sizes: list[int], now: float
    ) -> tuple[Sequence[Kernel], str, str]:
        """Own idle kernels to offload so this request stays within the user's memory and
        resident-kernel quotas; else why it must wait (for the user's running cells) or be denied.
        ``sizes``: one of its candidates of each size."""
        if limits.gpu_memory is None and limits.max_resident_kernels is None:
            return _NO_KERNELS, "", ""
        assert self._pass is not None
        users = self._pass.quota_basis(kernel.user)
        leaving = users.leaving
        need = max(self._reservation(kernel, request, self.devices[d], limits) for d in sizes)
        booked, resident = users.booked, users.resident
        if kernel.device is not None and kernel.state != KernelState.OFFLOADING:
            booked -= kernel.booking()
            resident -= kernel.state in _HOLDING_STATES
        victims: list[Kernel] = []

        def fits() -> bool:
            return (limits.gpu_memory is None or booked + need <= limits.gpu_memory) and (
                limits.max_resident_kernels is None or resident + 1 <= limits.max_resident_kernels
            )

        for victim in users.evictable:
            if fits():
                break
            if victim is kernel:
                continue
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
                        _NO_KERNELS,
                        f"GPU quota of {kernel.user}: waiting for kernels to be offloaded",
                        "",
                    )
            return victims or _NO_KERNELS, "", ""
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
        if any(k.lease is not None for k in users.on_devices if k is not kernel) or leaving:
            return _NO_KERNELS, f"{what}; waiting for their cells to finish", ""
        return _NO_KERNELS, "", f"{what}; offload or unpin one of them first"


_HOLDING_STATES = frozenset((*LEASE_STATES, KernelState.RESIDENT, KernelState.QUEUED))
"""States of a kernel on a device that counts against its user's resident-kernel quota (queued:
a request of a kernel that holds GPU state there waits, or it will be denied and stay)."""


@dataclass
class _UsersKernels:
    """A user's kernels with state on a device (offloads under way apart), as quota room counts
    them (see ``_Pass.quota_basis``)."""

    version: int
    on_devices: list[Kernel]
    leaving: list[Kernel]
    """Those whose offload is under way."""
    booked: int
    resident: int
    evictable: list[Kernel]
    """In eviction order."""


class _Pass:
    """Per-pass caches: running GPU time per user, the shortcut for requests that may run
    anywhere (device views are kept between passes: see :mod:`.incremental`)."""

    def __init__(self, core: BrokerCore, now: float) -> None:
        self.core = core
        self.now = now
        self._running_seconds: dict[str, float] = {}
        self.busy_floor: int | None = None
        """The smallest reservation that found every unclaimed device busy in this pass."""
        self._by_busyness: list[int] | None = None
        self._quota_bases: dict[str, _UsersKernels] = {}

    def least_busy(self, claimed: set[int], stays: int | None) -> int:
        """The unclaimed device with the fewest bytes under running leases: the one the request
        claims (``stays``) if it has as few (see ``Placement._ranked_on``)."""
        if self._by_busyness is None:
            self._by_busyness = sorted(self.core.devices, key=lambda d: (self.view(d).running, d))
        least = next(d for d in self._by_busyness if d not in claimed)
        running = self.view(least).running
        if stays is not None and stays not in claimed and self.view(stays).running == running:
            return stays
        return least

    def running_seconds(self, user: str) -> float:
        """Seconds the user's running leases held a device today (since midnight)."""
        seconds = self._running_seconds.get(user)
        if seconds is None:
            seconds = self._running_seconds[user] = self.core._running_seconds(user, self.now)
        return seconds

    def quota_basis(self, user: str) -> _UsersKernels:
        """The user's kernels as quota room counts them, found once per pass for every request
        of the user until one of their kernels changes."""
        incremental = self.core._incremental
        version = incremental.user_version(user)
        kept = self._quota_bases.get(user)
        if kept is not None and kept.version == version:
            return kept
        core = self.core
        kernels = core._by_user.get(user, {}).values()
        on_devices = [
            k for k in kernels if k.device is not None and k.state != KernelState.OFFLOADING
        ]
        basis = self._quota_bases[user] = _UsersKernels(
            version,
            on_devices,
            [k for k in kernels if k.state == KernelState.OFFLOADING],
            sum(k.booking() for k in on_devices),
            sum(1 for k in on_devices if k.state in _HOLDING_STATES),
            sorted(
                (k for k in on_devices if core._evictable(k)),
                key=lambda k: core._eviction_key(k, self.now),
            ),
        )
        return basis

    def view(self, device: int) -> _DeviceView:
        return self.core._incremental.view(device)

    def victims(self, device: int) -> list[Kernel]:
        """The device's evictable kernels in eviction order."""
        return self.core._incremental.victims(device, self.now)
