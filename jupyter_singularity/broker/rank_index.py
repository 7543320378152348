"""Every device in the order of its rank for requests alike, kept between passes.

A request of a kernel with nothing on any device, which may run on any device and makes no room
under its user's quotas, ranks every device but its home as every request alike does (the same
reservation for each device size, and the same state to bring back: see ``_DeviceView.ranks``).
Searching the whole pool for each such request costs O(devices); here the pool is kept sorted by
that shared rank, per kind of request, and only devices that changed since are ranked again. The
request's best device is then its home or the first device of the order that is not claimed
ahead of it. Claims only grow during a pass, so the devices claimed at the head of the order are
stepped over once per pass, not once per request.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .model import Kernel, Request

if TYPE_CHECKING:
    from .core import BrokerCore
    from .incremental import _Context


@dataclass
class _Order:
    """The devices by their rank for one kind of request (those where it never fits left out)."""

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
    floor_of: tuple | None = None
    floor: tuple | None = None
    """The least key of the changed devices unclaimed, for ``floor_of``: (those devices, the
    claims they were found under; see :meth:`RankIndex.stands`)."""


class RankIndex:
    """The devices' shared ranks, in order, per kind of request (see the module docstring)."""

    def __init__(self, core: BrokerCore) -> None:
        self.core = core
        self._orders: dict[tuple, _Order] = {}
        self._sizes = sorted({info.total_bytes for info in core.devices.values()})
        self._one_of_size = {info.total_bytes: d for d, info in core.devices.items()}
        self._size_of = {d: info.total_bytes for d, info in core.devices.items()}

    def changed(self, device: int) -> None:
        for order in self._orders.values():
            order.dirty.add(device)
            order.floor_of = None

    def clear(self) -> None:
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
        every device finds it; None when the request is not of the kind kept here, or when no
        device but claimed ones fits (the search says why)."""
        core = self.core
        if (
            context.anywhere
            or context.quota_victims
            or kernel.device is not None
            or len(context.candidates) != len(core.devices)
        ):
            return None
        rank = core._rank
        home = kernel.home
        home_rank = (
            None if home is None or home in claimed else rank(kernel, request, context, home)
        )
        reservations = context.reservations
        for size in self._sizes:
            if size not in reservations:
                rank(kernel, request, context, self._one_of_size[size])
        first_cell = request.memory is None and not kernel.peaks
        state = kernel.gpu_bytes + kernel.host_bytes + kernel.disk_bytes if first_cell else -1
        kind = (tuple(reservations[size] for size in self._sizes), state)
        order = self._orders.get(kind)
        if order is None:
            order = self._orders[kind] = _Order(state, dirty=set(core.devices))
        if order.dirty:
            self._rank_again(order, kernel, request, context)
        context.alike = order
        keys, ranks = order.keys, order.ranks
        if order.pass_no != pass_no:
            order.pass_no, order.head = pass_no, 0
        at = order.head
        while at < len(keys) and keys[at][-1] in claimed:
            at += 1
        order.head = at
        while at < len(keys) and (keys[at][-1] == home or keys[at][-1] in claimed):
            at += 1
        away = ranks[keys[at][-1]] if at < len(keys) else None
        if away is None or (home_rank is not None and home_rank < away):
            return home_rank
        return away

    def stands(
        self,
        kernel: Kernel,
        request: Request,
        context: _Context,
        device: int,
        changed: set[int],
        claimed: set[int],
        claims: int,
    ) -> bool:
        """Whether ``device``, the request's best when last found in the order of requests
        alike and unchanged since, is still its best although the ``changed`` devices (of its
        candidates, unclaimed ahead of it in one pass at least) changed: none of them that is
        unclaimed now ranks better. ``claims`` changes whenever a claim may have changed which
        changed devices are claimed (a claim carried over is of an unchanged device)."""
        order = context.alike
        assert order is not None
        if order.dirty:
            self._rank_again(order, kernel, request, context)
        ranks, home = order.ranks, kernel.home
        best = ranks.get(device)
        if best is None:
            return False
        best_key = _at_home(best[0]) if device == home else best[0]
        if home in changed:
            found = None if home in claimed else ranks.get(home)
            if found is not None and _at_home(found[0]) < best_key:
                return False
        of = (frozenset(changed), claims)
        if order.floor_of != of:
            found = [r[0] for d in changed if d not in claimed and (r := ranks.get(d)) is not None]
            order.floor_of, order.floor = of, min(found, default=None)
        return order.floor is None or best_key < order.floor

    def _rank_again(
        self, order: _Order, kernel: Kernel, request: Request, context: _Context
    ) -> None:
        """Rank the changed devices again for requests of this kind (``kernel``'s request is one:
        its rank on its home differs from theirs by the affinity alone)."""
        core, keys, ranks, state = self.core, order.keys, order.ranks, order.state
        views, reservations, size_of = core._incremental, context.reservations, self._size_of
        for d in order.dirty:
            old = ranks.pop(d, None)
            if old is not None:
                at = bisect.bisect_left(keys, old[0])
                del keys[at]
                if at < order.head:
                    order.head -= 1
            view = views.view(d)
            key = (reservations[size_of[d]], state, False)
            found = view.ranks.get(key, view)
            if found is view and d != kernel.home:
                found = core._rank(kernel, request, context, d)
            elif found is view:
                found = core._rank(kernel, request, context, d)
                if found is not None:
                    (tier, _, room, _), _, reservation, victims = found
                    found = ((tier, 1, room, d), d, reservation, victims)
                view.ranks[key] = found
            if found is not None:
                ranks[d] = found
                at = bisect.bisect_left(keys, found[0])
                keys.insert(at, found[0])
                if at < order.head:
                    order.head = at
        order.dirty.clear()


def _at_home(key: tuple) -> tuple:
    """A rank's key on the request's home device, from the key requests alike have there."""
    tier, _, room, device = key
    return (tier, 0, room, device)
