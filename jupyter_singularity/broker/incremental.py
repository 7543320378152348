"""What a scheduling pass keeps from the last one: device views and each request's placement.

Between two passes little changes (a cell ended on one device, an offload was reported on
another), yet a pass that starts from nothing re-places every queued request over every candidate
device: O(requests x devices) per decision. Kept between passes here:

- each device's view (bookings, evictable kernels in eviction order), dropped when something on
  the device changes;
- the devices changed since the last pass began, a version per user (bumped by any change to one
  of the user's kernels) and an epoch for changes every decision depends on (quotas, closed
  devices, a new day);
- each request's placement as the last pass found it, with what it was found from.

A request is placed again only as far as its inputs changed: not at all when its user and its
candidate devices are as they were (or changed only where they are claimed ahead of it in both
passes: it ranks no claimed device), and so are the claims ahead of it on them; over the changed
devices alone when the device it chose is not one of them (a device's rank for a request depends
on that device and the request only); in full otherwise. So a pass decides exactly what a pass
from nothing would. A change to another kernel of the request's user counts as no change when
what placing it finds before looking at devices (its context) is the same. A request that waits
for its user's quotas or kernels alone is *quiet*: until something of its user changes (or every
device is claimed ahead of it), passes go by it without looking (it only moves up the queue, and
decisions do not tell that: see ``Scheduling.positions``). Away from its own device, a request's
rank on a device is shared by requests alike (see ``_DeviceView.ranks``), and the kernels to
evict are listed only for the device chosen.

A request of many candidates is placed from the order of every device kept for requests alike
(:mod:`.rank_index`). Once it waits for a device it claims, moving no kernel, it is quiet too:
the next pass walks the last pass's claims in queue order and claims that device again for it,
without placing it, while its placement stands (its device did not change, and no changed
device, nor one claimed ahead of it in one pass alone, ranks better for it now); else it is
placed again. A stretch of claims that none of those devices ranks better for (their ranks
kept with the claims) is carried over at once, without a look at each (see
:meth:`Incremental._standing`). So a decision looks at the requests a change can
move, not the whole queue.

Time alone changes one input: a user's GPU time today grows while their cells run, and crossing a
daily quota changes both the denial of their requests and the order in which their idle kernels
are evicted. A heap holds when each user with running leases next crosses one; a pass then
marks them changed.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .model import DAY, LEASE_STATES, Kernel, KernelState, Request
from .quotas import Limits
from .rank_index import RankIndex

if TYPE_CHECKING:
    from .core import BrokerCore
    from .placement import _Placement
    from .rank_index import _Order

_EARLY = 1e-3
"""Seconds before a computed quota crossing at which a user is looked at again (rounding)."""


@dataclass
class _DeviceView:
    """Aggregates of one device, kept until something on it changes."""

    booked: int
    fixed: int
    offloading: int
    running: int
    evictable: list[Kernel]
    """Its kernels that may be evicted (in eviction order once ``ordered``): a kernel that may
    not be any more changes the device, and so the view."""
    ordered: bool = False
    freed: list[int] = field(default_factory=list)
    """Once ordered: the bytes evicting the first 1, 2... kernels frees."""
    stalled: int = 0
    """Bytes booked by kernels that stopped answering: not free, but not lost for good either."""
    stalled_kernels: list[Kernel] = field(default_factory=list)
    ranks: dict[tuple, tuple | None] = field(default_factory=dict)
    """Ranks of requests alike on this device (see ``Placement._rank``)."""


@dataclass(frozen=True)
class Candidates:
    """What placing a request needs of its candidate devices, found once for each list of them
    (see :meth:`Incremental.candidates`)."""

    set: frozenset[int]
    """The same object for the same candidates: sets of candidates are looked up by (a chip's
    devices, hundreds of them), and a lookup that finds the very object compares no elements."""
    of_each_size: list[int]
    """One device of each size among them (what a reservation depends on)."""
    largest: int
    """The largest one's bytes."""


@dataclass
class _Context:
    """What placing a request found before looking at any device: it changes only with its
    user's kernels, the quotas and the closed devices."""

    limits: Limits
    candidates: list[int]
    candidate_set: frozenset[int]
    quota_victims: Sequence[Kernel]
    anywhere: bool
    """It may run on any device of a pool of one size: the pass's shortcut applies."""
    own_fixed: int
    reservations: dict[int, int] = field(default_factory=dict)
    """By device size, the only thing a reservation depends on besides the request."""
    alike: _Order | None = None
    """The order of every device kept for requests alike, once its best device was found there
    (see :mod:`.rank_index`)."""
    quota_devices: frozenset[int] = field(init=False)
    """The devices its quota victims are on."""

    def __post_init__(self) -> None:
        self.quota_devices = frozenset(v.device for v in self.quota_victims if v.device is not None)


@dataclass
class _Memo:
    """A request's placement in the last pass, and what it was found from."""

    request: Request
    placement: _Placement
    context: _Context | None
    """None: decided before any device was looked at (it depends on its user alone)."""
    ranks: dict[int, tuple] | None
    """Per unclaimed candidate that could make room: its rank (see ``Placement._rank``). None:
    decided without ranking them."""
    heap: list[tuple]
    """The same ranks as a heap of ``(key, serial, rank)`` (the serial, so that two ranks of one
    device with equal keys never compare their victims), with ranks since replaced left in until
    they reach the top."""
    user_version: int
    epoch: int
    pass_no: int
    """The last pass that placed it or carried its claim over; ``_DROPPED`` once it is not its
    request's memo any more (a claim that names it then needs a look without a lookup)."""
    kernel_touched: bool = False
    """Whether its own kernel changed since (else a change to another kernel of its user leaves
    its ranks standing where its context is found the same)."""


@dataclass(slots=True)
class _Claim:
    """A request's claim of a device in one pass, with what the next pass needs to carry it
    over without looking at its placement (see :meth:`Incremental._standing`)."""

    order: tuple[float, int]
    device: int
    kernel_id: str
    memo: _Memo
    """The placement that made it (the request's, while the claim stands)."""
    kind: _Order | None
    """The order of requests alike it was placed from; None: looked at whenever something its
    placement depends on changed."""
    key: tuple
    """The key of its rank there (see ``Placement._ranked_on``)."""
    home: int | None


_DROPPED = -2
"""A memo's ``pass_no`` once it is dropped or replaced (see :meth:`Incremental._drop`)."""

_NONE_BETTER = (9,)
"""A key after every rank's (see ``Placement._ranked_on``): no device ranks better."""
_UNKNOWN = (-1,)
"""A key before every rank's: the claim is looked at."""


class Incremental:
    """What a scheduling pass of :class:`~.core.BrokerCore` keeps (see the module docstring)."""

    def __init__(self, core: BrokerCore) -> None:
        self.core = core
        self._views: dict[int, _DeviceView] = {}
        self._sizes = {d: info.total_bytes for d, info in core.devices.items()}
        self.alike = RankIndex(core)
        """Every device in the order of its rank for requests alike."""
        self._changed: set[int] = set()
        """The devices changed since the last pass began."""
        self._user_versions: dict[str, int] = {}
        self._touched: set[str] = set()
        self.over: dict[str, int] = {}
        """The users who reached one or more of their daily GPU-time quotas (how many), exact
        during a pass: no request of another user is denied for GPU time."""
        self._flips: list[tuple[float, int, str]] = []
        self._flip_versions: dict[str, int] = {}
        self._epoch = 0
        self._day: int | None = None
        self._closed: dict[int, str] = {}
        self._settings: tuple = ()
        """The quotas and policy the kept placements were found under."""
        self._memos: dict[str, _Memo] = {}
        self._candidates: dict[tuple[int, ...], Candidates] = {}
        """Each list of candidates once (see :meth:`candidates`)."""
        self._pass_no = 0
        self._claims: list[_Claim] = []
        """This pass's claims so far, in queue order."""
        self._old_claims: list[_Claim] = []
        self._next_old = 0
        self._next_carried = 0
        """During a pass: the first of the last pass's claims not yet carried over or looked at."""
        self._quiet_claims = self._to_carry = 0
        """Claims of quiet requests made in this pass, and in the last (none: nothing to carry
        over, and no walk of the claims)."""
        self._differ_version = 0
        """Changes whenever the devices a request's placement is found again over (see
        :meth:`_changed_for`) may change: a pass begins, a claim is made or passed, a device
        changes during the pass. (A claim carried over is of none of them.)"""
        self._all_changed: tuple[int, set[int]] = (-1, set())
        """Those devices among every device, and the version they were found at."""
        self._claims_differ: set[int] = set()
        """Devices claimed ahead of the current request in this pass or in the last, not both."""
        self._claimed: set[int] | None = None
        """During a pass: the devices claimed so far."""
        self._unclaimed_changed: set[int] = set()
        """During a pass: devices changed since the last pass began and not claimed so far (a
        request that neither these nor the claims that differ reach keeps its placement)."""
        self._quiet: dict[str, set[str]] = {}
        """By user: kernels whose request waits for its user's quotas or kernels alone (no
        device looked at), as the last pass that looked at it found: until something of the
        user changes, a pass passes it by."""
        self._loud: set[str] = set()
        """Kernels whose request (if any) the next pass looks at: every other one is quiet."""
        self._everyone = True
        """Whether the next pass looks at every request (nothing kept)."""
        self._visit: list[tuple[tuple[float, int], str]] | None = None
        """During a pass: the requests still to look at, as a heap by queue order."""
        self._at: tuple[float, int] = (0.0, -1)
        """During a pass: the order of the request looked at."""

    # ------------------------------------------------------------------------- changes

    def changed(self, device: int) -> None:
        """Something on ``device`` changed: its view is rebuilt and its requests looked at again."""
        if self._views.pop(device, None) is not None:
            # (without a view, every order already has it to rank again: see RankIndex.changed)
            self.alike.changed(device)
        self._changed.add(device)
        if self._claimed is not None and device not in self._claimed:
            self._unclaimed_changed.add(device)
            self._differ_version += 1

    def touch(self, kernel: Kernel) -> None:
        """``kernel`` changes (or may): its device, and every request of its user, are looked at
        again."""
        if kernel.device is not None:
            self.changed(kernel.device)
        user = kernel.user
        self._user_versions[user] = self._user_versions.get(user, 0) + 1
        self._touched.add(user)
        if (memo := self._memos.get(kernel.kernel_id)) is not None:
            memo.kernel_touched = True
        self._wake(kernel.kernel_id)
        self._wake_user(user)

    def _wake(self, kernel_id: str) -> None:
        """The kernel's request (if any) is looked at by the next pass, and by this one if it
        has not passed it yet."""
        self._loud.add(kernel_id)
        if self._visit is not None:
            kernel = self.core.kernels.get(kernel_id)
            request = None if kernel is None else kernel.request
            if request is not None and request.order > self._at:
                heapq.heappush(self._visit, (request.order, kernel_id))

    def _wake_user(self, user: str) -> None:
        for kernel_id in self._quiet.pop(user, ()):
            self._wake(kernel_id)

    def user_version(self, user: str) -> int:
        """A number that changes whenever one of the user's kernels changes (or may)."""
        return self._user_versions.get(user, 0)

    def left(self, kernel: Kernel) -> None:
        """``kernel``'s request left the queue: its placement is kept no more."""
        self.touch(kernel)
        self._drop(kernel.kernel_id)

    def _drop(self, kernel_id: str) -> None:
        """The kernel's memo (if any) is kept no more: a claim that names it is looked at."""
        memo = self._memos.pop(kernel_id, None)
        if memo is not None:
            memo.pass_no = _DROPPED

    def candidates(self, candidates: list[int]) -> Candidates:
        """What placing a request needs of its ``candidates`` besides them, found once for each
        list of them (a chip's devices: hundreds)."""
        key = tuple(candidates)
        found = self._candidates.get(key)
        if found is None:
            sizes = self._sizes
            found = self._candidates[key] = Candidates(
                frozenset(candidates),
                candidates[:1]
                if self.core._uniform
                else list({sizes[d]: d for d in candidates}.values()),
                max(sizes[d] for d in candidates),
            )
        return found

    def _reset(self) -> None:
        self._candidates.clear()
        self._views.clear()
        self.alike.clear()
        for memo in self._memos.values():
            memo.pass_no = _DROPPED
        self._memos.clear()
        self._quiet.clear()
        self._everyone = True
        self._epoch += 1

    # ------------------------------------------------------------------------- views

    def view(self, device: int) -> _DeviceView:
        view = self._views.get(device)
        if view is None:
            view = self._views[device] = _DeviceView(0, 0, 0, 0, [])
            core = self.core
            for kernel in core._by_device[device].values():
                booking = kernel.booking()
                view.booked += booking
                if kernel.stalled_since is not None:
                    view.stalled += booking
                    view.stalled_kernels.append(kernel)
                elif _unfreeable(kernel):
                    view.fixed += booking
                if kernel.state == KernelState.OFFLOADING and kernel.stalled_since is None:
                    view.offloading += kernel.gpu_bytes
                if kernel.lease is not None or kernel.state == KernelState.RUNNING:
                    view.running += booking  # (running without a lease: see broker.rejoin)
                elif core._evictable(kernel):
                    view.evictable.append(kernel)
        return view

    def victims(self, device: int, now: float) -> list[Kernel]:
        """The device's evictable kernels in eviction order (sorted when first needed)."""
        view = self.view(device)
        if not view.ordered:
            view.evictable.sort(key=lambda k: self.core._eviction_key(k, now))
            view.freed = list(itertools.accumulate(k.booking() for k in view.evictable))
            view.ordered = True
        return view.evictable

    def freed_for(self, device: int, nbytes: int, now: float) -> int | None:
        """The bytes the fewest of the device's kernels, in eviction order, that free ``nbytes``
        free; None if all of them cannot."""
        if nbytes <= 0:
            return 0
        self.victims(device, now)
        freed = self._views[device].freed
        count = bisect.bisect_left(freed, nbytes)
        return None if count == len(freed) else freed[count]

    def evict_for(self, device: int, nbytes: int, now: float) -> list[Kernel]:
        """Those kernels (see :meth:`freed_for`; it found that they can)."""
        if nbytes <= 0:
            return []
        ordered = self.victims(device, now)
        return ordered[: bisect.bisect_left(self._views[device].freed, nbytes) + 1]

    def ranks(
        self, kernel: Kernel, request: Request, context: _Context, devices: Iterable[int]
    ) -> list[tuple]:
        """The ranks of ``devices`` for the request, those where it never fits left out: as
        ``Placement._rank`` finds them, but a rank already shared by requests alike (a device away
        from the kernel's own ones: see ``_DeviceView.ranks``) is read without a call per device,
        which is what a search over every device of a large pool costs."""
        rank, views, sizes = self.core._rank, self._views, self._sizes
        own = {kernel.device, kernel.home, request.claimed}
        own.update(context.quota_devices)
        state = self.core._state_key(kernel, request)
        reservations = context.reservations
        found = []
        for d in devices:
            view = views.get(d)
            reservation = reservations.get(sizes[d])
            if view is None or reservation is None or d in own:
                found_rank = rank(kernel, request, context, d)
            else:
                found_rank = view.ranks.get((reservation, state, False, False), view)
                if found_rank is view:
                    found_rank = rank(kernel, request, context, d)
            if found_rank:
                found.append(found_rank)
        return found

    def best_alike(
        self, kernel: Kernel, request: Request, context: _Context, claimed: set[int]
    ) -> tuple | None:
        """The best rank of the request's unclaimed candidates from the order kept for requests
        alike, if it is one of them (see :mod:`.rank_index`)."""
        return self.alike.best(kernel, request, context, claimed, self._pass_no)

    def booked(self) -> dict[int, int]:
        return {d: self.view(d).booked for d in self.core.devices}

    # ------------------------------------------------------------------------- a pass

    def begin(self, now: float, claimed: set[int], queue: list[Request]) -> None:
        """A pass starts (``claimed``: the devices it claims, as it goes): drop what a new day, new
        quotas or policy, or closed devices make stale, and mark the users whose daily GPU-time
        quota was crossed since the last pass."""
        core = self.core
        day, closed = int(now // DAY), core.closed_devices()
        settings = (core.quotas, core.policy)
        if day != self._day or closed != self._closed or settings != self._settings:
            self._day, self._closed, self._settings = day, dict(closed), settings
            self._reset()
            self._touched.update(core._by_user)  # (their quotas, or their GPU time, changed)
        due = []
        while self._flips and self._flips[0][0] <= now:
            _, version, user = heapq.heappop(self._flips)
            if self._flip_versions.get(user) == version:
                due.append(user)
        for user in (*self._touched, *due):
            self._watch(user, now)
        self._touched.clear()
        self._next_old = self._next_carried = 0
        self._to_carry, self._quiet_claims = self._quiet_claims, 0
        self._differ_version += 1
        self._claims_differ = set()
        self._claims = []
        self._unclaimed_changed, self._changed = self._changed, set()
        self._claimed = claimed
        self._at = (float("-inf"), -1)
        kernels = self.core.kernels
        if self._everyone:
            self._everyone = False
            self._loud.update(r.kernel_id for r in queue)
        visit, loud = [], set()
        for kernel_id in self._loud:
            kernel = kernels.get(kernel_id)
            if kernel is not None and kernel.request is not None:
                visit.append((kernel.request.order, kernel_id))
                loud.add(kernel_id)
        # (A new set: one that held the whole queue once keeps its size, and walking it costs.)
        self._loud = loud
        heapq.heapify(visit)
        self._visit = visit

    def end(self) -> None:
        """The pass is over: its claims are what the next pass compares with."""
        self._claimed = self._visit = None
        self._old_claims = self._claims
        self._pass_no += 1

    def next_request(self, queue: list[Request], index: int) -> int:
        """The index in ``queue`` of the next request from ``index`` on that the pass looks at
        (the ones before it are quiet: they wait as they did, claiming again what they claimed;
        see :meth:`_carry`); ``len(queue)`` if none. Past a claim carried over that leaves no
        device unclaimed, the index after it."""
        visit, kernels = self._visit, self.core.kernels
        assert visit is not None
        while True:
            order = request = None
            while visit:
                order, kernel_id = visit[0]
                kernel = kernels.get(kernel_id)
                request = None if kernel is None else kernel.request
                if request is not None and request.order == order:
                    break
                heapq.heappop(visit)
                order = request = None
            carried = self._carry(order) if self._to_carry else None
            if carried is not None:
                kernel_id, claim_order = carried
                at = bisect.bisect_left(queue, claim_order, lo=index, key=queue_order)
                if kernel_id is None:  # (its claim left no device unclaimed)
                    return at + 1
                self._loud.add(kernel_id)  # (until it is found quiet again)
                if users := self._quiet.get(kernels[kernel_id].user):
                    users.discard(kernel_id)
                self._at = claim_order
                return at
            if request is None:
                return len(queue)
            heapq.heappop(visit)
            at = bisect.bisect_left(queue, order, lo=index, key=queue_order)
            if at < len(queue) and queue[at] is request:
                self._at = order
                return at

    def _carry(self, until: tuple[float, int] | None) -> tuple[str | None, tuple] | None:
        """Claim again, in queue order up to ``until`` (None: the end), what the last pass's
        quiet requests claimed, as long as each one's placement stands (see :meth:`place`): none
        of its candidates changed since, or is claimed ahead of it in one pass alone; or (its
        best device found in the order of requests alike, where a device's rank depends on the
        device alone) its own device did not change and no changed one ranks better now. Returns
        the first request whose placement may not stand (kernel id and order), to be looked at;
        or (None, order) after a claim that leaves no device unclaimed; or None."""
        old, kernels, memos, loud = self._old_claims, self.core.kernels, self._memos, self._loud
        claimed, claims, unclaimed_changed = self._claimed, self._claims, self._unclaimed_changed
        assert claimed is not None
        differ, alike = self._claims_differ, self.alike
        everywhere, last, at, epoch = (
            len(self.core.devices),
            self._pass_no - 1,
            self._at,
            self._epoch,
        )
        index, next_old, carried = self._next_carried, self._next_old, 0
        end = len(old) if until is None else bisect.bisect_left(old, until, index, key=queue_order)
        # The changed devices for each set of candidates, while they stay the same.
        found_for: dict[frozenset[int], set[int]] = {}
        found_at = self._differ_version
        try:
            while index < end:
                if next_old < index:  # (the claims passed by count as claimed ahead)
                    self._next_old = next_old
                    self.ahead(old[index].order)
                    next_old = self._next_old
                # Claims that stand as they are, found without a look at each one's placement
                # (up to the one that leaves no device unclaimed).
                stop = self._standing(index, min(end, index + everywhere - len(claimed)), last, at)
                if stop > index:
                    stretch = old[index:stop]
                    claims += stretch
                    claimed.update(map(claim_device, stretch))
                    carried += stop - index
                    index = next_old = stop
                    if len(claimed) == everywhere:
                        return None, old[stop - 1].order
                    continue
                claim = old[index]
                order, device, kernel_id = claim.order, claim.device, claim.kernel_id
                index += 1
                kernel = kernels.get(kernel_id)
                request = None if kernel is None else kernel.request
                if request is None or request.order != order or order <= at or kernel_id in loud:
                    continue  # (gone, or looked at in this pass: see :meth:`next_request`)
                memo = memos.get(kernel_id)
                if (
                    memo is None
                    or memo.request is not request
                    or memo.pass_no != last
                    or memo.epoch != epoch
                    or memo.kernel_touched
                    or memo.placement.device != device
                    or (context := memo.context) is None
                ):
                    return kernel_id, order
                if differ or unclaimed_changed:
                    if found_at != self._differ_version:
                        found_for.clear()
                        found_at = self._differ_version
                    candidates = context.candidate_set
                    changed = found_for.get(candidates)
                    if changed is None:
                        changed = found_for[candidates] = self._changed_for(candidates)
                    if changed:
                        if memo.ranks is not None or context.alike is None or device in changed:
                            return kernel_id, order
                        key = (
                            claim.key
                            if claim.kind is not None
                            else alike.claim_key(kernel, request, context, device)
                        )
                        if key is None:
                            return kernel_id, order
                        if not alike.stands(
                            kernel, request, context, key, changed, claimed, found_at
                        ):
                            return kernel_id, order
                # Its old claim and its new one are alike: neither makes the claims differ.
                next_old = index
                carried += 1
                memo.pass_no = last + 1
                claimed.add(device)
                claims.append(claim)
                if device in unclaimed_changed:
                    unclaimed_changed.discard(device)
                    found_for.clear()
                if len(claimed) == everywhere:
                    return None, order
            return None
        finally:
            self._next_carried, self._next_old = index, next_old
            self._quiet_claims += carried

    def _standing(self, index: int, end: int, last: int, at: tuple[float, int]) -> int:
        """The first of the last pass's claims from ``index`` on (up to ``end``) that needs a
        look: each one before it stands as it is, and is carried over (its memo marked as this
        pass's). Such a claim's request was placed from the order of requests alike and is
        unchanged (its memo is the one that made the claim), and no changed device (nor one
        claimed ahead of it in one pass alone) can take its place: its device and its home are
        not one, and none ranks better for its kind than the claim (the rank kept with it, which
        stands while its device does not change)."""
        old, loud, now = self._old_claims, self._loud, last + 1
        if index < end and old[index].order <= at:  # (claims are in queue order)
            return index
        reached = self._unclaimed_changed | self._claims_differ
        if not reached:
            for at_claim in range(index, end):
                claim = old[at_claim]
                memo = claim.memo
                if memo.pass_no != last or claim.kernel_id in loud:
                    return at_claim
                memo.pass_no = now
            return end
        floors: dict[_Order, tuple] = {}
        for at_claim in range(index, end):
            claim = old[at_claim]
            memo, kind = claim.memo, claim.kind
            if (
                memo.pass_no != last
                or claim.kernel_id in loud
                or kind is None
                or claim.device in reached
                or claim.home in reached
            ):
                return at_claim
            floor = floors.get(kind)
            if floor is None:
                floor = floors[kind] = self._floor(claim)
            if not claim.key < floor:
                return at_claim
            memo.pass_no = now
        return end

    def _floor(self, claim: _Claim) -> tuple:
        """The least key of the ranks of the changed devices, unclaimed, for requests of the
        claim's kind (a claim of a key after it may not stand: see :meth:`_standing`)."""
        order, claimed = claim.kind, self._claimed
        assert order is not None and claimed is not None
        if not order.kept:
            return _UNKNOWN
        if order.floor_of == self._differ_version:  # (found for this version already)
            return _NONE_BETTER if order.floor is None else order.floor
        kernel, context = self.core.kernels[claim.kernel_id], claim.memo.context
        assert kernel.request is not None and context is not None
        changed = self._changed_for(order.devices)
        found = self.alike.floor(
            kernel, kernel.request, context, changed, claimed, self._differ_version
        )
        return _NONE_BETTER if found is None else found

    def _claim_of(self, order: tuple[float, int], device: int, kernel_id: str) -> _Claim:
        """The claim its placement just made, with what the next pass needs to carry it over
        (see :meth:`_standing`)."""
        memo, kernel = self._memos[kernel_id], self.core.kernels[kernel_id]
        context, kind, key = memo.context, None, _NONE_BETTER
        if (
            context is not None
            and memo.ranks is None
            and context.alike is not None
            and not context.quota_devices
        ):
            assert kernel.request is not None
            found = self.alike.claim_key(kernel, kernel.request, context, device)
            if found is not None:
                kind, key = context.alike, found
        return _Claim(order, device, kernel_id, memo, kind, key, kernel.home)

    def looked_at(self, kernel: Kernel, request: Request) -> None:
        """The pass told ``request`` where it waits: quiet from now on if it waits for its user's
        quotas or kernels alone, as its placement found, or for a device it claims with no idle
        kernel to move, found from an order of requests alike (the next pass carries its claim
        over if that stands: see :meth:`_carry`; a request of few candidates is looked at)."""
        memo = self._memos.get(kernel.kernel_id)
        if (
            memo is not None
            and memo.pass_no == self._pass_no
            and not memo.kernel_touched
            and memo.user_version == self._user_versions.get(kernel.user, 0)
            and kernel.lease is None
            and kernel.state == KernelState.QUEUED
            and request.reason == memo.placement.wait
            and (
                memo.context is None
                or (
                    memo.placement.device is not None
                    and not memo.placement.victims
                    and memo.context.alike is not None  # (else few devices: looked at)
                )
            )
        ):
            self._loud.discard(kernel.kernel_id)
            self._quiet.setdefault(kernel.user, set()).add(kernel.kernel_id)
            self._quiet_claims += memo.placement.device is not None

    def reclaimed(self, kernel_id: str) -> None:
        """The kernel's request claims another device (or none) from now on. Its ranks on the
        device it claimed and on the one it claims now were found with the old claim (see
        ``Placement._ranked_on``), so its next placement ranks every device again; until then
        its placement stands (its new device only ranks better with the claim)."""
        memo = self._memos.get(kernel_id)
        if memo is not None and memo.ranks is not None:
            memo.ranks, memo.heap = None, []

    def behind(self, rest: list[Request]) -> None:
        """Every device is claimed ahead of ``rest``: each of them is looked at (it waits behind
        the claims, whatever its placement found) until a pass finds otherwise."""
        quiet, kernels = self._quiet, self.core.kernels
        for request in rest:
            self._loud.add(request.kernel_id)
            if users := quiet.get(kernels[request.kernel_id].user):
                users.discard(request.kernel_id)

    def reached_a_time_quota(self, user: str) -> bool:
        """Whether ``user`` reached one of their daily GPU-time quotas, exact during a pass: if
        not, no request of theirs is denied for GPU time (the common case needs no sum)."""
        return user in self.over

    def ahead(self, order: tuple[float, int]) -> None:
        """The pass reached the request of this ``order``: the last pass's claims of the requests
        before it count as claimed ahead."""
        old, index = self._old_claims, self._next_old
        if index < len(old) and old[index].order < order:
            self._differ_version += 1
            differ = self._claims_differ
            while index < len(old) and old[index].order < order:
                device = old[index].device
                if device in differ:
                    differ.remove(device)
                else:
                    differ.add(device)
                index += 1
            self._next_old = index

    def claim(self, order: tuple[float, int], device: int, kernel_id: str) -> None:
        self._differ_version += 1
        self._claims.append(self._claim_of(order, device, kernel_id))
        differ = self._claims_differ
        if device in differ:
            differ.remove(device)
        else:
            differ.add(device)
        self._unclaimed_changed.discard(device)

    def _watch(self, user: str, now: float) -> None:
        """Look again at how many daily GPU-time quotas ``user`` reached; if that changed, their
        requests and the eviction order of their kernels' devices change; keep when it next does."""
        core = self.core
        kernels = core._by_user.get(user)
        self._flip_versions[user] = version = self._flip_versions.get(user, 0) + 1
        if not kernels:
            self.over.pop(user, None)
            return
        groups = {k.groups for k in kernels.values()}  # (a user's kernels share a few)
        quotas = {core.limits(user, g).gpu_seconds_per_day for g in groups}
        thresholds = sorted(q for q in quotas if q is not None)
        used = core.used_seconds(user, now) if thresholds else 0.0
        reached = bisect.bisect_right(thresholds, used)
        if self.over.get(user, 0) != reached:
            if reached:
                self.over[user] = reached
            else:
                del self.over[user]
            self._user_versions[user] = self._user_versions.get(user, 0) + 1
            self._wake_user(user)
            for kernel in kernels.values():
                if kernel.device is not None:
                    self.changed(kernel.device)
        running = sum(1 for k in kernels.values() if k.lease is not None and k.lease.hold)
        if running and reached < len(thresholds):
            at = now + (thresholds[reached] - used) / running - _EARLY
            heapq.heappush(self._flips, (at, version, user))

    # ------------------------------------------------------------------------- placing

    def place(self, kernel: Kernel, request: Request, claimed: set[int], now: float) -> _Placement:
        """Where ``request`` runs, placed again only as far as its inputs changed."""
        core = self.core
        memo = self._memos.get(kernel.kernel_id)
        version = self._user_versions.get(kernel.user, 0)
        fresh: _Context | _Placement | None = None
        if (
            memo is not None
            and memo.request is request
            and memo.pass_no == self._pass_no - 1
            and memo.epoch == self._epoch
        ):
            if memo.user_version != version and memo.context is not None:
                # Another kernel of its user changed: its ranks stand if its context does.
                fresh = core._placing(kernel, request, now)
                if not memo.kernel_touched and _same_context(fresh, memo.context):
                    memo.user_version = version
        else:
            memo = None
        if memo is not None and memo.user_version == version:
            context = memo.context
            changed = None if context is None else self._changed_for(context.candidate_set)
            if changed:
                assert context is not None
                if memo.ranks is None or context.anywhere:
                    memo.placement, ranks = core._on_devices(kernel, request, context, claimed)
                    memo.ranks, memo.heap = _ranked(ranks)
                else:
                    memo.placement = self._rank_again(
                        kernel, request, context, claimed, memo, changed
                    )
            memo.pass_no = self._pass_no
            if memo.placement.deny:
                self._drop(kernel.kernel_id)
            return memo.placement
        context = fresh or core._placing(kernel, request, now)
        ranks = None
        if isinstance(context, _Context):
            placement, ranks = core._on_devices(kernel, request, context, claimed)
        else:
            placement, context = context, None
        self._drop(kernel.kernel_id)
        if not placement.deny:
            self._memos[kernel.kernel_id] = _Memo(
                request,
                placement,
                context,
                *_ranked(ranks),
                version,
                self._epoch,
                self._pass_no,
            )
        return placement

    def _rank_again(
        self,
        kernel: Kernel,
        request: Request,
        context: _Context,
        claimed: set[int],
        memo: _Memo,
        changed: set[int],
    ) -> _Placement:
        """Rank the changed devices again (the others' ranks stand) and place on the best."""
        core, ranks, heap = self.core, memo.ranks, memo.heap
        assert ranks is not None
        best = heap[0][2] if heap else None
        for d in changed:
            ranks.pop(d, None)
            if d not in claimed and (rank := core._rank(kernel, request, context, d)):
                ranks[d] = rank
                heapq.heappush(heap, (rank[0], next(_serial), rank))
        while heap and ranks.get(heap[0][2][1]) is not heap[0][2]:
            heapq.heappop(heap)
        if not heap:
            placement, fresh = core._on_devices(kernel, request, context, claimed)
            memo.ranks, memo.heap = _ranked(fresh)
            return placement
        if len(heap) > 2 * len(ranks) + 16:
            memo.heap = heap = _heap(ranks.values())
        if heap[0][2] is best:
            return memo.placement  # (the same rank: its device did not change)
        return core._placement_on(kernel, context, heap[0][2], 0)

    def _changed_for(self, candidates: frozenset[int]) -> set[int]:
        """The request's candidate devices that changed since the last pass began and are not
        claimed ahead of it (one claimed ahead of it in both passes is not ranked in either), or
        that are claimed ahead of it in this pass and not in the last, or the other way round."""
        changed, differ = self._unclaimed_changed, self._claims_differ
        if len(candidates) == len(self.core.devices):  # (every device: once per version)
            version, found = self._all_changed
            if version != self._differ_version:
                found = changed | differ
                self._all_changed = (self._differ_version, found)
            return found
        found = changed & candidates if changed and not changed.isdisjoint(candidates) else set()
        if differ and not differ.isdisjoint(candidates):
            found |= differ & candidates
        return found


def _same_context(fresh: _Context | _Placement, kept: _Context) -> bool:
    """Whether a context found again is the kept one in all that ranks depend on (the request's
    own kernel unchanged)."""
    return (
        isinstance(fresh, _Context)
        and fresh.limits == kept.limits
        and fresh.candidates == kept.candidates
        and fresh.anywhere == kept.anywhere
        and fresh.own_fixed == kept.own_fixed
        and len(fresh.quota_victims) == len(kept.quota_victims)
        and all(a is b for a, b in zip(fresh.quota_victims, kept.quota_victims, strict=True))
    )


def _ranked(ranks: list[tuple] | None) -> tuple[dict[int, tuple] | None, list[tuple]]:
    """Ranks by device, and as a heap."""
    if ranks is None:
        return None, []
    return {rank[1]: rank for rank in ranks}, _heap(ranks)


_serial = itertools.count()


claim_device = operator.attrgetter("device")

queue_order = operator.attrgetter("order")
"""A request's (or a claim's) place in the queue (a key in C: bisecting the queue calls no
Python)."""


def _heap(ranks: Iterable[tuple]) -> list[tuple]:
    heap = [(rank[0], next(_serial), rank) for rank in ranks]
    heapq.heapify(heap)
    return heap


def _unfreeable(kernel: Kernel) -> bool:
    """Memory no eviction can free: pinned, refused or failed kernels, and what an offload left
    behind (e.g. a CUDA context), which stays until the kernel runs again. (A kernel that stopped
    answering holds its memory only until it answers again or ends: see ``_DeviceView.stalled``;
    a refused kernel that holds a lease, a kept one say, only until the lease ends, which clears
    the refusal.)"""
    return kernel.stalled_since is None and (
        kernel.pinned
        or (bool(kernel.refused) and kernel.lease is None)
        or kernel.state == KernelState.ERROR
        or (
            kernel.lease is None
            and kernel.state not in (KernelState.RESIDENT, KernelState.OFFLOADING, *LEASE_STATES)
        )
    )
