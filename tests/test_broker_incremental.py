"""A pass that keeps device views and placements from the last one decides as a pass from nothing.

Two cores get the same random events (cells asking, ending and being cancelled, offloads and
restores reported, kernels coming and going, pinned, stalled, devices closed, quotas changed, time
passing across daily GPU-time quotas while cells run). One keeps what its passes found between
events; the other starts every event from nothing (a new :class:`Incremental` that also sums
every request's GPU time). Every event must return the same actions from both, and both must
tell the same requests that moved up the queue their place.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from jupyter_singularity.broker.core import BrokerCore
from jupyter_singularity.broker.incremental import Incremental
from jupyter_singularity.broker.model import (
    BrokerError,
    Deny,
    Grant,
    Kernel,
    KernelState,
    Offload,
    Policy,
)
from jupyter_singularity.broker.quotas import Quotas
from jupyter_singularity.devices import DeviceInfo

GiB = 1 << 30
QUOTA_SETS = [
    {
        "default": {"gpu_hours_per_day": 0.02, "max_resident_kernels": 3},
        "group:big": {"priority": 2, "gpu_hours_per_day": 0.05, "gpu_memory": "20GiB"},
    },
    {"default": {"gpu_memory": "12GiB"}, "user:u1": {"gpu_hours_per_day": 0.01}},
    {"user:u2": {"priority": 0.5, "max_resident_kernels": 1}},
]


class FromNothing(Incremental):
    """Keeps nothing it could reuse: every event starts a new one, and a request's GPU-time quota
    is always summed."""

    def reached_a_time_quota(self, user: str) -> bool:
        return True


def devices(seed: int) -> list[DeviceInfo]:
    """Three or five devices: of one size, or of two chips and sizes (migration within a chip)."""
    count = 3 if seed % 2 else 5
    if seed % 3 == 0:
        return [DeviceInfo(i, f"GPU-{i}", "X", "X", 16 * GiB) for i in range(count)]
    return [
        DeviceInfo(
            i, f"GPU-{i}", "A" if i % 2 else "B", "A" if i % 2 else "B", (i % 2 + 1) * 8 * GiB
        )
        for i in range(count)
    ]


def report(core: BrokerCore, pending: list, now: float) -> list | None:
    """The offload or restore a core asked for first, reported done (None: it is moot now)."""
    kernel = core.kernels.get(pending.pop(0))
    if kernel is not None and kernel.state == KernelState.OFFLOADING:
        return core.offloaded(kernel.kernel_id, now, kernel.gpu_bytes)
    if kernel is not None and kernel.state == KernelState.RESTORING:
        return core.restored(kernel.kernel_id, now)
    return None


def toggle(core: BrokerCore, rng: random.Random, kernel: Kernel, roll: float, now: float) -> list:
    """Pin or unpin ``kernel`` (``roll`` < 1/3), let it stop or start answering (< 2/3), or close
    or reopen a device."""
    if roll < 1 / 3:
        return core.set_pinned(kernel.kernel_id, not kernel.pinned, now)
    if roll < 2 / 3:
        since = None if kernel.stalled_since is not None else now
        return core.set_stalled(kernel.kernel_id, since, now)
    device = rng.randrange(len(core.devices))
    reason = None if device in core.unavailable else "a lease there may still write"
    return core.set_device_unavailable(device, reason, now)


def replay(
    kept: BrokerCore, fresh: BrokerCore, seed: int, serials: range, make_event: Callable
) -> tuple[list, int]:
    """The same random events (``make_event``, seeded alike) on a core that keeps what it found
    between passes and on one that starts every event from nothing: each event must return the
    same actions, and the queue the same places. Returns every event's actions, and how many
    claims the keeping core carried over from one pass to the next."""
    rng_kept, rng_fresh = random.Random(seed), random.Random(seed)
    now, pending_kept, pending_fresh = 0.0, [], []
    every, carried = [], 0
    for serial in serials:
        now += random.Random(seed * 1000 + serial).choice((0.5, 3.0, 20.0))
        fresh._incremental = FromNothing(fresh)
        expected = make_event(fresh, rng_fresh, serial, now, pending_fresh)
        actions = make_event(kept, rng_kept, serial, now, pending_kept)
        assert actions == expected, f"event {serial}"
        if serial % 3 == 0:  # (the service tells moved requests their place now and then)
            assert kept.positions() == fresh.positions(), f"event {serial}"
        for pending, happened in ((pending_kept, actions), (pending_fresh, expected)):
            pending += [a.kernel_id for a in happened if isinstance(a, Offload)]
            pending += [a.kernel_id for a in happened if isinstance(a, Grant) and a.restore]
        every.append(actions)
        carried += kept._incremental._to_carry
    return every, carried


def event(core: BrokerCore, rng: random.Random, serial: int, now: float, pending: list) -> list:
    """One random event on ``core`` (the same for both cores: ``rng`` is seeded alike)."""
    kernels = sorted(core.kernels.values(), key=lambda k: k.kernel_id)
    kernel = rng.choice(kernels) if kernels else None
    roll = rng.random()
    try:
        if kernel is None or roll < 0.07:
            groups = ("big",) if rng.random() < 0.3 else ()
            return core.register(f"k{serial}", f"u{serial % 9}", now, groups)
        if roll < 0.1:
            return core.unregister(kernel.kernel_id, now)
        if roll < 0.42 and kernel.lease is None and kernel.request is None:
            memory = rng.choice((None, None, 2 * GiB, 5 * GiB))
            return core.acquire(kernel.kernel_id, f"r{serial}", now, memory)
        if roll < 0.46 and kernel.request is not None:
            return core.cancel(kernel.kernel_id, kernel.request.request_id, now)
        if roll < 0.68 and kernel.lease is not None and kernel.lease.hold:
            peak = rng.randrange(1, 7) * GiB
            rid = kernel.lease.request_id
            return core.release(kernel.kernel_id, rid, now, peak, peak // 2)
        if roll < 0.8 and pending:
            reported = report(core, pending, now)
            return core.tick(now) if reported is None else reported
        if roll < 0.88:
            return toggle(core, rng, kernel, (roll - 0.8) / 0.08, now)
        if roll < 0.9:
            return core.set_quotas(Quotas.parse(rng.choice(QUOTA_SETS)), now)
        if roll < 0.92 and kernel.state == KernelState.OFFLOADED:
            return core.restore(kernel.kernel_id, now)
        return core.tick(now)
    except BrokerError as error:
        return [str(error)]


@pytest.mark.parametrize("seed", range(12))
def test_kept_placements_decide_as_a_pass_from_nothing(seed: int) -> None:
    quotas = QUOTA_SETS[seed % len(QUOTA_SETS)]
    # (every third seed: first cells of a size set by the policy, not the whole device)
    policy = Policy(migration=seed % 4 != 1, first_cell_memory=(seed % 3 == 2) * 6 * GiB)
    kept, fresh = (
        BrokerCore(devices(seed), Quotas.parse(quotas), policy, now=0.0) for _ in range(2)
    )
    every, _ = replay(kept, fresh, seed, range(500), event)
    grants = sum(isinstance(a, Grant) for actions in every for a in actions)
    assert grants > 20  # (the sequence does place requests)


def test_time_alone_denies_a_queued_cell_once_its_user_ran_through_the_daily_quota() -> None:
    """Nothing but time changes between the two passes: the user's running cell crosses their
    daily GPU time, so the request kept from the last pass is denied now, not kept waiting."""
    quotas = Quotas.parse({"default": {"gpu_hours_per_day": 0.01}})  # 36 s
    devices_ = [DeviceInfo(0, "GPU-0", "X", "X", 16 * GiB)]
    core = BrokerCore(devices_, quotas, Policy(), now=0.0)
    for kernel_id in ("a1", "a2", "b1"):
        core.register(kernel_id, "alice" if kernel_id[0] == "a" else "bob", 0.0)
    assert any(isinstance(a, Grant) for a in core.acquire("a1", "r1", 1.0))
    core.acquire("b1", "r2", 2.0)  # bob waits for the whole device...
    core.acquire("a2", "r3", 3.0)  # ...and alice's second cell behind him
    assert core.kernels["a2"].request is not None
    assert not [a for a in core.tick(20.0) if isinstance(a, Deny)]  # 19 s so far
    actions = core.tick(40.0)  # alice's cell ran 39 s
    denials = [a for a in actions if isinstance(a, Deny)]
    assert [(d.kernel_id, d.request_id) for d in denials] == [("a2", "r3")], actions
    assert "GPU-time quota reached" in denials[0].reason


def test_a_request_may_use_its_chips_largest_gpu_only_though_another_chip_has_more() -> None:
    """What a request needs of its candidates (the largest, one of each size) is found once per
    list of candidates: a kernel whose state came off a chip's device asks the chip's devices."""
    core = BrokerCore(
        [
            DeviceInfo(0, "GPU-0", "A", "A", 16 * GiB),
            DeviceInfo(1, "GPU-1", "B", "B", 8 * GiB),
            DeviceInfo(2, "GPU-2", "B", "B", 8 * GiB),
        ],
        Quotas.parse({}),
        Policy(),
        now=0.0,
    )
    core.register("k", "alice", 0.0)
    core.register("cold", "bob", 0.0)
    assert [a.device for a in core.acquire("k", "r1", 1.0, memory=2 * GiB, device=1)] == [1, 1]
    core.release("k", "r1", 2.0, peak_bytes=2 * GiB, gpu_bytes=2 * GiB)
    core.offload("k", 3.0)
    core.offloaded("k", 4.0, host_bytes=2 * GiB)
    (deny,) = core.acquire("k", "r2", 5.0, memory=12 * GiB)
    assert isinstance(deny, Deny)
    assert deny.reason == "asked for 12.0 GiB but the largest GPU it may use has 8.0 GiB"
    # A kernel with nothing on any device may use the 16 GiB one, found from the same cache.
    grant = [a for a in core.acquire("cold", "r3", 6.0, memory=12 * GiB) if isinstance(a, Grant)]
    assert [(g.device, g.reservation) for g in grant] == [(0, 12 * GiB)]
    # Its own chip's devices still hold it back, the same list found again.
    (deny,) = core.acquire("k", "r4", 7.0, memory=9 * GiB)
    assert isinstance(deny, Deny) and "has 8.0 GiB" in deny.reason


def chips(count: int) -> list[DeviceInfo]:
    """Two chips of ``count // 2`` devices each (16 and 8 GiB): enough candidates that requests
    are placed from the orders kept for requests alike (see ``rank_index``)."""
    return [
        DeviceInfo(
            i, f"GPU-{i}", "H" if i % 2 else "A", "H" if i % 2 else "A", (i % 2 + 1) * 8 * GiB
        )
        for i in range(count)
    ]


def deep_event(
    core: BrokerCore, rng: random.Random, serial: int, now: float, pending: list
) -> list:
    """A random event that keeps the queue about twice as deep as the devices: cells of idle
    kernels ask, running cells end, reports come back, cells are cancelled, kernels come and go,
    are pinned or stop answering (no quota changes, which would deny the queue away)."""
    kernels = sorted(core.kernels.values(), key=lambda k: k.kernel_id)
    kernel = rng.choice(kernels)
    roll = rng.random()
    try:
        if roll < 0.4 and len(core.queue()) < 2 * len(core.devices):
            idle = [k for k in kernels if k.lease is None and k.request is None]
            if idle:
                memory = rng.choice((None, None, None, 2 * GiB))
                return core.acquire(rng.choice(idle).kernel_id, f"r{serial}", now, memory)
        if roll < 0.62:
            running = [k for k in kernels if k.lease is not None and k.lease.hold]
            if running:
                kernel = rng.choice(running)
                peak = rng.randrange(1, 7) * GiB
                rid = kernel.lease.request_id
                return core.release(kernel.kernel_id, rid, now, peak, peak // 2)
        if roll < 0.8 and pending and (reported := report(core, pending, now)) is not None:
            return reported
        if roll < 0.85 and kernel.request is not None:
            return core.cancel(kernel.kernel_id, kernel.request.request_id, now)
        if roll < 0.88:
            core.unregister(kernel.kernel_id, now)
            return core.register(f"k{serial}", kernel.user, now)
        if roll < 0.94:
            return toggle(core, rng, kernel, (roll - 0.88) / 0.06, now)
        return core.tick(now)
    except BrokerError as error:
        return [str(error)]


@pytest.mark.parametrize("seed", range(4))
def test_claims_carried_over_in_a_large_pool_decide_as_a_pass_from_nothing(seed: int) -> None:
    """A queue deeper than a pool of 32 devices: most requests wait for a device they claim, and
    each pass carries over the claims that stand instead of placing them again. Random events
    (the same as above) on a core that keeps claims, orders of devices and memos between passes
    must return what a core starting every event from nothing returns."""
    quotas = Quotas.parse({"default": {"max_resident_kernels": 6}, "user:u3": {"priority": 2}})
    kept, fresh = (BrokerCore(chips(32), quotas, Policy(), now=0.0) for _ in range(2))
    for core in (kept, fresh):
        for serial in range(120):
            core.register(f"k{serial:03d}", f"u{serial % 12}", 0.0)
            core.acquire(f"k{serial:03d}", f"r{serial}", 0.0)
    _, carried = replay(kept, fresh, seed, range(120, 520), deep_event)
    assert carried > 1000  # (passes did carry claims over)
