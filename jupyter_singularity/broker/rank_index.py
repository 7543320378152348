"""Every device in the order of its rank for requests alike, kept between passes.

A request of a kernel with nothing on any device, which may run on any device (or on any of a
chip's), ranks each of them but its home, the device it claims and the devices of its user's
kernels it makes room under quota from (its own devices) as every request alike does (the same
candidates, the same reservation for each device size, and the same state to bring back: see
``_DeviceView.ranks``).
Searching them all for each such request costs O(devices); here they are kept sorted by that
shared rank, per kind of request, and only devices that changed since are ranked again. The
request's best device is then one of its own or the first device of the order that is not one
of them and not claimed ahead of it. Claims only grow during a pass, so the devices claimed at
the head of the order are stepped over once per pass, not once per request.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .model import Kernel, Request

if TYPE_CHECKING:
    from .core import BrokerCore
    from .incremental import _Context


_MANY = 16
"""Candidates from which a request is placed from an order (a search over fewer costs less than
keeping an order in step)."""


_KEPT = 16
"""Orders kept (each is kept in step with every device change), the ones read last."""


@dataclass(eq=False)
class _Order:
    """The devices by their rank for one kind of request (those where it never fits left out)."""

    devices: frozenset[int]
    """Their candidates."""
    state: int
    """The state such requests bring back (-1: not their first cell; see ``Placement._rank``)."""
    keys: list[tuple] = field(default_factory=list)
    """The ranks' keys, sorted (a key ends with its device, so no two are equal)."""
    ranks: dict[int, tuple] = field(default_factory=dict)
    dirty: set[int] = field(default_factory=set)
    """Devices changed since they were last ranked."""
    pass_no: int = -1
    head: int = 0
    """In pass ``pass_no``: every key before it is of a device claimed in that pass."""
    kept: bool = True
    """Whether it is kept in step with the devices (else it was dropped: see ``_KEPT``)."""
    floor_of: int | None = None
    floor: tuple | None = None
    """The least key of the changed devices unclaimed, as found at version ``floor_of`` of the
    devices changed or claimed differently (see :meth:`RankIndex.stands`)."""


class RankIndex:
    """The devices' shared ranks, in order, per kind of request (see the module docstring)."""

    def __init__(self, core: BrokerCore) -> None:
        self.core = core
        self._orders: dict[tuple, _Order] = {}
        self._size_of = {d: info.total_bytes for d, info in core.devices.items()}
        self._one_of_size: dict[frozenset[int], list[int]] = {}
        """By candidates: one device of each size, by size."""

    def changed(self, device: int) -> None:
        """The device's view was dropped: it is ranked again when an order is next read (an
        order ranks a device from its view, so a device without a view is to be ranked again in
        every order already)."""
        for order in self._orders.values():
            if device in order.devices:
                order.dirty.add(device)
                order.floor_of = None

    def clear(self) -> None:
        for order in self._orders.values():
            order.kept = False
        self._orders.clear()

    def best(
        self,
        kernel: Kernel,
        request: Request,
        context: _Context,
        claimed: set[int],
        pass_no: int,
    ) -> tuple | None:
        """The request's best unclaimed device's rank (see ``Placement._rank``), as a search over
        its candidates finds it; None when the request is not of a kind kept here, or when no
        device but claimed ones fits (the search says why)."""
        core = self.core
        candidates = context.candidate_set
        if context.anywhere or kernel.device is not None or len(candidates) < _MANY:
            return None
        rank = core._rank
        own = {kernel.home, request.claimed, *context.quota_devices}
        own_rank = min(
            (
                r
                for d in own
                if d in candidates and d not in claimed and (r := rank(kernel, request, context, d))
            ),
            default=None,
        )
        order = self._order(kernel, request, context)
        keys, ranks = order.keys, order.ranks
        if order.pass_no != pass_no:
            order.pass_no, order.head = pass_no, 0
        at = order.head
        while at < len(keys) and keys[at][-1] in claimed:
            at += 1
        order.head = at
        while at < len(keys) and (keys[at][-1] in own or keys[at][-1] in claimed):
            at += 1
        away = ranks[keys[at][-1]] if at < len(keys) else None
        if away is None or (own_rank is not None and own_rank < away):
            return own_rank
        return away

    def _order(self, kernel: Kernel, request: Request, context: _Context) -> _Order:
        """The order of the request's kind, its changed devices ranked again."""
        order = context.alike
        if order is not None and order.kept:  # (a context is of one kind: it is found again when
            # its kernel changes, the reservations it keeps by device size do not)
            if order.dirty:
                self._rank_again(order, kernel, request, context)
            return order
        candidates, reservations = context.candidate_set, context.reservations
        sizes = self._one_of_size.get(candidates)
        if sizes is None:
            by_size = {self._size_of[d]: d for d in sorted(candidates)}
            sizes = self._one_of_size[candidates] = [by_size[size] for size in sorted(by_size)]
        for d in sizes:
            if self._size_of[d] not in reservations:
                self.core._rank(kernel, request, context, d)
        state = self.core._state_key(kernel, request)
        kind = (candidates, tuple(reservations[self._size_of[d]] for d in sizes), state)
        order = self._orders.get(kind)
        if order is None:
            if len(self._orders) >= _KEPT:  # (the one read longest ago goes)
                oldest = min(self._orders, key=lambda kind: self._orders[kind].pass_no)
                self._orders.pop(oldest).kept = False
            order = self._orders[kind] = _Order(candidates, state, dirty=set(candidates))
        if order.dirty:
            self._rank_again(order, kernel, request, context)
        context.alike = order
        return order

    def claim_key(
        self, kernel: Kernel, request: Request, context: _Context, device: int
    ) -> tuple | None:
        """The key of the request's rank on ``device``, the one it claims, found in the order
        of requests alike; None when that order cannot tell it (dropped, or the rank there is
        the request's own: it makes room under quota there)."""
        order = context.alike
        assert order is not None
        if not order.kept or device in context.quota_devices:
            return None
        if order.dirty:
            self._rank_again(order, kernel, request, context)
        best = order.ranks.get(device)
        return None if best is None else _own(best[0], device == kernel.home, True)

    def stands(
        self,
        kernel: Kernel,
        request: Request,
        context: _Context,
        key: tuple,
        changed: set[int],
        claimed: set[int],
        version: int,
    ) -> bool:
        """Whether the device the request claims, of rank ``key`` (see :meth:`claim_key`), found
        in the order of requests alike and unchanged since, is still its best although the
        ``changed`` devices (of its candidates, unclaimed ahead of it in one pass at least)
        changed: none of them that is unclaimed now ranks better. ``version`` changes whenever
        ``changed`` may (for a request of this kind) and whenever which of them are claimed may."""
        order = context.alike
        assert order is not None
        if not order.kept or not context.quota_devices.isdisjoint(changed):
            return False  # (its ranks there are its own: looked at)
        floor = self.floor(kernel, request, context, changed, claimed, version)
        home = kernel.home
        if home in changed and home not in claimed:
            found = order.ranks.get(home)
            if found is not None and _own(found[0], True, home == request.claimed) < key:
                return False
        return floor is None or key < floor

    def floor(
        self,
        kernel: Kernel,
        request: Request,
        context: _Context,
        changed: set[int],
        claimed: set[int],
        version: int,
    ) -> tuple | None:
        """The least key of the ranks of the ``changed`` devices unclaimed in the order of the
        request's kind (kept), found once per ``version`` (see :meth:`stands`); None: none."""
        order = context.alike
        assert order is not None and order.kept
        if order.floor_of != version:
            if order.dirty:
                self._rank_again(order, kernel, request, context)
            ranks = order.ranks
            found = [r[0] for d in changed if d not in claimed and (r := ranks.get(d)) is not None]
            order.floor_of, order.floor = version, min(found, default=None)
        return order.floor

    def _rank_again(
        self, order: _Order, kernel: Kernel, request: Request, context: _Context
    ) -> None:
        """Rank the changed devices again for requests of this kind (``kernel``'s request is one:
        its rank on its home and on the device it claims differs from theirs by the key alone
        (see :func:`_own`); on the devices it makes room under quota from, by what it makes room
        with)."""
        core, keys, ranks, state = self.core, order.keys, order.ranks, order.state
        views, reservations, size_of = core._incremental, context.reservations, self._size_of
        if context.quota_victims:
            context = replace(context, quota_victims=())
        # (a quarter of them or more changed, a new order's all: sorted once at the end, which
        # then costs less than two bisections per change; each kept in its place otherwise)
        resort = 4 * len(order.dirty) >= len(keys)
        for d in order.dirty:
            old = ranks.pop(d, None)
            if old is not None and not resort:
                at = bisect.bisect_left(keys, old[0])
                del keys[at]
                if at < order.head:
                    order.head -= 1
            view = views.view(d)
            reservation = reservations[size_of[d]]
            key = (reservation, state, False, False)
            found = view.ranks.get(key, view)
            if found is view and d != kernel.home and d != request.claimed:
                # (what ``Placement._rank`` finds and keeps there, without a second lookup: the
                # kernel has nothing on any device)
                found = view.ranks[key] = core._ranked_on(
                    kernel, request, context, d, view, reservation
                )
            elif found is view:
                found = core._rank(kernel, request, context, d)
                if found is not None:
                    (tier, _, room, _, _), _, reservation, victims = found
                    found = ((tier, 1, room, 1, d), d, reservation, victims)
                view.ranks[key] = found
            if found is not None:
                ranks[d] = found
                if not resort:
                    at = bisect.bisect_left(keys, found[0])
                    keys.insert(at, found[0])
                    if at < order.head:
                        order.head = at
        if resort:
            keys[:] = sorted([rank[0] for rank in ranks.values()])
            order.head = 0
        order.dirty.clear()


def _own(key: tuple, home: bool, claims: bool) -> tuple:
    """A rank's key on a device that is the request's home or the one it claims, from the key
    requests alike have there (see ``Placement._ranked_on``)."""
    if not home and not claims:
        return key
    tier, affinity, room, stays, device = key
    return (tier, 0 if home else affinity, room, 0 if claims else stays, device)
