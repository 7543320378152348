"""Tests for the broker's pure decision core and its quota configuration.

The first half walks through what a user or an admin sees, one concrete scenario at a time. The second
half is a hypothesis state machine that drives the core through random interleavings of everything the
outside world can report (cells, interrupts, offloads that finish or fail, restores, kernel deaths,
midnight, quota edits) and checks the pool's promises after every step against its own bookkeeping.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from jupyter_singularity.broker.core import BrokerCore
from jupyter_singularity.broker.model import (
    DAY,
    SPILLABLE_STATES,
    BrokerError,
    Deny,
    Forget,
    Grant,
    Kernel,
    KernelState,
    LeaseEnded,
    Offload,
    Policy,
    Spill,
    StateChanged,
    Wait,
)
from jupyter_singularity.broker.quotas import Limits, QuotaError, Quotas
from jupyter_singularity.devices import DeviceInfo, open_inventory

MiB = 1 << 20
GiB = 1 << 30
T0 = 20_000 * DAY  # a UTC midnight (2024-10-04 00:00:00 UTC)
S = KernelState


def dev(index: int, gib: float, chip: str = "A100") -> DeviceInfo:
    return DeviceInfo(index, f"GPU-{index:04d}", f"NVIDIA {chip}", chip, int(gib * GiB))


def sim(spec: str = "2x16GiB") -> list[DeviceInfo]:
    return open_inventory(f"simulated:{spec}").devices()


def of(actions: list, cls: type) -> list:
    return [a for a in actions if isinstance(a, cls)]


def one(actions: list, cls: type):
    found = of(actions, cls)
    assert len(found) == 1, f"expected one {cls.__name__} in {actions}"
    return found[0]


def ids(actions: list, cls: type) -> list[str]:
    return [a.kernel_id for a in of(actions, cls)]


def predicted(peak: int) -> int:
    policy = Policy()
    return int(peak * (1 + policy.margin_fraction)) + policy.margin_bytes


def make(
    devices: list[DeviceInfo] | None = None,
    quotas: dict | None = None,
    policy: Policy | None = None,
    kernels: dict[str, str] | None = None,
    **kwargs,
) -> BrokerCore:
    """A core with ``kernels`` ({kernel_id: user}) registered at T0."""
    core = BrokerCore(
        sim("1x16GiB") if devices is None else devices,
        Quotas.parse(quotas),
        policy,
        now=T0,
        **kwargs,
    )
    for kid, user in (kernels or {}).items():
        core.register(kid, user, T0)
    return core


def run_cell(
    core: BrokerCore,
    kid: str,
    rid: str,
    start: float,
    end: float,
    peak: int | None,
    gpu: int | None = None,
    memory: int | str | None = "peak",
) -> tuple[Grant, list]:
    """One GPU cell that is granted at once (by default it asks for ``peak`` bytes, so that
    several kernels fit on one device); returns its Grant and the release's actions."""
    if memory == "peak":
        memory = peak
    grant = one(core.acquire(kid, rid, start, memory=memory), Grant)
    released = core.release(kid, rid, end, peak_bytes=peak, gpu_bytes=peak if gpu is None else gpu)
    return grant, released


def booked(core: BrokerCore, device: int) -> int:
    return sum(k.booking() for k in core.kernels.values() if k.device == device)


# ----------------------------------------------------------------------------- reservations


def test_first_cell_of_a_cold_kernel_reserves_the_whole_device():
    core = make(sim("2x16GiB"), kernels={"k1": "alice"})
    assert core.kernels["k1"].state == S.COLD
    actions = core.acquire("k1", "r1", T0 + 1)
    grant = one(actions, Grant)
    assert grant == Grant("k1", "r1", 0, 16 * GiB, restore=False, start=T0 + 1, hold=True)
    assert one(actions, StateChanged).new == S.RUNNING
    kernel = core.kernels["k1"]
    assert (kernel.state, kernel.device, kernel.booking()) == (S.RUNNING, 0, 16 * GiB)
    assert core.device_bookings() == {0: 16 * GiB, 1: 0}


def test_first_cell_reserves_no_more_than_the_users_memory_quota():
    core = make(sim("1x16GiB"), quotas={"user:alice": {"gpu_memory": "6GiB"}})
    core.register("a", "alice", T0)
    core.register("b", "bob", T0)
    assert one(core.acquire("a", "r1", T0), Grant).reservation == 6 * GiB
    # bob has no quota: the rest of the device is not "the whole device", so he waits
    wait = one(core.acquire("b", "r2", T0), Wait)
    assert wait.position == 1


def test_a_first_cell_books_the_policys_first_cell_memory_where_it_sets_one():
    """New kernels then start side by side; a stated size and the kernel's state still count."""
    core = make(policy=Policy(first_cell_memory=6 * GiB), kernels={"a": "alice", "b": "bob"})
    g1 = one(core.acquire("a", "r1", T0), Grant)
    g2 = one(core.acquire("b", "r2", T0 + 1), Grant)
    assert (g1.device, g1.reservation, g2.device, g2.reservation) == (0, 6 * GiB, 0, 6 * GiB)
    core.register("c", "carol", T0)
    assert one(core.acquire("c", "r3", T0 + 2), Wait).position == 1  # 4 GiB left of 16
    core.release("a", "r1", T0 + 3, peak_bytes=2 * GiB, gpu_bytes=2 * GiB)
    assert core.kernels["c"].state == S.RUNNING  # a's 2 GiB stay beside c's 6 GiB and b's
    assert core.device_bookings() == {0: 14 * GiB}
    core.register("d", "dave", T0)
    assert one(core.acquire("d", "r4", T0 + 4, memory=1 * GiB), Grant).reservation == 1 * GiB
    # known now: its peak and a margin (which fits beside the others), not 6 GiB
    assert one(core.acquire("a", "r5", T0 + 5), Grant).reservation == predicted(2 * GiB)


def test_known_kernel_reserves_its_recent_peak_plus_a_margin():
    core = make(kernels={"k1": "alice"})
    run_cell(core, "k1", "r1", T0, T0 + 5, peak=4 * GiB, gpu=2 * GiB)
    assert core.kernels["k1"].state == S.RESIDENT
    assert core.kernels["k1"].gpu_bytes == 2 * GiB
    grant, _ = run_cell(core, "k1", "r2", T0 + 10, T0 + 11, peak=1 * GiB, memory=None)
    assert grant.reservation == predicted(4 * GiB)
    assert grant.restore is False
    # only the recent peaks count: after peak_history small cells, the 4 GiB cell is forgotten
    for i in range(Policy().peak_history):
        run_cell(core, "k1", f"s{i}", T0 + 20 + i, T0 + 20.5 + i, peak=1 * GiB, memory=None)
    grant = one(core.acquire("k1", "r3", T0 + 30), Grant)
    assert grant.reservation == predicted(1 * GiB)


def test_predicted_reservation_is_capped_by_the_device_and_the_quota():
    core = make(quotas={"user:alice": {"gpu_memory": "10GiB"}}, kernels={"k1": "alice"})
    run_cell(core, "k1", "r1", T0, T0 + 1, peak=9 * GiB + 512 * MiB, gpu=0)
    grant = one(core.acquire("k1", "r2", T0 + 2), Grant)
    assert grant.reservation == 10 * GiB  # 9.5 GiB * 1.1 + margin would exceed the quota


def test_an_explicit_memory_hint_overrides_the_prediction():
    core = make(kernels={"k1": "alice"})
    assert one(core.acquire("k1", "r1", T0, memory=3 * GiB), Grant).reservation == 3 * GiB
    core.release("k1", "r1", T0 + 1, peak_bytes=3 * GiB, gpu_bytes=1 * GiB)
    assert one(core.acquire("k1", "r2", T0 + 2, memory=8 * GiB), Grant).reservation == 8 * GiB


def test_a_hint_larger_than_any_gpu_or_the_quota_is_denied_readably():
    core = make(quotas={"user:alice": {"gpu_memory": "4GiB"}}, kernels={"a": "alice", "b": "bob"})
    deny = one(core.acquire("a", "r1", T0, memory=5 * GiB), Deny)
    assert "GPU memory quota" in deny.reason and "4.0 GiB" in deny.reason
    deny = one(core.acquire("b", "r2", T0, memory=20 * GiB), Deny)
    assert "largest GPU" in deny.reason and "16.0 GiB" in deny.reason
    assert core.kernels["b"].state == S.COLD
    assert core.queue() == []


def test_a_second_acquire_while_holding_a_lease_is_denied():
    core = make(kernels={"k1": "alice"})
    core.acquire("k1", "r1", T0)
    deny = one(core.acquire("k1", "r2", T0 + 1), Deny)
    assert deny.request_id == "r2" and "already holds" in deny.reason
    assert core.kernels["k1"].lease.request_id == "r1"


# --------------------------------------------------------------------------- sharing, eviction


def test_two_kernels_whose_reservations_fit_share_one_device_at_once():
    core = make(kernels={"k1": "alice", "k2": "bob"})
    g1 = one(core.acquire("k1", "r1", T0, memory=6 * GiB), Grant)
    g2 = one(core.acquire("k2", "r2", T0 + 1, memory=8 * GiB), Grant)
    assert (g1.device, g2.device) == (0, 0)
    assert core.kernels["k1"].state == core.kernels["k2"].state == S.RUNNING
    assert core.device_bookings() == {0: 14 * GiB}


def test_a_kernel_that_does_not_fit_evicts_the_lru_idle_kernel_and_waits():
    core = make(kernels={"old": "alice", "new": "bob", "k3": "carol"})
    run_cell(core, "old", "r1", T0 + 10, T0 + 11, peak=6 * GiB)
    run_cell(core, "new", "r2", T0 + 20, T0 + 21, peak=6 * GiB)
    assert core.device_bookings() == {0: 12 * GiB}

    actions = core.acquire("k3", "r3", T0 + 30, memory=8 * GiB)
    offload = one(actions, Offload)
    assert (offload.kernel_id, offload.device) == ("old", 0)
    assert "making room" in offload.reason
    wait = one(actions, Wait)
    assert (wait.kernel_id, wait.request_id, wait.position) == ("k3", "r3", 1)
    assert "offloaded" in wait.reason
    assert not of(actions, Grant)
    assert core.kernels["old"].state == S.OFFLOADING
    assert core.kernels["new"].state == S.RESIDENT
    assert core.kernels["k3"].state == S.QUEUED
    assert core.snapshot(T0 + 30)["queue"][0]["position"] == 1

    actions = core.offloaded("old", T0 + 31, host_bytes=6 * GiB)
    grant = one(actions, Grant)
    assert (grant.kernel_id, grant.device, grant.reservation, grant.restore) == (
        "k3",
        0,
        8 * GiB,
        False,
    )
    old = core.kernels["old"]
    assert (old.state, old.device, old.host_bytes, old.gpu_bytes) == (S.OFFLOADED, None, 6 * GiB, 0)
    core.release("k3", "r3", T0 + 40, peak_bytes=7 * GiB, gpu_bytes=7 * GiB)

    # the offloaded kernel's next cell needs its state back: it evicts the LRU idle kernel ("new")
    actions = core.acquire("old", "r4", T0 + 50)
    assert ids(actions, Offload) == ["new"]
    assert one(actions, Wait).position == 1
    assert core.kernels["old"].state == S.QUEUED
    actions = core.offloaded("new", T0 + 51, host_bytes=6 * GiB)
    grant = one(actions, Grant)
    assert (grant.kernel_id, grant.restore, grant.reservation) == ("old", True, predicted(6 * GiB))
    assert core.kernels["old"].state == S.RESTORING
    assert core.kernels["old"].host_bytes == 6 * GiB  # freed only once the restore is complete
    actions = core.restored("old", T0 + 52, gpu_bytes=6 * GiB)
    assert one(actions, StateChanged).new == S.RUNNING
    old = core.kernels["old"]
    assert (old.host_bytes, old.gpu_bytes, old.state) == (0, 6 * GiB, S.RUNNING)
    ended = one(core.release("old", "r4", T0 + 60, peak_bytes=6 * GiB), LeaseEnded)
    assert ended.seconds == pytest.approx(9.0)  # charged from the grant, restore included


def test_eviction_prefers_lower_priority_before_recency():
    core = make(
        quotas={"user:vip": {"priority": 4}}, kernels={"v": "vip", "p": "pleb", "k": "carol"}
    )
    run_cell(core, "v", "r1", T0 + 1, T0 + 2, peak=6 * GiB)  # least recently used, but vip
    run_cell(core, "p", "r2", T0 + 3, T0 + 4, peak=6 * GiB)
    assert ids(core.acquire("k", "r3", T0 + 5, memory=8 * GiB), Offload) == ["p"]


def test_a_first_cell_reserves_what_can_be_freed_beside_pinned_kernels():
    """ "The whole device" for a kernel's first cell means all that eviction can free there."""
    core = make(kernels={"pinned": "alice", "k2": "bob"})
    run_cell(core, "pinned", "r1", T0, T0 + 1, peak=10 * GiB)
    core.set_pinned("pinned", True, T0 + 2)
    grant = one(core.acquire("k2", "r2", T0 + 3), Grant)
    assert (grant.device, grant.reservation) == (0, 6 * GiB)


def test_pinned_kernels_are_never_chosen_as_victims():
    core = make(kernels={"pinned": "alice", "other": "bob", "k3": "carol"})
    run_cell(core, "pinned", "r1", T0 + 1, T0 + 2, peak=6 * GiB)  # the LRU one
    run_cell(core, "other", "r2", T0 + 3, T0 + 4, peak=6 * GiB)
    assert core.set_pinned("pinned", True, T0 + 5) == []
    actions = core.acquire("k3", "r3", T0 + 6, memory=8 * GiB)
    assert ids(actions, Offload) == ["other"]
    assert core.kernels["pinned"].state == S.RESIDENT
    # not by the idle timeout either
    core.policy = Policy(idle_timeout=10)
    assert "pinned" not in ids(core.tick(T0 + 1000), Offload)


def test_a_request_that_can_never_fit_because_of_pinned_kernels_is_denied():
    core = make(kernels={"pinned": "alice", "k2": "bob"})
    run_cell(core, "pinned", "r1", T0, T0 + 1, peak=10 * GiB)
    core.set_pinned("pinned", True, T0 + 2)
    deny = one(core.acquire("k2", "r2", T0 + 3, memory=8 * GiB), Deny)
    assert deny.kernel_id == "k2" and deny.request_id == "r2"
    assert "pinned" in deny.reason and "--memory" in deny.reason
    assert core.kernels["k2"].state == S.COLD and core.queue() == []
    assert one(core.acquire("k2", "r4", T0 + 5, memory=6 * GiB), Grant).device == 0
    # once unpinned the pinned kernel is an ordinary victim again
    core.release("k2", "r4", T0 + 6, peak_bytes=0, gpu_bytes=0)
    core.set_pinned("pinned", False, T0 + 7)
    assert ids(core.acquire("k2", "r5", T0 + 8, memory=8 * GiB), Offload) == ["pinned"]


def test_running_cells_are_not_interrupted_the_waiter_gets_the_device_when_they_end():
    core = make(kernels={"k1": "alice", "k2": "bob"})
    core.acquire("k1", "r1", T0)
    wait = one(core.acquire("k2", "r2", T0 + 1), Wait)
    assert "busy with running cells" in wait.reason
    actions = core.release("k1", "r1", T0 + 10, peak_bytes=2 * GiB, gpu_bytes=2 * GiB)
    assert ids(actions, Offload) == ["k1"]  # k2's first cell wants the whole device
    assert one(core.offloaded("k1", T0 + 11, host_bytes=2 * GiB), Grant).kernel_id == "k2"


def test_a_waiting_request_keeps_its_gpu_when_one_ahead_leaves_but_not_a_free_one():
    users = {"a0": "ann", "a1": "ben", "a2": "cat", "q1": "dan", "q2": "eve", "q3": "fay"}
    core = make(sim("3x16GiB"), kernels=users)
    for device, kid in enumerate(("a0", "a1", "a2")):
        assert one(core.acquire(kid, f"r{kid}", T0), Grant).device == device
    for at, kid in enumerate(("q1", "q2", "q3"), 1):
        assert one(core.acquire(kid, f"r{kid}", T0 + at), Wait).reason.startswith(f"GPU {at - 1} ")
    # Equally busy GPUs: the requests behind the one that left keep theirs, and are not told.
    actions = core.cancel("q1", "rq1", T0 + 5)
    assert not of(actions, Wait)
    assert [r.claimed for r in core.queue()] == [1, 2]
    # A GPU that can make room now is better than the claimed one, though.
    actions = core.release("a0", "ra0", T0 + 6, peak_bytes=GiB, gpu_bytes=GiB)
    assert ids(actions, Offload) == ["a0"]
    assert core.kernels["q2"].request.claimed == 0
    assert one(core.offloaded("a0", T0 + 7, host_bytes=GiB), Grant).kernel_id == "q2"


def test_cancel_leaves_the_queue_and_nothing_is_granted_to_it_afterwards():
    core = make(kernels={"k1": "alice", "k2": "bob"})
    core.acquire("k1", "r1", T0)
    assert of(core.acquire("k2", "r2", T0 + 1), Wait)
    assert core.kernels["k2"].state == S.QUEUED
    assert core.cancel("k2", "wrong-id", T0 + 2) == []
    assert core.cancel("nobody", "r2", T0 + 2) == []
    actions = core.cancel("k2", "r2", T0 + 2)
    assert one(actions, StateChanged).new == S.COLD
    assert core.queue() == [] and core.kernels["k2"].request is None
    later = core.release("k1", "r1", T0 + 3, peak_bytes=GiB, gpu_bytes=GiB)
    later += core.tick(T0 + 4)
    assert not [a for a in later if isinstance(a, Grant | Wait) and a.kernel_id == "k2"]
    assert core.kernels["k1"].state == S.RESIDENT  # and nobody was evicted for it


def test_release_ends_the_lease_and_reports_the_gpu_seconds():
    core = make(kernels={"k1": "alice"})
    core.acquire("k1", "r1", T0 + 100)
    assert core.release("k1", "other", T0 + 110) == []  # a stale release is ignored
    actions = core.release("k1", "r1", T0 + 142.5, peak_bytes=3 * GiB, gpu_bytes=2 * GiB)
    assert one(actions, LeaseEnded) == LeaseEnded("k1", "r1", "alice", 0, T0 + 142.5, 42.5, 3 * GiB)
    kernel = core.kernels["k1"]
    assert (kernel.state, kernel.lease, kernel.gpu_bytes, kernel.booking()) == (
        S.RESIDENT,
        None,
        2 * GiB,
        2 * GiB,
    )
    assert core.usage_today == {"alice": 42.5}
    assert core.used_seconds("alice", T0 + 200) == 42.5


def test_a_notebook_renamed_or_moved_with_its_folder_keeps_its_kernels():
    core = make()
    for kid, notebook in (
        ("a", "/home/alice/nb/a.ipynb"),
        ("b", "/home/alice/nb/sub/b.ipynb"),
        ("c", "/home/alice/nbx/c.ipynb"),  # a folder whose name only starts like "nb"
        ("d", ""),  # a kernel without a notebook
    ):
        core.register(kid, "alice", T0, notebook=notebook)

    def notebooks() -> dict[str, str]:
        return {k: v.notebook for k, v in core.kernels.items()}

    assert core.notebook_moved("/home/alice/nb/a.ipynb", "/home/alice/nb/z.ipynb") == ["a"]
    assert core.notebook_moved("/home/alice/nb/", "/home/alice/work") == ["a", "b"]
    assert notebooks() == {
        "a": "/home/alice/work/z.ipynb",
        "b": "/home/alice/work/sub/b.ipynb",
        "c": "/home/alice/nbx/c.ipynb",
        "d": "",
    }
    assert core.notebook_moved("/home/alice/elsewhere.ipynb", "/home/alice/x.ipynb") == []
    assert core.notebook_moved("", "/home/alice/x.ipynb") == []
    assert notebooks()["d"] == ""
    assert core.snapshot(T0)["kernels"][0]["notebook"] == "/home/alice/work/z.ipynb"


# -------------------------------------------------------------------------------------- quotas


def test_gpu_time_quota_denies_readably_and_resets_at_utc_midnight():
    core = make(
        quotas={"default": {"gpu_seconds_per_day": 100}}, kernels={"k1": "alice", "k2": "bob"}
    )
    start = T0 + 10 * 3600
    run_cell(core, "k1", "r1", start, start + 100, peak=GiB)
    deny = one(core.acquire("k1", "r2", start + 200), Deny)
    assert "GPU-time quota" in deny.reason and "alice" in deny.reason
    assert "0.03 of 0.03 GPU-hours" in deny.reason and "00:00 UTC" in deny.reason
    assert core.kernels["k1"].state == S.RESIDENT and core.queue() == []
    assert of(core.acquire("k2", "r3", start + 200, memory=GiB), Grant)  # bob is not affected

    assert of(core.tick(T0 + DAY - 1), Deny) == []
    assert core.usage_today["alice"] == 100
    core.tick(T0 + DAY + 1)
    assert core.usage_today == {}
    assert of(core.acquire("k1", "r4", T0 + DAY + 2), Grant)


def test_gpu_time_of_running_cells_counts_against_the_quota():
    core = make(
        quotas={"user:alice": {"gpu_hours_per_day": 0.5}}, kernels={"a1": "alice", "a2": "alice"}
    )
    core.acquire("a1", "r1", T0, memory=GiB)
    assert of(core.acquire("a2", "r2", T0 + 1799, memory=GiB), Grant)
    core.register("a3", "alice", T0 + 1800)
    deny = one(core.acquire("a3", "r3", T0 + 1800, memory=GiB), Deny)
    assert deny.request_id == "r3" and "GPU-time quota" in deny.reason


def test_a_cell_across_midnight_charges_each_day_its_own_seconds():
    """alice's limit is 600 GPU-seconds a day. A cell from 23:55 to 00:06:40 counts 300 s for the
    day it started and 400 s for the next, even when no tick came between midnight and its end."""
    core = make(quotas={"user:alice": {"gpu_seconds_per_day": 600}}, kernels={"k1": "alice"})
    midnight = T0 + DAY
    run_cell(core, "k1", "r1", midnight - 1000, midnight - 700, peak=GiB)
    assert of(core.acquire("k1", "r2", midnight - 300, memory=GiB), Grant)
    assert core.used_seconds("alice", midnight - 1) == 599  # 300 ended + 299 running
    assert core.used_seconds("alice", midnight + 100) == 100  # the new day: since midnight only

    ended = one(core.release("k1", "r2", midnight + 400, peak_bytes=GiB), LeaseEnded)
    assert ended.seconds == 700  # the whole lease, as the ledger records it
    assert core.usage_today == {"alice": 400.0}
    assert core.used_seconds("alice", midnight + 500) == 400
    # Charged wholly to the new day (700 s) it would be over the limit; it is not.
    assert of(core.acquire("k1", "r3", midnight + 500, memory=GiB), Grant)


def test_a_running_cell_counts_only_its_seconds_since_midnight():
    core = make(
        quotas={"user:alice": {"gpu_hours_per_day": 1}}, kernels={"a1": "alice", "a2": "alice"}
    )
    midnight = T0 + DAY
    core.acquire("a1", "r1", midnight - 3000, memory=GiB)
    core.tick(midnight + 700)
    assert core.usage_today == {}
    assert core.used_seconds("alice", midnight + 700) == 700
    # 3700 s since the cell started, but only 700 of them today: a2 may run.
    assert of(core.acquire("a2", "r2", midnight + 700, memory=GiB), Grant)
    core.release("a1", "r1", midnight + 800, peak_bytes=GiB)
    assert core.usage_today == {"alice": 800.0}
    assert core.used_seconds("alice", midnight + 900) == 800 + 200  # a2 has run 200 s


def test_gpu_memory_quota_offloads_the_users_own_idle_kernel():
    core = make(sim("2x16GiB"), quotas={"user:alice": {"gpu_memory": "10GiB"}})
    core.register("a1", "alice", T0)
    core.register("a2", "alice", T0)
    run_cell(core, "a1", "r1", T0 + 1, T0 + 2, peak=6 * GiB)
    actions = core.acquire("a2", "r2", T0 + 3)  # wants min(16 GiB, quota) = 10 GiB
    assert ids(actions, Offload) == ["a1"]
    assert one(actions, Wait).kernel_id == "a2"
    grant = one(core.offloaded("a1", T0 + 4, host_bytes=6 * GiB), Grant)
    assert (grant.kernel_id, grant.reservation) == ("a2", 10 * GiB)


def test_gpu_memory_quota_waits_for_the_users_running_cells_then_offloads():
    core = make(sim("2x16GiB"), quotas={"user:alice": {"gpu_memory": "10GiB"}})
    core.register("a1", "alice", T0)
    core.register("a2", "alice", T0)
    core.acquire("a1", "r1", T0, memory=6 * GiB)
    wait = one(core.acquire("a2", "r2", T0 + 1, memory=6 * GiB), Wait)
    assert "GPU memory quota" in wait.reason and "waiting for their cells" in wait.reason
    actions = core.release("a1", "r1", T0 + 5, peak_bytes=5 * GiB, gpu_bytes=5 * GiB)
    assert ids(actions, Offload) == ["a1"]
    assert of(core.offloaded("a1", T0 + 6, host_bytes=5 * GiB), Grant)


def test_gpu_memory_quota_denies_when_only_pinned_kernels_could_make_room():
    core = make(sim("2x16GiB"), quotas={"user:alice": {"gpu_memory": "10GiB"}})
    core.register("a1", "alice", T0)
    core.register("a2", "alice", T0)
    run_cell(core, "a1", "r1", T0, T0 + 1, peak=6 * GiB)
    core.set_pinned("a1", True, T0 + 2)
    deny = one(core.acquire("a2", "r2", T0 + 3, memory=6 * GiB), Deny)
    assert "GPU memory quota" in deny.reason and "unpin" in deny.reason
    assert of(core.acquire("a2", "r3", T0 + 4, memory=4 * GiB), Grant)


def test_resident_kernel_quota_offloads_own_idle_kernels_or_denies():
    core = make(
        sim("2x16GiB"),
        quotas={"default": {"max_resident_kernels": 1}},
        kernels={"a1": "alice", "a2": "alice", "a3": "alice", "b": "bob"},
    )
    run_cell(core, "a1", "r1", T0, T0 + 1, peak=GiB)
    run_cell(core, "b", "rb", T0, T0 + 1, peak=GiB)  # another user's kernel does not count
    actions = core.acquire("a2", "r2", T0 + 2, memory=GiB)
    assert ids(actions, Offload) == ["a1"]
    assert "making room" in one(actions, Offload).reason
    assert of(core.offloaded("a1", T0 + 3, host_bytes=GiB), Grant)
    # a2 is running: a3 waits for its cell
    wait = one(core.acquire("a3", "r3", T0 + 4, memory=GiB), Wait)
    assert "resident-kernel quota" in wait.reason
    core.cancel("a3", "r3", T0 + 5)
    core.release("a2", "r2", T0 + 6, peak_bytes=GiB, gpu_bytes=GiB)
    core.set_pinned("a2", True, T0 + 7)
    deny = one(core.acquire("a3", "r4", T0 + 8, memory=GiB), Deny)
    assert "resident-kernel quota: 1 of 1" in deny.reason


def test_a_kernel_waiting_with_its_state_on_a_gpu_counts_against_the_resident_quota():
    """A kernel whose request waits while its state stays on the GPU (an offload that could
    free nothing) is resident whatever comes of that request: another kernel of the user is not
    granted beside it (found by the state machine, where that request was then denied and left
    the kernel resident beside the one granted meanwhile)."""
    core = make(
        sim("1x16GiB"),
        quotas={"user:alice": {"max_resident_kernels": 1}},
        kernels={"a1": "alice", "a2": "alice"},
    )
    run_cell(core, "a1", "r1", T0, T0 + 1, peak=GiB)
    assert ids(core.offload("a1", T0 + 2), Offload) == ["a1"]
    assert of(core.acquire("a2", "r2", T0 + 3, memory=GiB), Wait)  # a1 is leaving
    assert of(core.acquire("a1", "r3", T0 + 4, memory=6 * GiB), Wait)  # for its offload
    # Its offload freed nothing: a1 waits with its state on the GPU; a2's request comes first.
    actions = core.offloaded("a1", T0 + 5, host_bytes=0, gpu_bytes=GiB // 8)
    assert [grant.kernel_id for grant in of(actions, Grant)] == ["a1"]
    assert "resident-kernel quota" in one(actions, Deny).reason
    assert core.kernels["a2"].state == S.COLD


def test_quota_changes_apply_to_waiting_requests():
    core = make(kernels={"a1": "alice", "a2": "alice"})
    core.acquire("a1", "r1", T0, memory=GiB)
    assert of(core.acquire("a2", "r2", T0 + 1), Wait)  # wants the whole device
    actions = core.set_quotas(Quotas.parse({"user:alice": {"gpu_memory": "8GiB"}}), T0 + 2)
    assert core.limits("alice").gpu_memory == 8 * GiB
    wait = one(actions, Wait)  # now it needs 8 GiB, and a1's running cell holds 1 GiB of them
    assert "GPU memory quota" in wait.reason and "waiting for their cells" in wait.reason
    assert ids(core.release("a1", "r1", T0 + 3, peak_bytes=GiB, gpu_bytes=GiB), Offload) == ["a1"]
    assert one(core.offloaded("a1", T0 + 4, host_bytes=GiB), Grant).reservation == 8 * GiB


# --------------------------------------------------------------------------- idle, death, refusal


def test_idle_timeout_offloads_an_idle_kernel_on_tick():
    core = make(policy=Policy(idle_timeout=60), kernels={"k1": "alice", "k2": "bob"})
    run_cell(core, "k1", "r1", T0, T0 + 100, peak=GiB)
    core.acquire("k2", "r2", T0 + 100, memory=GiB)  # running kernels are never idle
    assert of(core.tick(T0 + 159), Offload) == []
    offload = one(core.tick(T0 + 160), Offload)
    assert offload.kernel_id == "k1" and offload.reason == "idle for 60 s"
    assert core.kernels["k1"].state == S.OFFLOADING
    assert of(core.tick(T0 + 1000), Offload) == []  # asked once
    core.offloaded("k1", T0 + 1001, host_bytes=GiB)
    assert core.kernels["k1"].state == S.OFFLOADED


def test_without_idle_timeout_idle_kernels_stay_resident():
    core = make(kernels={"k1": "alice"})
    run_cell(core, "k1", "r1", T0, T0 + 1, peak=GiB)
    assert of(core.tick(T0 + 10 * DAY), Offload) == []
    assert core.kernels["k1"].state == S.RESIDENT


def test_unregister_a_kernel_holding_a_lease_lets_the_next_waiter_in():
    core = make(kernels={"k1": "alice", "k2": "bob"})
    core.acquire("k1", "r1", T0)
    core.acquire("k2", "r2", T0 + 1)
    actions = core.unregister("k1", T0 + 30)
    ended = one(actions, LeaseEnded)
    assert (ended.kernel_id, ended.seconds, ended.peak_bytes) == ("k1", 30, None)
    gone = [a for a in actions if isinstance(a, StateChanged) and a.kernel_id == "k1"]
    assert gone[0].new is None and gone[0].old == S.RUNNING
    assert Forget("k1") in actions
    grant = one(actions, Grant)
    assert (grant.kernel_id, grant.reservation) == ("k2", 16 * GiB)
    assert "k1" not in core.kernels
    assert core.usage_today["alice"] == 30
    assert core.unregister("k1", T0 + 31) == []  # twice is harmless


def test_unregister_a_queued_kernel_denies_its_request_and_leaves_the_queue():
    core = make(kernels={"k1": "alice", "k2": "bob"})
    core.acquire("k1", "r1", T0)
    core.acquire("k2", "r2", T0 + 1)
    actions = core.unregister("k2", T0 + 2)
    assert one(actions, Deny) == Deny("k2", "r2", "kernel is gone")
    assert Forget("k2") in actions
    assert core.queue() == []
    later = core.release("k1", "r1", T0 + 3, peak_bytes=GiB)
    assert "k2" not in {a.kernel_id for a in later if hasattr(a, "kernel_id")}


def test_unregister_a_resident_kernel_frees_its_memory_for_the_waiter():
    core = make(kernels={"stuck": "alice", "run": "bob", "k3": "carol"})
    run_cell(core, "stuck", "r1", T0, T0 + 1, peak=6 * GiB)
    core.acquire("run", "r2", T0 + 2, memory=6 * GiB)
    assert ids(core.acquire("k3", "r3", T0 + 3, memory=8 * GiB), Offload) == ["stuck"]
    core.offload_failed("stuck", "a CUDA graph is capturing", T0 + 4)
    assert core.kernels["k3"].request is not None
    actions = core.unregister("stuck", T0 + 5)
    assert one(actions, Grant).kernel_id == "k3"
    assert booked(core, 0) == 14 * GiB


def test_unregister_a_kernel_being_offloaded_lets_the_waiter_in():
    core = make(kernels={"k1": "alice", "k2": "bob"})
    run_cell(core, "k1", "r1", T0, T0 + 1, peak=6 * GiB)
    assert ids(core.acquire("k2", "r2", T0 + 2), Offload) == ["k1"]
    actions = core.unregister("k1", T0 + 3)
    assert one(actions, Grant).kernel_id == "k2"
    assert core.offloaded("k2", T0 + 4, host_bytes=0) == []  # late reports for others are ignored
    with pytest.raises(BrokerError, match="unknown kernel"):
        core.offloaded("k1", T0 + 4, host_bytes=6 * GiB)


def test_a_refused_offload_keeps_the_kernel_resident_and_off_the_victim_list_until_its_next_cell():
    core = make(kernels={"k1": "alice", "k2": "bob", "k3": "carol", "k4": "dave"})
    run_cell(core, "k1", "r1", T0 + 1, T0 + 2, peak=6 * GiB)
    run_cell(core, "k2", "r2", T0 + 3, T0 + 4, peak=6 * GiB)
    assert ids(core.acquire("k3", "r3", T0 + 5, memory=8 * GiB), Offload) == ["k1"]
    actions = core.offload_failed("k1", "cell is running", T0 + 6)
    assert ids(actions, Offload) == ["k2"]  # the next victim instead
    k1 = core.kernels["k1"]
    assert (k1.state, k1.gpu_bytes, k1.host_bytes) == (S.RESIDENT, 6 * GiB, 0)
    assert k1.to_dict()["offload_refused"] == "cell is running"
    assert one(core.offloaded("k2", T0 + 7, host_bytes=6 * GiB), Grant).kernel_id == "k3"
    core.release("k3", "r3", T0 + 8, peak_bytes=GiB, gpu_bytes=GiB)
    # k1 is the LRU kernel but refused: k3 is evicted instead
    assert ids(core.acquire("k4", "r4", T0 + 9, memory=10 * GiB), Offload) == ["k3"]
    core.offloaded("k3", T0 + 10, host_bytes=GiB)
    core.release("k4", "r4", T0 + 11, peak_bytes=0, gpu_bytes=0)
    # after k1's next cell ends it may be evicted again
    run_cell(core, "k1", "r5", T0 + 12, T0 + 13, peak=6 * GiB)
    assert core.kernels["k1"].refused == ""
    assert "k1" in ids(core.acquire("k2", "r6", T0 + 14, memory=12 * GiB), Offload)


def test_offload_asked_while_a_cell_runs_happens_when_it_ends():
    core = make(kernels={"k1": "alice"})
    core.acquire("k1", "r1", T0)
    assert core.offload("k1", T0 + 1, reason="user asked") == []
    assert core.kernels["k1"].state == S.RUNNING  # the running cell is not interrupted
    actions = core.release("k1", "r1", T0 + 2, peak_bytes=2 * GiB, gpu_bytes=2 * GiB)
    assert one(actions, Offload) == Offload("k1", 0, "user asked")
    core.offloaded("k1", T0 + 3, host_bytes=2 * GiB)
    # Asked once: the next cell's end does not offload again.
    core.acquire("k1", "r2", T0 + 4)
    assert not of(core.release("k1", "r2", T0 + 5, peak_bytes=2 * GiB, gpu_bytes=2 * GiB), Offload)


def test_offload_and_restore_on_request():
    core = make(kernels={"k1": "alice"})
    with pytest.raises(BrokerError, match="cold"):
        core.offload("k1", T0)
    with pytest.raises(BrokerError, match="nothing to restore"):
        core.restore("k1", T0)
    core.acquire("k1", "r1", T0)
    core.release("k1", "r1", T0 + 2, peak_bytes=2 * GiB, gpu_bytes=2 * GiB)
    core.set_pinned("k1", True, T0 + 2)
    offload = one(core.offload("k1", T0 + 3, reason="user asked"), Offload)  # even when pinned
    assert offload == Offload("k1", 0, "user asked")
    assert core.offload("k1", T0 + 3) == []  # already on its way
    core.offloaded("k1", T0 + 4, host_bytes=GiB, disk_bytes=GiB)
    assert core.kernels["k1"].state == S.OFFLOADED
    core.spilled("k1", T0 + 5, host_bytes=0, disk_bytes=2 * GiB)
    assert core.kernels["k1"].state == S.SPILLED
    grant = one(core.restore("k1", T0 + 6), Grant)
    assert (grant.restore, grant.hold) == (True, False)
    assert core.kernels["k1"].state == S.RESTORING
    assert core.used_seconds("alice", T0 + 100) == 2  # a restore is not GPU time
    actions = core.restored("k1", T0 + 7, gpu_bytes=2 * GiB)
    assert not of(actions, LeaseEnded)
    kernel = core.kernels["k1"]
    assert (kernel.state, kernel.lease, kernel.disk_bytes) == (S.RESIDENT, None, 0)


def test_a_cell_started_during_an_explicit_restore_runs_after_it():
    core = make([dev(0, 16)], kernels={"k1": "alice", "k2": "bob"})
    run_cell(core, "k1", "r1", T0, T0 + 1, peak=4 * GiB)
    core.offload("k1", T0 + 2)
    core.offloaded("k1", T0 + 3, host_bytes=4 * GiB)
    core.acquire("k2", "r2", T0 + 4, memory=14 * GiB)  # the device is busy: the restore waits

    # Queued: the cell takes the restore's place and restores itself when granted.
    assert not of(core.restore("k1", T0 + 5), Grant)
    wait = one(core.acquire("k1", "r3", T0 + 6), Wait)
    assert wait.request_id == "r3" and wait.position == 1
    grant = one(core.release("k2", "r2", T0 + 7, peak_bytes=GiB, gpu_bytes=GiB), Grant)
    assert (grant.request_id, grant.restore, grant.hold) == ("r3", True, True)
    core.restored("k1", T0 + 8, gpu_bytes=4 * GiB)
    core.release("k1", "r3", T0 + 9, peak_bytes=4 * GiB, gpu_bytes=4 * GiB)

    # Under way: the cell waits for the restore to finish, then runs without restoring again.
    core.offload("k1", T0 + 10)
    core.offloaded("k1", T0 + 11, host_bytes=4 * GiB)
    assert one(core.restore("k1", T0 + 12), Grant).hold is False
    wait = one(core.acquire("k1", "r4", T0 + 13), Wait)
    assert (wait.request_id, wait.reason) == ("r4", "waiting for its restore to finish")
    assert core.kernels["k1"].state == S.RESTORING
    grant = one(core.restored("k1", T0 + 14, gpu_bytes=4 * GiB), Grant)
    assert (grant.request_id, grant.restore, grant.hold) == ("r4", False, True)
    assert core.kernels["k1"].state == S.RUNNING
    # A second request while the cell's request waits or runs is still refused.
    assert one(core.acquire("k1", "r5", T0 + 15), Deny).reason.startswith("this kernel already")


def test_a_cold_kernel_whose_cuda_chose_a_device_waits_for_that_one():
    core = make([dev(0, 16), dev(1, 16)], kernels={"k1": "alice", "k2": "bob"})
    assert core.kernels["k2"].home == 1
    core.acquire("k1", "r1", T0, memory=12 * GiB)  # device 0 is busy, device 1 free
    wait = one(core.acquire("k2", "r2", T0 + 1, memory=8 * GiB, device=0), Wait)
    assert "busy" in wait.reason
    grant = one(core.release("k1", "r1", T0 + 2, peak_bytes=GiB, gpu_bytes=GiB), Grant)
    assert (grant.kernel_id, grant.device) == ("k2", 0)
    with pytest.raises(BrokerError, match="no device 7"):
        core.acquire("k1", "r3", T0 + 3, device=7)
    assert core.kernels["k1"].request is None


def test_pinned_pools_share_a_total():
    policy = Policy(pinned_per_kernel=8 * GiB, pinned_total=10 * GiB)
    core = make([dev(0, 16), dev(1, 16)], kernels={"k1": "alice", "k2": "bob"}, policy=policy)
    core.register("k3", "carol", T0)

    def allowance(kernel_id: str, rid: str, memory: int, now: float) -> int:
        grant, _ = run_cell(core, kernel_id, rid, now, now + 1, peak=memory)
        return grant.pool_allowance

    assert allowance("k1", "r1", 12 * GiB, T0) == 8 * GiB  # the per-kernel bound
    assert allowance("k2", "r2", 4 * GiB, T0 + 2) == 2 * GiB  # what is left of the total
    assert allowance("k3", "r3", 4 * GiB, T0 + 4) == 0  # none left: pageable offloads
    assert allowance("k1", "r4", GiB, T0 + 6) == 8 * GiB  # never shrinks: the pool is kept
    assert core.pool_allowances == 10 * GiB
    core.unregister("k1", T0 + 8)
    assert allowance("k3", "r5", 4 * GiB, T0 + 9) == 4 * GiB  # k1's share is free again
    assert core.kernels["k3"].to_dict()["pool_allowance"] == 4 * GiB


def test_the_host_budget_holds_while_a_kernel_with_nothing_left_in_memory_is_spilling():
    """A kernel on its way to disk whose host copy is gone already: its user holds no host
    memory (no entry in the per-user totals); the budget still spills the others that overflow
    it (the pass raised KeyError)."""
    core = make(policy=Policy(host_memory_limit=GiB), kernels={"k1": "alice", "k2": "bob"})
    leaving, over = core.kernels["k1"], core.kernels["k2"]
    leaving.spilling = True
    over.state = S.OFFLOADED
    core._hold_host(over, host_bytes=2 * GiB)
    core._enforce_host_budget()
    assert ids(core._actions, Spill) == ["k2"]


def test_a_failed_restore_keeps_the_host_copy():
    core = make(kernels={"k1": "alice"})
    run_cell(core, "k1", "r1", T0, T0 + 1, peak=2 * GiB)
    core.offload("k1", T0 + 2)
    core.offloaded("k1", T0 + 3, host_bytes=2 * GiB)
    assert one(core.acquire("k1", "r2", T0 + 4), Grant).restore
    actions = core.restore_failed("k1", "driver error", T0 + 5)
    assert one(actions, LeaseEnded).seconds == 1
    kernel = core.kernels["k1"]
    assert (kernel.state, kernel.host_bytes, kernel.device) == (S.ERROR, 2 * GiB, None)
    assert one(core.acquire("k1", "r3", T0 + 6), Grant).restore


def test_a_discard_of_damaged_state_leaves_error_with_what_is_left():
    core = make(kernels={"k1": "alice", "k2": "bob"})
    for kid in ("k1", "k2"):
        run_cell(core, kid, f"{kid}-r1", T0, T0 + 1, peak=2 * GiB)
        core.offload(kid, T0 + 2)
        core.offloaded(kid, T0 + 3, host_bytes=0, disk_bytes=2 * GiB)
        assert one(core.acquire(kid, f"{kid}-r2", T0 + 4), Grant).restore
        core.restore_failed(kid, "checksum mismatch in spill file", T0 + 5)
        assert core.kernels[kid].state == S.ERROR
    # A running kernel, or one not offloaded, has nothing to discard: nothing changes.
    run_cell(core, "k2", "k2-r3", T0 + 5, T0 + 5, peak=None)
    assert core.discarded("k2", T0 + 5, host_bytes=0, disk_bytes=0) == []
    assert core.kernels["k2"].state == S.RESIDENT

    actions = core.discarded("k1", T0 + 6, host_bytes=0, disk_bytes=GiB)

    change = one(actions, StateChanged)
    assert (change.old, change.new, change.reason) == (
        S.ERROR,
        S.SPILLED,
        "damaged state discarded",
    )
    assert (core.kernels["k1"].host_bytes, core.kernels["k1"].disk_bytes) == (0, GiB)
    assert one(core.acquire("k1", "k1-r3", T0 + 7), Grant).restore  # the rest comes back
    core.restored("k1", T0 + 8, gpu_bytes=GiB)
    core.release("k1", "k1-r3", T0 + 9, peak_bytes=GiB, gpu_bytes=GiB)
    core.offload("k1", T0 + 10)
    core.offloaded("k1", T0 + 11, host_bytes=GiB)
    assert one(core.acquire("k1", "k1-r4", T0 + 12), Grant).restore
    core.restore_failed("k1", "checksum mismatch in spill file", T0 + 13)

    # Nothing left: off the device with nothing to restore; the next cell just runs.
    change = one(core.discarded("k1", T0 + 14, host_bytes=0, disk_bytes=0), StateChanged)
    assert change.new == S.OFFLOADED and core.kernels["k1"].device is None
    assert not one(core.acquire("k1", "k1-r5", T0 + 15), Grant).restore


# ------------------------------------------------------------------------------------ migration


def _offloaded_kernel_and_pinned_neighbour(policy: Policy) -> BrokerCore:
    """Devices 0 and 1 share a chip, device 2 is another chip. Kernel "a" is offloaded from
    GPU 0, and a pinned kernel fills GPU 0 so that "a" cannot come back there."""
    core = make([dev(0, 16), dev(1, 16), dev(2, 16, chip="H100")], policy=policy)
    for kid in ("a", "b", "c"):
        core.register(kid, kid, T0)
    assert [core.kernels[k].home for k in "abc"] == [0, 1, 2]
    grant, _ = run_cell(core, "a", "r1", T0, T0 + 1, peak=4 * GiB)
    assert grant.device == 0
    core.offload("a", T0 + 2)
    core.offloaded("a", T0 + 3, host_bytes=4 * GiB)
    core.register("p0", "p", T0 + 4)
    assert one(core.acquire("p0", "rp0", T0 + 5, memory=14 * GiB), Grant).device == 0
    core.release("p0", "rp0", T0 + 6, peak_bytes=14 * GiB, gpu_bytes=14 * GiB)
    core.set_pinned("p0", True, T0 + 7)
    return core


def test_without_migration_an_offloaded_kernel_is_only_restored_on_its_home_device():
    core = _offloaded_kernel_and_pinned_neighbour(Policy(migration=False))
    deny = one(core.acquire("a", "r2", T0 + 10), Deny)
    assert "GPU 0" in deny.reason and "GPU 1" not in deny.reason
    # when the home device has room again it is restored there
    core.set_pinned("p0", False, T0 + 11)
    actions = core.acquire("a", "r3", T0 + 12)
    assert ids(actions, Offload) == ["p0"]
    grant = one(core.offloaded("p0", T0 + 13, host_bytes=14 * GiB), Grant)
    assert (grant.kernel_id, grant.device, grant.restore) == ("a", 0, True)


def test_with_migration_an_offloaded_kernel_moves_to_another_gpu_of_the_same_chip():
    core = _offloaded_kernel_and_pinned_neighbour(Policy(migration=True))
    grant = one(core.acquire("a", "r2", T0 + 10), Grant)
    assert (grant.device, grant.restore) == (1, True)
    assert core.kernels["a"].home == 1
    core.restored("a", T0 + 11, gpu_bytes=4 * GiB)
    core.release("a", "r2", T0 + 12, peak_bytes=4 * GiB)
    assert core.kernels["a"].device == 1


def test_migration_never_crosses_to_another_chip():
    core = _offloaded_kernel_and_pinned_neighbour(Policy(migration=True))
    core.register("p1", "p", T0 + 8)
    assert one(core.acquire("p1", "rp1", T0 + 8, memory=14 * GiB), Grant).device == 1
    core.release("p1", "rp1", T0 + 9, peak_bytes=14 * GiB, gpu_bytes=14 * GiB)
    core.set_pinned("p1", True, T0 + 9)
    actions = core.acquire("a", "r2", T0 + 10)
    assert not of(actions, Grant)  # GPU 2 is empty but of another chip
    deny = one(actions, Deny)
    assert "GPU 0" in deny.reason and "GPU 1" in deny.reason and "GPU 2" not in deny.reason
    # a cold kernel may use any chip
    assert one(core.acquire("c", "rc", T0 + 11), Grant).device == 2


def test_a_kernel_with_state_left_on_its_gpu_is_restored_there_even_with_migration():
    core = make(sim("2x16GiB"), kernels={"k1": "alice"})
    run_cell(core, "k1", "r1", T0, T0 + 1, peak=4 * GiB)
    core.offload("k1", T0 + 2)
    core.offloaded("k1", T0 + 3, host_bytes=3 * GiB + 512 * MiB, gpu_bytes=512 * MiB)
    kernel = core.kernels["k1"]
    assert (kernel.state, kernel.device, kernel.booking()) == (S.OFFLOADED, 0, 512 * MiB)
    assert one(core.acquire("k1", "r2", T0 + 4), Grant).device == 0


# ----------------------------------------------------------------------------------- fair share


def _fair_share_race(priority: float, light_arrives: float) -> list[str]:
    """heavy used 100 GPU-seconds today, light none; both wait for the same busy device."""
    core = make(
        quotas={"user:heavy": {"priority": priority}},
        usage_today={"heavy": 100.0},
        kernels={"busy": "ops", "h": "heavy", "l": "light"},
    )
    core.acquire("busy", "r0", T0)
    assert one(core.acquire("h", "rh", T0 + 1), Wait).position == 1
    assert of(core.acquire("l", "rl", T0 + light_arrives), Wait)
    granted = ids(core.unregister("busy", T0 + 20), Grant)
    assert len(granted) == 1  # both want the whole device
    return granted


def test_fair_share_serves_the_user_with_less_gpu_time_today_first():
    # heavy asked first, but 0.1 * 100 s = 10 s of fair-share delay puts light (+2 s) ahead
    assert _fair_share_race(priority=1, light_arrives=2) == ["l"]


def test_fair_share_divides_usage_by_priority():
    # with priority 10 heavy's delay is 1 s: it asked at +1, so it goes before light at +5
    assert _fair_share_race(priority=10, light_arrives=5) == ["h"]
    assert _fair_share_race(priority=1, light_arrives=5) == ["l"]


def test_fair_share_delay_is_capped_so_heavy_users_do_not_starve():
    core = make(usage_today={"heavy": 1e9}, kernels={"busy": "ops", "h": "heavy", "l": "light"})
    core.acquire("busy", "r0", T0)
    core.acquire("h", "rh", T0 + 1)
    core.acquire("l", "rl", T0 + 1 + Policy().fair_share_cap + 1)
    assert ids(core.unregister("busy", T0 + 1000), Grant) == ["h"]


# ------------------------------------------------------------------------- after a broker restart


def restarted(expected: dict[str, int], kernels: dict[str, str], now: float = T0 + 100):
    """A node broker started again: it expects ``expected`` (from the ledger) to rejoin within 30 s,
    and their servers registered ``kernels`` ({id: user}) again."""
    core = make(sim("1x16GiB"))
    core.expect_rejoins(expected, now, now + 30)
    for kid, user in kernels.items():
        core.register(kid, user, now)
    return core


def test_a_gpu_where_kernels_held_memory_waits_for_them_to_rejoin():
    """The ledger says k1 was resident on GPU 0: a new kernel's first cell (which reserves the
    whole device) waits until k1 has said what it holds, then evicts it; nothing over-commits."""
    now = T0 + 100
    core = restarted({"k1": 0}, {"k1": "alice", "new": "bob"}, now)
    wait = one(core.acquire("new", "r1", now), Wait)
    assert "waiting for 1 kernel(s) that held memory there to rejoin" in wait.reason
    assert core.snapshot(now)["devices"][0]["unavailable"] == wait.reason.split(": ", 1)[1]

    actions = core.rejoin("k1", now + 1, device=0, gpu_bytes=6 * GiB, peak_bytes=7 * GiB)
    kernel = core.kernels["k1"]
    assert (kernel.device, kernel.gpu_bytes, kernel.peaks) == (0, 6 * GiB, [7 * GiB])
    changes = [(c.new, c.reason) for c in of(actions, StateChanged) if c.kernel_id == "k1"]
    assert changes[0] == (S.RESIDENT, "rejoined after a broker restart")
    # The waiting cell needs the whole device: the rejoined kernel makes room.
    assert ids(actions, Offload) == ["k1"] and kernel.state == S.OFFLOADING
    assert core.closed_devices() == {}


def test_the_window_closes_for_kernels_that_never_rejoin():
    core = restarted({"gone": 0}, {"new": "bob"})
    assert isinstance(core.acquire("new", "r1", T0 + 110)[-1], Wait)
    actions = core.tick(T0 + 130)
    assert one(actions, Grant).request_id == "r1"


def test_rejoined_kernels_are_offloaded_and_spilled_as_they_report():
    core = restarted({}, {"host": "alice", "disk": "bob", "cold": "bob"})
    core.rejoin("host", T0 + 101, device=0, host_bytes=3 * GiB)
    core.rejoin("disk", T0 + 101, device=0, disk_bytes=2 * GiB)
    core.rejoin("cold", T0 + 101)
    states = {k: (v.state, v.device, v.home) for k, v in core.kernels.items()}
    assert states == {
        "host": (S.OFFLOADED, None, 0),
        "disk": (S.SPILLED, None, 0),
        "cold": (S.COLD, None, core.kernels["cold"].home),  # (its home: where it registered)
    }
    assert core.host_held == 3 * GiB
    # Its next cell restores it.
    grant = one(core.acquire("host", "r1", T0 + 102), Grant)
    assert grant.restore and core.kernels["host"].state == S.RESTORING


def test_a_report_changes_nothing_for_a_kernel_this_run_knows():
    core = make(sim("1x16GiB"), kernels={"k1": "alice"})
    run_cell(core, "k1", "r1", T0 + 1, T0 + 2, peak=2 * GiB)
    before = core.kernels["k1"].to_dict()
    assert not of(core.rejoin("k1", T0 + 3, device=0, gpu_bytes=9 * GiB), StateChanged)
    assert core.kernels["k1"].to_dict() == before


def test_a_cell_running_across_the_restart_is_waited_for_and_its_release_ends_it():
    """k1's cell ran when the broker died: it rejoins running (no lease here), is no victim, a
    cell that needs its memory waits (not denied), and its release (of the old run's lease)
    makes it idle and lets the waiting cell in."""
    now = T0 + 100
    core = restarted({"k1": 0}, {"k1": "alice", "k2": "bob"}, now)
    core.rejoin("k1", now, device=0, gpu_bytes=10 * GiB, running=True)
    kernel = core.kernels["k1"]
    assert (kernel.state, kernel.lease, kernel.booking()) == (S.RUNNING, None, 10 * GiB)
    with pytest.raises(BrokerError, match="running"):
        core.offload("k1", now)
    wait = one(core.acquire("k2", "r2", now + 1, memory=8 * GiB), Wait)
    assert "busy with running cells" in wait.reason
    actions = core.release("k1", "old-run-lease", now + 5, peak_bytes=11 * GiB, gpu_bytes=9 * GiB)
    assert not of(actions, LeaseEnded)  # nothing of this run to charge
    assert (kernel.gpu_bytes, kernel.peaks) == (9 * GiB, [11 * GiB])
    assert [c.new for c in of(actions, StateChanged)] == [S.RESIDENT, S.OFFLOADING]
    assert ids(actions, Offload) == ["k1"]  # idle now: it makes room for the waiting cell


def test_a_late_report_onto_memory_given_away_is_booked_and_relieved():
    """After the window: the GPU went to another kernel meanwhile. The late kernel's state is
    there all the same, so it is booked; idle kernels are offloaded until it fits, and no grant
    lands on the GPU before."""
    now = T0 + 100
    core = restarted({}, {"late": "alice", "other": "bob", "third": "carol"}, now)
    run_cell(core, "other", "r1", now, now + 1, peak=12 * GiB)
    actions = core.rejoin("late", now + 2, device=0, gpu_bytes=8 * GiB)
    assert core.device_bookings()[0] == 20 * GiB  # over-committed: a fact, not a decision
    assert ids(actions, Offload) == ["other"]
    assert isinstance(core.acquire("third", "r3", now + 3, memory=GiB)[-1], Wait)
    actions = core.offloaded("other", now + 4, host_bytes=12 * GiB)
    assert one(actions, Grant).request_id == "r3"
    assert core.device_bookings()[0] <= 16 * GiB


def test_a_kernel_not_yet_back_when_the_broker_restarts_again_is_expected_by_the_next_run():
    """Two restarts in a row: k2 (8 GiB on GPU 0) was registered again by the first new run but
    had not rejoined it yet when that run died too. Its registration, the ledger's last record of
    it, names the GPU it is expected on, so the second new run waits for it as well: no new cell
    is given the memory it still holds."""
    now = T0 + 100
    recorded: dict[str, int | None] = {}  # each kernel's last recorded GPU, as the ledger keeps it

    def record(actions: list) -> None:
        recorded.update((c.kernel_id, c.device) for c in of(actions, StateChanged))

    first = make(sim("1x16GiB"))
    first.expect_rejoins({"k1": 0, "k2": 0}, now, now + 30)
    record(first.register("k1", "alice", now))
    record(first.register("k2", "bob", now))
    record(first.rejoin("k1", now + 1, device=0, gpu_bytes=4 * GiB))
    held = {kid: device for kid, device in recorded.items() if device is not None}
    assert held == {"k1": 0, "k2": 0}

    second = restarted(held, {"k1": "alice", "k2": "bob", "new": "carol"}, now + 5)
    second.rejoin("k1", now + 6, device=0, gpu_bytes=4 * GiB)
    wait = one(second.acquire("new", "r1", now + 7, memory=2 * GiB), Wait)
    assert "waiting for 1 kernel(s) that held memory there to rejoin" in wait.reason
    actions = second.rejoin("k2", now + 8, device=0, gpu_bytes=8 * GiB)
    assert one(actions, Grant).request_id == "r1"
    assert second.device_bookings()[0] <= 16 * GiB


# ---------------------------------------------------------------------------- quota configuration


def test_quota_precedence_user_then_most_generous_group_then_default():
    quotas = Quotas.parse(
        {
            "default": {"gpu_memory": "8GiB", "gpu_hours_per_day": 2, "priority": 1},
            "group:students": {"gpu_memory": "4GiB", "max_resident_kernels": 1},
            "group:staff": {"gpu_memory": "24GiB", "max_resident_kernels": 3, "priority": 2},
            "user:alice": {"gpu_memory": "2GiB", "host_memory": "64GiB"},
        }
    )
    assert quotas.limits_for("alice", ["students", "staff"]) == Limits(
        gpu_memory=2 * GiB,
        gpu_seconds_per_day=7200.0,
        max_resident_kernels=3,
        host_memory=64 * GiB,
        priority=2.0,
    )
    bob = quotas.limits_for("bob", ["students", "staff"])
    assert (bob.gpu_memory, bob.max_resident_kernels, bob.priority) == (24 * GiB, 3, 2.0)
    carol = quotas.limits_for("carol", ["students"])
    assert (carol.gpu_memory, carol.max_resident_kernels) == (4 * GiB, 1)
    dave = quotas.limits_for("dave", ["unknown-group"])
    assert dave == Limits(gpu_memory=8 * GiB, gpu_seconds_per_day=7200.0, priority=1.0)
    assert Quotas.parse(None).limits_for("anyone") == Limits()
    assert Quotas.parse({}).limits_for("anyone", ["g"]) == Limits()
    # an unset (None) limit falls through to the next level
    assert Quotas.parse({"user:x": {"gpu_memory": None}, "default": {"gpu_memory": 1}}).limits_for(
        "x"
    ) == Limits(gpu_memory=1)


def test_quota_parsing_accepts_sizes_and_round_trips():
    config = {
        "default": {"gpu_memory": 1 << 30, "host_memory": "1.5GiB", "gpu_seconds_per_day": 60}
    }
    quotas = Quotas.parse(config)
    assert quotas.to_dict() == {
        "default": {"gpu_memory": GiB, "host_memory": 3 * GiB // 2, "gpu_seconds_per_day": 60.0}
    }
    assert Quotas.parse(quotas.to_dict()) == quotas
    assert Limits().to_dict()["priority"] == 1.0


def test_the_core_uses_group_quotas_of_the_registered_kernel():
    core = make(quotas={"group:ml": {"gpu_memory": "4GiB"}})
    core.register("k1", "alice", T0, groups=["ml"])
    core.register("k2", "alice", T0, groups=[])
    assert one(core.acquire("k1", "r1", T0), Grant).reservation == 4 * GiB
    core.release("k1", "r1", T0 + 1, peak_bytes=0, gpu_bytes=0)
    assert one(core.acquire("k2", "r2", T0 + 2), Grant).reservation == 16 * GiB


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (["default"], "quotas must be a mapping"),
        ({"admin": {}}, "quota key 'admin'"),
        ({"user:": {}}, "quota key 'user:'"),
        ({3: {}}, "quota key 3"),
        ({"default": 5}, "quota 'default' must be a mapping"),
        ({"default": {"gpu_mem": "1GiB"}}, "unknown resource 'gpu_mem'"),
        ({"user:bob": {"gpu_memory": "lots"}}, "quota 'user:bob': gpu_memory: invalid size"),
        ({"default": {"gpu_memory": "-1GiB"}}, "negative"),
        ({"default": {"gpu_memory": 1.5}}, "quota 'default': gpu_memory"),
        ({"default": {"host_memory": True}}, "quota 'default': host_memory"),
        ({"default": {"gpu_hours_per_day": -1}}, "gpu_hours_per_day must be a number >= 0"),
        ({"default": {"gpu_seconds_per_day": "1h"}}, "gpu_seconds_per_day must be a number"),
        ({"default": {"gpu_seconds_per_day": math.nan}}, "gpu_seconds_per_day must be a number"),
        ({"group:x": {"max_resident_kernels": 1.5}}, "max_resident_kernels must be an integer"),
        ({"group:x": {"max_resident_kernels": True}}, "max_resident_kernels must be an integer"),
        ({"group:x": {"max_resident_kernels": -1}}, "max_resident_kernels must be an integer"),
        ({"default": {"priority": 0}}, "priority must be > 0"),
        ({"default": {"priority": True}}, "priority must be a number"),
        ({"default": {"priority": math.nan}}, "priority must be a number"),
    ],
)
def test_invalid_quota_configs_raise_quota_error_naming_the_entry(config, message):
    with pytest.raises(QuotaError, match=message.replace("(", r"\(")) as info:
        Quotas.parse(config)
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------ regressions found by the machine


def test_a_cell_that_starts_while_its_kernel_is_being_offloaded_waits_then_restores():
    core = make(kernels={"k1": "alice"})
    run_cell(core, "k1", "r1", T0, T0 + 1, peak=4 * GiB)
    core.offload("k1", T0 + 2)
    actions = core.acquire("k1", "r2", T0 + 3)
    assert not of(actions, Grant)  # a Grant now would run the cell on state leaving the GPU
    assert "offload" in one(actions, Wait).reason
    assert core.kernels["k1"].state == S.OFFLOADING
    grant = one(core.offloaded("k1", T0 + 4, host_bytes=4 * GiB), Grant)
    assert (grant.request_id, grant.restore) == ("r2", True)


def test_a_cell_that_starts_while_its_offload_is_refused_runs_without_restore():
    core = make(kernels={"k1": "alice"})
    run_cell(core, "k1", "r1", T0, T0 + 1, peak=4 * GiB)
    core.offload("k1", T0 + 2)
    assert of(core.acquire("k1", "r2", T0 + 3), Wait)
    grant = one(core.offload_failed("k1", "busy", T0 + 4), Grant)
    assert (grant.request_id, grant.restore) == ("r2", False)


def test_memory_an_offload_leaves_behind_cannot_be_waited_for():
    """A kernel offloaded down to its CUDA context keeps 512 MiB on the GPU; a first cell that
    wants the whole device used to wait for it forever. It gets what can be freed instead, and
    an explicit request that cannot fit is denied rather than left waiting."""
    core = make(kernels={"k1": "alice", "k2": "bob"})
    run_cell(core, "k1", "r1", T0, T0 + 1, peak=4 * GiB)
    core.offload("k1", T0 + 2)
    core.offloaded("k1", T0 + 3, host_bytes=3 * GiB + 512 * MiB, gpu_bytes=512 * MiB)
    deny = one(core.acquire("k2", "r2", T0 + 4, memory=16 * GiB), Deny)
    assert "non-offloadable" in deny.reason and "--memory" in deny.reason
    assert core.queue() == []
    grant = one(core.acquire("k2", "r3", T0 + 5), Grant)
    assert grant.reservation == 16 * GiB - 512 * MiB


def test_an_offload_that_freed_nothing_is_not_asked_again_until_the_next_cell():
    core = make(kernels={"k1": "alice", "k2": "bob"})
    run_cell(core, "k1", "r1", T0, T0 + 1, peak=GiB, gpu=600 * MiB)
    assert ids(core.acquire("k2", "r2", T0 + 2, memory=16 * GiB), Offload) == ["k1"]
    actions = core.offloaded("k1", T0 + 3, host_bytes=0, gpu_bytes=600 * MiB)
    assert not of(actions, Offload)  # used to ask again, and again, for ever
    assert one(actions, Deny).kernel_id == "k2"
    kernel = core.kernels["k1"]
    assert (kernel.state, kernel.gpu_bytes) == (S.RESIDENT, 600 * MiB) and kernel.refused
    run_cell(core, "k1", "r3", T0 + 4, T0 + 5, peak=GiB, gpu=GiB, memory=None)
    assert ids(core.acquire("k2", "r4", T0 + 6, memory=16 * GiB), Offload) == ["k1"]


def test_kernels_still_being_offloaded_count_against_the_users_quotas():
    core = make(
        quotas={"default": {"max_resident_kernels": 1, "gpu_memory": "4GiB"}},
        kernels={"a1": "alice", "a2": "alice"},
    )
    run_cell(core, "a1", "r1", T0, T0 + 1, peak=GiB)
    core.offload("a1", T0 + 2)
    wait = one(core.acquire("a2", "r2", T0 + 3, memory=GiB), Wait)
    assert "alice" in wait.reason and "offloaded" in wait.reason
    assert one(core.offloaded("a1", T0 + 4, host_bytes=GiB), Grant).kernel_id == "a2"


def test_a_memory_hint_never_reserves_less_than_the_kernels_own_state():
    core = make(kernels={"k1": "alice", "k2": "bob"})
    run_cell(core, "k1", "r1", T0, T0 + 1, peak=6 * GiB)
    core.offload("k1", T0 + 2)
    core.offloaded("k1", T0 + 3, host_bytes=6 * GiB)
    core.acquire("k2", "r2", T0 + 4, memory=12 * GiB)
    # a 2 GiB hint used to be granted into the 4 GiB left, and the restore then brought back 6 GiB
    assert not of(core.acquire("k1", "r3", T0 + 5, memory=2 * GiB), Grant)
    actions = core.release("k2", "r2", T0 + 6, peak_bytes=12 * GiB, gpu_bytes=12 * GiB)
    assert ids(actions, Offload) == ["k2"]
    grant = one(core.offloaded("k2", T0 + 7, host_bytes=12 * GiB), Grant)
    assert (grant.kernel_id, grant.reservation, grant.restore) == ("k1", 6 * GiB, True)
    core.restored("k1", T0 + 8, gpu_bytes=6 * GiB)
    assert core.device_bookings() == {0: 6 * GiB}


def test_a_memory_hint_does_not_slip_a_kernel_past_a_lowered_memory_quota():
    core = make(kernels={"k1": "alice"})
    run_cell(core, "k1", "r1", T0, T0 + 1, peak=8 * GiB, gpu=4 * GiB)
    core.set_quotas(Quotas.parse({"default": {"gpu_memory": "2GiB"}}), T0 + 2)
    deny = one(core.acquire("k1", "r2", T0 + 3, memory=512 * MiB), Deny)
    assert "GPU memory quota" in deny.reason and "4.0 GiB" in deny.reason


# ================================================================================ state machine


KIDS_MAX = 5
#: The window a restarted broker gives kernels of its previous run to rejoin.
REJOIN_WINDOW = 30.0
USERS = {"alice": ("ml",), "bob": ("ml", "ops"), "carol": ()}
SHAPES = {
    "1x16GiB": lambda: sim("1x16GiB"),
    "2x16GiB": lambda: sim("2x16GiB"),
    "two chips": lambda: [dev(0, 16), dev(1, 16), dev(2, 24, chip="H100")],
}
SIZES = ["2GiB", "4GiB", "8GiB", "12GiB", "24GiB"]
HINTS = [512 * MiB, 2 * GiB, 6 * GiB, 12 * GiB, 20 * GiB]
RESIDUALS = [0, 0, 256 * MiB, 600 * MiB]

quota_entry = st.fixed_dictionaries(
    {},
    optional={
        "gpu_memory": st.sampled_from(SIZES),
        "gpu_seconds_per_day": st.sampled_from([10, 600, 7200]),
        "max_resident_kernels": st.integers(0, 3),
        "priority": st.sampled_from([0.5, 1, 2, 4]),
        "host_memory": st.sampled_from(["0GiB", "1GiB", "6GiB"]),
    },
)
quota_configs = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "default": quota_entry,
            "user:alice": quota_entry,
            "user:bob": quota_entry,
            "group:ml": quota_entry,
            "group:ops": quota_entry,
        },
    ),
)
policies = st.builds(
    Policy,
    idle_timeout=st.sampled_from([0.0, 0.0, 120.0]),
    migration=st.booleans(),
    pinned_per_kernel=st.sampled_from([0, 4 * GiB]),
    pinned_total=st.sampled_from([None, 6 * GiB]),
    host_memory_limit=st.sampled_from([0, 3 * GiB, 10 * GiB]),
)
picks = st.integers(0, 1 << 16)
fractions = st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])


IN_FLIGHT = (S.RUNNING, S.OFFLOADING, S.RESTORING)


@dataclass(frozen=True)
class Report:
    """How a kernel finishes what it was doing (only the fields for its state are used)."""

    index: int
    failed: bool
    peak: float
    gpu: float
    with_peak: bool
    residual: int
    to_disk: bool


reports = st.builds(
    Report,
    index=picks,
    failed=st.sampled_from([False, False, False, False, True]),
    peak=fractions,
    gpu=fractions,
    with_peak=st.sampled_from([True, True, True, False]),
    residual=st.sampled_from(RESIDUALS),
    to_disk=st.booleans(),
)


def booking_of(kernel: Kernel) -> int:
    """The memory rule, computed here rather than trusted from the core."""
    if kernel.device is None:
        return 0
    if kernel.lease is not None:
        return max(kernel.lease.reservation, kernel.gpu_bytes)
    return kernel.gpu_bytes


@dataclass
class Call:
    """What the machine knows about the call whose actions it is checking."""

    explicit_offload: str | None = None
    unregistered: str | None = None
    devices_before: dict[str, int | None] = field(default_factory=dict)
    reported: dict[str, int | None] = field(default_factory=dict)
    """Where a report (offloaded) leaves the reporting kernel's GPU state, before any decision."""
    fact: bool = False
    """A kernel reports what it holds after a broker restart: a fact that may over-commit a
    device or the host budget (memory given away while the kernel was not known), which the core's
    own decisions then never make worse."""


class BrokerMachine(RuleBasedStateMachine):
    """Random interleavings of everything the outside world can tell the core."""

    @initialize(
        shape=st.sampled_from(sorted(SHAPES)),
        config=quota_configs,
        policy=policies,
        users=st.lists(st.sampled_from(sorted(USERS)), min_size=2, max_size=4),
    )
    def setup(self, shape: str, config: dict | None, policy: Policy, users: list[str]) -> None:
        self.devices = {d.index: d for d in SHAPES[shape]()}
        self.now = T0 + 8 * 3600
        self.core = BrokerCore(self.devices.values(), Quotas.parse(config), policy, now=self.now)
        self.policy = policy
        self.next_id = 0
        self.alive: dict[str, str] = {}  # kernel -> user
        self.gone: set[str] = set()
        self.pending: dict[str, str] = {}  # kernel -> request id it waits with ("restore-*")
        self.leases: dict[str, Grant] = {}  # outstanding grants
        self.offloading: set[str] = set()  # Offload emitted, no offloaded/offload_failed yet
        self.host_limits: dict[str, int | None] = {}  # the host_limit of each offload in flight
        self.spilling: set[str] = set()  # Spill emitted, no spilled/spill_failed yet
        self.asked: set[str] = set()  # offload asked while a cell ran: done when it ends
        self.saved: dict[str, int] = {}  # host + disk bytes the kernel must keep
        self.state_device: dict[str, int] = {}  # where the kernel's GPU state lives or lived
        self.cancelled: set[str] = set()
        self.usage: dict[str, float] = {}
        self.day = int(self.now // DAY)
        # After a broker restart: what each kernel not yet rejoined will report, the cells to
        # send again once it did, the cells of the previous run still running, and where a report
        # over-committed (see broker.rejoin).
        self.unjoined: dict[str, dict] = {}
        self.resend: dict[str, tuple[str, int | None]] = {}
        self.stale: dict[str, str] = {}
        self.excess: set[int] = set()
        self.held_by_facts: dict[int, int] = {}  # (see held_when_the_broker_died)
        self.host_over = False
        self.recorded: dict[str, int | None] = {}  # the GPU of each kernel's last state change
        for user in users:  # (rules that need kernels are then enabled from the first step)
            self.register(user)

    # ------------------------------------------------------------------------------- helpers

    def pick(self, index: int, states: tuple[KernelState, ...] | None = None) -> str | None:
        kids = sorted(
            k for k in self.alive if states is None or self.core.kernels[k].state in states
        )
        return kids[index % len(kids)] if kids else None

    def in_state(self, *states: KernelState) -> bool:
        return any(self.core.kernels[k].state in states for k in self.alive)

    def call(self, method: str, *args, call: Call | None = None, **kwargs) -> list:
        call = call or Call()
        call.devices_before = {k: kernel.device for k, kernel in self.core.kernels.items()}
        call.devices_before.update(call.reported)
        actions = getattr(self.core, method)(*args, **kwargs)
        self.check_actions(actions, call)
        self.check_overcommit(call.fact)
        return actions

    def check_overcommit(self, fact: bool) -> None:
        """Only facts over-commit (see Call.fact); a decision never adds to it."""
        booked = self.core.device_bookings()
        over = {d for d, b in booked.items() if b > self.devices[d].total_bytes}
        limit = self.policy.host_memory_limit
        host_over = bool(limit) and self.core.host_held > limit
        if not fact:
            assert over <= self.excess, (over, self.excess, self.core.snapshot(self.now))
            assert self.host_over or not host_over, self.core.snapshot(self.now)
        self.excess, self.host_over = over, host_over

    def used_seconds(self, user: str) -> float:
        running = sum(
            self.now - max(g.start, self.day * DAY)
            for k, g in self.leases.items()
            if self.alive.get(k) == user and g.hold
        )
        return self.usage.get(user, 0.0) + running

    def check_actions(self, actions: list, call: Call) -> None:
        granted_users: set[str] = set()
        places = {r.request_id: place for place, r in enumerate(self.core.queue(), 1)}
        for action in actions:
            kid = getattr(action, "kernel_id", None)
            if isinstance(action, StateChanged):
                self.recorded[kid] = action.device
            if kid in self.gone:
                assert kid == call.unregistered, f"{action} after {kid} left the pool"
                assert isinstance(action, LeaseEnded | Deny | StateChanged | Forget), action
                if isinstance(action, StateChanged):
                    assert action.new is None
            if isinstance(action, Grant):
                self.check_grant(action, call)
                granted_users.add(self.alive[kid])
                # (a restore with nothing to copy leaves an idle kernel on the device, which a
                # request behind it in the same decision may evict: the Offload names that device)
                call.devices_before[kid] = action.device
            elif isinstance(action, Deny):
                assert action.reason.strip(), action
                if self.pending.get(kid) == action.request_id or (
                    self.pending.get(kid) == "restore-*"
                    and action.request_id.startswith("restore-")
                ):
                    del self.pending[kid]
            elif isinstance(action, Wait):
                assert kid in self.alive, action
                assert action.request_id not in self.cancelled, action
                expected = self.pending.get(kid)
                assert expected == action.request_id or (
                    expected == "restore-*" and action.request_id.startswith("restore-")
                ), (action, expected)
                assert action.position >= 1 and action.reason.strip(), action
                # (the place it waits at once its event is decided: no request ahead moves later)
                assert action.position == places.get(action.request_id), (action, places)
            elif isinstance(action, Offload):
                assert kid in self.alive, action
                assert kid not in self.offloading, f"{kid} offloaded twice"
                assert kid not in self.leases, f"{kid} offloaded while holding a lease"
                if self.core.kernels[kid].pinned:
                    assert kid == call.explicit_offload, f"pinned {kid} chosen as victim"
                if self.core.kernels[kid].stalled_since is not None:
                    assert kid == call.explicit_offload, f"stalled {kid} chosen as victim"
                assert action.device == call.devices_before[kid]
                assert action.reason.strip()
                if self.policy.host_memory_limit:
                    assert action.host_limit is not None, action
                assert action.host_limit is None or action.host_limit >= 0, action
                self.offloading.add(kid)
                self.host_limits[kid] = action.host_limit
            elif isinstance(action, Spill):
                kernel = self.core.kernels[kid]
                assert kid in self.alive and kid not in self.spilling, action
                assert kernel.host_bytes and kernel.state in SPILLABLE_STATES, kernel
                assert kid not in self.leases and action.reason.strip(), action
                self.spilling.add(kid)
            elif isinstance(action, LeaseEnded):
                grant = self.leases.pop(kid, None)
                assert grant is not None and grant.request_id == action.request_id, action
                assert grant.hold
                assert action.seconds == pytest.approx(self.now - grant.start)
                # Today is charged only the seconds since midnight of a lease begun before it.
                today = self.now - max(grant.start, self.day * DAY)
                self.usage[action.user] = self.usage.get(action.user, 0.0) + today
        for kid, request in self.pending.items():
            if request == "restore-*" and kid in self.core.kernels:
                live = self.core.kernels[kid].request
                if live is not None:
                    self.pending[kid] = live.request_id
        for user in granted_users:
            self.check_quota_after_grant(user)

    def check_grant(self, grant: Grant, call: Call) -> None:
        kid = grant.kernel_id
        assert kid in self.alive and kid in self.core.kernels, grant
        assert grant.request_id not in self.cancelled, grant
        expected = self.pending.pop(kid, None)
        assert expected == grant.request_id or (
            expected == "restore-*" and grant.request_id.startswith("restore-")
        ), f"{grant} without a pending request ({expected})"
        assert kid not in self.leases, f"second grant {grant} before the first ended"
        assert kid not in self.offloading, f"{grant} while the kernel's offload is in flight"
        assert grant.start == self.now
        assert grant.device not in self.core.closed_devices(), f"{grant} on a closed GPU"
        if grant.hold:
            limit = self.core.limits(self.alive[kid], USERS[self.alive[kid]]).gpu_seconds_per_day
            if limit is not None:
                used = self.used_seconds(self.alive[kid])
                assert used < limit, f"{grant} although {used} of {limit} GPU-seconds are used"
        before = call.devices_before.get(kid)
        if before is not None:
            assert grant.device == before, "state left on a GPU must be used on that GPU"
        assert grant.restore == (self.saved.get(kid, 0) > 0), (grant, self.saved.get(kid))
        if grant.restore:
            home = self.state_device[kid]
            if self.policy.migration:
                assert self.devices[grant.device].chip == self.devices[home].chip, grant
            else:
                assert grant.device == home, grant
        self.state_device[kid] = grant.device
        if grant.hold or grant.restore:
            self.leases[kid] = grant

    def check_quota_after_grant(self, user: str) -> None:
        limits = self.core.limits(user, USERS[user])
        mine = [k for k in self.core.kernels.values() if k.user == user]
        if limits.gpu_memory is not None:
            total = sum(booking_of(k) for k in mine)
            assert total <= limits.gpu_memory, f"{user} books {total} > {limits.gpu_memory}"
        if limits.max_resident_kernels is not None:
            holding = (S.RUNNING, S.RESTORING, S.RESIDENT, S.OFFLOADING)
            resident = sum(1 for k in mine if k.state in holding)
            assert resident <= limits.max_resident_kernels, (user, resident, limits)

    # --------------------------------------------------------------------------------- rules
    # Rules are picked about evenly (and some are switched off per example), so related events
    # share one rule each, and kernels also finish their work as time passes: otherwise the rules
    # that are always enabled (clock, pins, quotas) crowd out the ones that move kernels along.

    @rule(
        die=st.sampled_from([False, False, True]), user=st.sampled_from(sorted(USERS)), index=picks
    )
    def lifecycle(self, die: bool, user: str, index: int) -> None:
        """A kernel starts, or one dies (in whatever state it is)."""
        if die and len(self.alive) >= 2:
            self.unregister(self.pick(index))
        elif len(self.alive) < KIDS_MAX:
            self.register(user)

    def register(self, user: str) -> None:
        kid = f"k{self.next_id}"
        self.next_id += 1
        self.alive[kid] = user
        actions = self.call("register", kid, user, self.now, groups=USERS[user])
        assert [type(a) for a in actions] == [StateChanged]
        assert self.core.kernels[kid].state == S.COLD

    @precondition(lambda self: self.alive)
    @rule(
        index=picks,
        memory=st.one_of(st.none(), st.sampled_from(HINTS)),
        any_kernel=st.sampled_from([False, False, False, True]),
    )
    def acquire(self, index: int, memory: int | None, any_kernel: bool) -> None:
        idle = sorted(k for k in self.alive if k not in self.pending and k not in self.leases)
        kid = idle[index % len(idle)] if idle and not any_kernel else self.pick(index)
        if kid in self.unjoined or kid in self.stale:
            return  # it has not said hello to this broker run yet, or a cell of it runs
        rid = f"r{self.next_id}"
        self.next_id += 1
        # A cell during an explicit restore is not refused: it takes the queued restore's place,
        # or waits for the restore under way.
        restoring = self.pending.get(kid, "").startswith("restore-")
        busy = (kid in self.pending and not restoring) or (
            kid in self.leases and self.leases[kid].hold
        )
        if not busy:
            self.pending[kid] = rid
        actions = self.call("acquire", kid, rid, self.now, memory=memory)
        if busy:
            assert actions == [Deny(kid, rid, "this kernel already holds or awaits a GPU lease")]
        else:
            mine = [a for a in actions if getattr(a, "request_id", None) == rid]
            assert mine and isinstance(mine[-1], Grant | Deny | Wait), actions

    def cancel(self, index: int, wrong: bool) -> None:
        if not self.pending:
            return
        kids = sorted(self.pending)
        kid = kids[index % len(kids)]
        rid = self.pending[kid]
        if wrong or rid.startswith("restore-"):
            assert self.call("cancel", kid, "no-such-request", self.now) == []
            return
        self.call("cancel", kid, rid, self.now)
        del self.pending[kid]
        self.cancelled.add(rid)
        assert self.core.kernels[kid].request is None

    def release(self, kid: str, peak: float, gpu: float, report: bool) -> None:
        lease = self.core.kernels[kid].lease
        assert lease is not None and lease.hold
        peak_bytes = int(lease.reservation * peak) if report else None
        gpu_bytes = int(peak_bytes * gpu) if peak_bytes is not None else None
        actions = self.call(
            "release", kid, lease.request_id, self.now, peak_bytes=peak_bytes, gpu_bytes=gpu_bytes,
            call=Call(explicit_offload=kid if kid in self.asked else None),
        )  # fmt: skip
        self.asked.discard(kid)
        assert any(isinstance(a, LeaseEnded) and a.kernel_id == kid for a in actions)
        assert kid not in self.leases

    def offloaded(self, kid: str, residual: int, to_disk: bool) -> None:
        kernel = self.core.kernels[kid]
        left = min(kernel.gpu_bytes, residual)
        moved = kernel.gpu_bytes - left
        assert self.saved.get(kid, 0) == 0
        # The kernel keeps at most the host room it was given; the rest goes straight to disk.
        room = self.host_limits.pop(kid)
        host = 0 if to_disk else moved if room is None else min(moved, room)
        disk = moved - host
        self.offloading.discard(kid)
        self.saved[kid] = moved
        self.call(
            "offloaded", kid, self.now, host_bytes=host, disk_bytes=disk, gpu_bytes=left,
            call=Call(reported={kid: kernel.device if left else None}),
        )  # fmt: skip
        kernel = self.core.kernels[kid]
        if kid not in self.leases:  # (it may have been granted at once)
            assert kernel.state in (S.OFFLOADED, S.SPILLED, S.QUEUED, S.COLD, S.RESIDENT)
        if moved == 0 and left:
            assert kernel.refused, "an offload that freed nothing must not be asked again"

    def offload_failed(self, kid: str, host_full: bool) -> None:
        self.offloading.discard(kid)
        room = self.host_limits.pop(kid)
        if host_full:  # its state did not fit the room, and the disk could not take the rest
            why = "cannot write spill file x.spill (0 bytes written): the disk is full"
            self.call("offload_failed", kid, why, self.now, host_full=True)
            refused = self.core.kernels[kid].refused
            assert refused.endswith(f"is full and the spill directory cannot take the rest: {why}")
            assert "host_memory_limit" in refused or "host_memory quota" in refused, refused
            assert room is not None, "an offload without a host limit cannot run out of room"
        else:
            self.call("offload_failed", kid, "a cell is capturing a CUDA graph", self.now)
        assert self.core.kernels[kid].refused or kid in self.leases

    @precondition(lambda self: self.in_state(*IN_FLIGHT))
    @rule(report=reports)
    def kernel_reports(self, report: Report) -> None:
        self.kernel_report(report)

    def kernel_report(self, report: Report) -> None:
        """A kernel finishes what it is doing: its cell ends (with or without a peak), or the
        offload or restore it was asked for completes or fails."""
        kid = self.pick(report.index, IN_FLIGHT)
        state = self.core.kernels[kid].state
        if kid in self.stale:
            self.stale_release(kid, report.gpu)
        elif state == S.RUNNING:
            self.release(kid, report.peak, report.gpu, report.with_peak)
        elif state == S.OFFLOADING:
            if report.failed:
                self.offload_failed(
                    kid, host_full=report.to_disk and self.host_limits[kid] is not None
                )
            else:
                self.offloaded(kid, report.residual, report.to_disk)
        elif report.failed:
            self.restore_failed(kid)
            if report.to_disk and self.core.kernels[kid].state == S.ERROR:
                self.discard_damaged(kid)  # the restore found damage; the user goes on
        else:
            self.restored(kid)

    @precondition(lambda self: self.alive)
    @rule(
        kind=st.sampled_from(["interrupt", "offload", "restore", "discard"]),
        index=picks,
        any_state=st.booleans(),
    )
    def user_request(self, kind: str, index: int, any_state: bool) -> None:
        """The user interrupts a waiting cell, asks for an offload or a restore (magic, REST), or
        discards the part of an offloaded state a damaged spill file lost."""
        if kind == "interrupt":
            self.cancel(index, wrong=any_state)
        elif kind == "restore":
            self.restore(index, any_state)
        elif kind == "discard":
            self.discard(index, any_state)
        else:
            self.offload(index, any_state)

    @precondition(lambda self: self.alive)
    @rule(
        kind=st.sampled_from(["pin", "unpin", "quotas", "host quota"]),
        index=picks,
        config=quota_configs,
    )
    def admin(self, kind: str, index: int, config: dict | None) -> None:
        if kind == "quotas":
            self.set_quotas(config)
        elif kind == "host quota":
            # Below what a user's host copies hold now (queued or not): some must go to disk.
            held = max(kernel.host_bytes for kernel in self.core.kernels.values())
            self.set_quotas({"default": {"host_memory": held // 2}})
        else:
            self.pin(index, kind == "pin")

    @precondition(lambda self: self.alive)
    @rule(kind=st.sampled_from(["stall", "answer", "block", "unblock", "revoke"]), index=picks)
    def watchdog(self, kind: str, index: int) -> None:
        """A kernel stops answering or answers again; a GPU is closed to new work or reopened; a
        stalled kernel's lease is revoked (the driver tier checkpointed its process)."""
        if kind in ("stall", "answer"):
            kid = self.pick(index)
            since = self.now - 10 if kind == "stall" else None
            self.call("set_stalled", kid, since, self.now)
            assert self.core.kernels[kid].stalled_since == since
        elif kind in ("block", "unblock"):
            device = sorted(self.devices)[index % len(self.devices)]
            self.call(
                "set_device_unavailable",
                device,
                "stalled lease" if kind == "block" else None,
                self.now,
            )
        else:
            holders = sorted(
                k
                for k, g in self.leases.items()
                if g.hold and self.core.kernels[k].state == S.RUNNING
            )
            if not holders:
                return
            kid = holders[index % len(holders)]
            self.call("revoke", kid, self.now, "stalled")
            kernel = self.core.kernels[kid]
            assert kid not in self.leases and kernel.state == S.OFFLOADED and kernel.device is None

    def spill(self, index: int, fraction: float) -> None:
        """A spill the core asked for finishes (all, part, or none of the copy moved: a full
        disk); without one in flight, a kernel reports a spill of its own accord."""
        if self.spilling:
            kid = sorted(self.spilling)[index % len(self.spilling)]
            self.spilling.discard(kid)
            if fraction == 0.0:
                self.call("spill_failed", kid, "the disk is full", self.now)
                return
        elif self.in_state(S.OFFLOADED):
            kid = self.pick(index, (S.OFFLOADED,))
        else:
            return
        kernel = self.core.kernels[kid]
        part = int(kernel.host_bytes * fraction)
        self.call(
            "spilled", kid, self.now, host_bytes=kernel.host_bytes - part,
            disk_bytes=kernel.disk_bytes + part,
        )  # fmt: skip

    def restored(self, kid: str) -> None:
        kernel = self.core.kernels[kid]
        gpu = kernel.gpu_bytes + self.saved.get(kid, 0)
        hold = kernel.lease.hold
        waiting = kernel.request is not None  # a cell started during the explicit restore
        self.saved[kid] = 0
        if not hold:
            self.leases.pop(kid)
        self.call("restored", kid, self.now, gpu_bytes=gpu)
        kernel = self.core.kernels[kid]
        # (without a cell, a waiter may evict it again at once)
        assert kernel.state in ((S.RUNNING,) if hold else (S.RESIDENT, S.OFFLOADING, S.RUNNING))
        if waiting:  # the cell that waited for the restore is answered, or told where it waits
            assert kid in self.leases or kid not in self.pending or kernel.request.position >= 1
        assert (kernel.gpu_bytes, kernel.host_bytes, kernel.disk_bytes) == (gpu, 0, 0)

    def restore_failed(self, kid: str) -> None:
        waiting = self.core.kernels[kid].request is not None
        if not self.core.kernels[kid].lease.hold:
            self.leases.pop(kid)
        self.call("restore_failed", kid, "out of luck", self.now)
        state = self.core.kernels[kid].state
        if waiting:  # the cell that waited: granted (it tries the restore again), queued or denied
            assert state in ((S.RESTORING,) if kid in self.leases else (S.QUEUED, S.ERROR))
        else:
            assert state == S.ERROR and kid not in self.leases

    def discard(self, index: int, any_state: bool) -> None:
        self.discard_damaged((not any_state and self.pick(index, (S.ERROR,))) or self.pick(index))

    def discard_damaged(self, kid: str) -> None:
        """Half the kernel's saved bytes were lost (all when it had one): it keeps the rest."""
        kernel = self.core.kernels[kid]
        before = (kernel.state, kernel.host_bytes, kernel.disk_bytes)
        left = self.saved.get(kid, 0) // 2
        host = min(kernel.host_bytes, left)
        actions = self.call("discarded", kid, self.now, host_bytes=host, disk_bytes=left - host)
        if before[0] not in (S.ERROR, S.OFFLOADED, S.SPILLED) or kernel.lease is not None:
            assert actions == [] and before == (kernel.state, kernel.host_bytes, kernel.disk_bytes)
            return
        self.saved[kid] = left
        if kid not in self.leases:  # (a waiting cell may be granted at once)
            assert kernel.state in (S.OFFLOADED, S.SPILLED, S.QUEUED), kernel

    def offload(self, index: int, any_state: bool) -> None:
        kid = (not any_state and self.pick(index, (S.RESIDENT,))) or self.pick(index)
        kernel = self.core.kernels[kid]
        state = kernel.state
        if state in (S.OFFLOADED, S.SPILLED, S.OFFLOADING):
            assert self.call("offload", kid, self.now) == []
        elif state == S.RUNNING and kernel.lease is not None and kernel.lease.hold:
            assert self.call("offload", kid, self.now) == []  # done when the cell ends
            self.asked.add(kid)
        elif state == S.RESIDENT:
            actions = self.call("offload", kid, self.now, call=Call(explicit_offload=kid))
            assert ids(actions, Offload) == [kid]
        else:
            with pytest.raises(BrokerError, match=state.value):
                self.core.offload(kid, self.now)

    def restore(self, index: int, any_state: bool) -> None:
        kid = (not any_state and self.pick(index, (S.OFFLOADED, S.SPILLED))) or self.pick(index)
        kernel = self.core.kernels[kid]
        if kernel.state not in (S.OFFLOADED, S.SPILLED):
            with pytest.raises(BrokerError, match="nothing to restore"):
                self.core.restore(kid, self.now)
            return
        if kernel.request is None:
            self.pending[kid] = "restore-*"
            self.call("restore", kid, self.now)
        else:
            assert self.call("restore", kid, self.now) == []

    def pin(self, index: int, pinned: bool) -> None:
        kid = self.pick(index)
        self.call("set_pinned", kid, pinned, self.now)
        assert self.core.kernels[kid].pinned is pinned

    def unregister(self, kid: str) -> None:
        del self.alive[kid]
        self.gone.add(kid)
        actions = self.call("unregister", kid, self.now, call=Call(unregistered=kid))
        assert Forget(kid) in actions
        assert kid not in self.core.kernels
        if kid in self.leases:
            assert not self.leases[kid].hold  # a restore without a cell: nothing to charge
        for table in (
            self.pending, self.leases, self.saved, self.host_limits, self.unjoined, self.resend,
            self.stale,
        ):  # fmt: skip
            table.pop(kid, None)
        self.offloading.discard(kid)
        self.spilling.discard(kid)

    @precondition(lambda self: self.alive)
    @rule(
        order=st.permutations(range(KIDS_MAX)),
        at_once=st.integers(0, KIDS_MAX),
        finish=st.booleans(),
    )
    def broker_restart(self, order: list[int], at_once: int, finish: bool) -> None:
        """kill -9 of a node broker and its restart: the kernels live on (a running cell runs on,
        a restore or an offload under way completes or not), a new core hears from the ledger
        which of them held GPU memory, their servers register them all again, and each rejoins
        with what it holds, some at once, the others later (``after_restart``); a cell that was
        waiting sends its request again once its kernel rejoined."""
        old = self.core
        expected: dict[str, int] = {}
        self.held_by_facts = self.held_when_the_broker_died()
        self.resend = {k: request for k, request in self.resend.items() if k in self.unjoined}
        for kid in sorted(self.alive):
            kernel = old.kernels[kid]
            if kid in self.unjoined:  # it never rejoined the run that ended: the ledger's last
                # record of it is its registration, on the GPU that run expected it on (if any)
                if self.recorded[kid] is not None:
                    expected[kid] = self.recorded[kid]
                continue
            if kernel.device is not None:
                expected[kid] = kernel.device
            device, gpu = kernel.device, kernel.gpu_bytes
            host, disk = kernel.host_bytes, kernel.disk_bytes
            if kernel.state == S.RESTORING:  # the restore completes in the kernel
                gpu, host, disk = gpu + self.saved.get(kid, 0), 0, 0
                self.saved[kid] = 0
            elif kernel.state == S.OFFLOADING and finish:  # so does its offload
                room = self.host_limits.get(kid)
                host = gpu if room is None else min(gpu, room)
                device, gpu, disk = None, 0, gpu - host
                self.saved[kid] = host + disk
            if kernel.lease is not None and kernel.lease.hold:
                self.stale[kid] = kernel.lease.request_id
            running = kid in self.stale  # (or it ran across the restart before)
            if kernel.request is not None and kernel.request.hold:
                self.resend[kid] = (kernel.request.request_id, kernel.request.memory)
            self.unjoined[kid] = {
                "device": device if device is not None else self.state_device.get(kid),
                "gpu_bytes": gpu if device is not None else 0,
                "host_bytes": host,
                "disk_bytes": disk,
                "peak_bytes": max(kernel.peaks) if kernel.peaks else None,
                "running": running,
            }
        # The ledger charged the running leases; the new run starts without any.
        usage = {user: self.used_seconds(user) for user in {*self.usage, *self.alive.values()}}
        self.core = BrokerCore(
            self.devices.values(), old.quotas, self.policy, usage_today=usage, now=self.now
        )
        self.usage = usage
        self.pending, self.leases, self.host_limits, self.asked = {}, {}, {}, set()
        self.offloading, self.spilling = set(), set()
        self.excess, self.host_over = set(), False
        self.call("expect_rejoins", expected, self.now, self.now + REJOIN_WINDOW)
        kids = sorted(self.alive)
        for kid in kids:
            actions = self.call(
                "register", kid, self.alive[kid], self.now, groups=USERS[self.alive[kid]]
            )
            assert [type(a) for a in actions] == [StateChanged]
            assert actions[0].device == expected.get(kid), actions
        for i in [i for i in order if i < len(kids)][:at_once]:
            self.rejoin(kids[i])

    def held_when_the_broker_died(self) -> dict[int, int]:
        """What each GPU holds when the broker dies: what the run that ends booked, and what
        kernels that never rejoined it hold there (an earlier run's reports may have
        over-committed a GPU; that run knew nothing of those kernels). Cells that ran across the
        restart add what they grew by (see stale_release): no run decided that either."""
        held = self.core.device_bookings()
        for holds in self.unjoined.values():
            if holds["gpu_bytes"]:
                held[holds["device"]] += holds["gpu_bytes"]
        return held

    def over_committed_by_facts(self) -> set[int]:
        return {d for d, b in self.held_by_facts.items() if b > self.devices[d].total_bytes}

    @precondition(lambda self: self.unjoined or self.stale)
    @rule(kind=st.sampled_from(["rejoin", "cell ends"]), index=picks, gpu=fractions)
    def after_restart(self, kind: str, index: int, gpu: float) -> None:
        """A kernel rejoins late (maybe after the window: onto memory given away meanwhile), or
        the cell a kernel ran across the restart ends."""
        if kind == "rejoin" and self.unjoined:
            kids = sorted(self.unjoined)
            self.rejoin(kids[index % len(kids)])
        elif self.stale:
            kids = sorted(self.stale)
            self.stale_release(kids[index % len(kids)], gpu)

    def rejoin(self, kid: str) -> None:
        holds = self.unjoined.pop(kid)
        expected, excess = kid in self.core.expected, set(self.excess)
        device = holds["device"]
        if (
            device is not None
            and not holds["gpu_bytes"]
            and (holds["host_bytes"] or holds["disk_bytes"])
        ):
            device = None  # offloaded, nothing left on the GPU it last ran on
        self.call("rejoin", kid, self.now, **holds, call=Call(reported={kid: device}, fact=True))
        kernel = self.core.kernels[kid]
        assert (kernel.host_bytes, kernel.disk_bytes) == (holds["host_bytes"], holds["disk_bytes"])
        if device is not None:
            assert kernel.device == device and kernel.gpu_bytes == holds["gpu_bytes"], kernel
            if expected and device not in excess | self.over_committed_by_facts():
                assert device not in self.excess, "memory of a kernel expected back was given away"
            if holds["running"]:
                assert kernel.state == S.RUNNING and kernel.lease is None, kernel
        if kid in self.resend:  # the waiting cell asks again
            rid, memory = self.resend.pop(kid)
            self.pending[kid] = rid
            self.call("acquire", kid, rid, self.now, memory=memory)

    def stale_release(self, kid: str, gpu: float) -> None:
        """The cell that ran across the restart ends; its release names a lease of the previous
        run (before the kernel rejoined, it is refused and the hello then says it is idle)."""
        rid = self.stale.pop(kid)
        if kid in self.unjoined:
            self.unjoined[kid]["running"] = False
            return
        device = self.core.kernels[kid].device
        gpu_bytes = int(self.devices[device].total_bytes * gpu) if device is not None else None
        known = booking_of(self.core.kernels[kid])
        self.call(
            "release", kid, rid, self.now, peak_bytes=gpu_bytes, gpu_bytes=gpu_bytes,
            call=Call(fact=True),
        )  # fmt: skip
        if device is not None and gpu_bytes > known:  # (a cell without a lease has no bound)
            self.held_by_facts[device] += gpu_bytes - known
        kernel = self.core.kernels[kid]
        assert kernel.lease is None and kernel.state != S.RUNNING, kernel

    @rule(
        seconds=st.sampled_from([0.5, 7, 60, 121, 3600, 5 * 3600, "midnight"]),
        spill=st.one_of(st.none(), st.tuples(picks, fractions)),
        report=st.one_of(st.none(), reports),
    )
    def advance(
        self, seconds: float | str, spill: tuple[int, float] | None, report: Report | None
    ) -> None:
        """Time passes (the service ticks); host memory may run short and a copy spill to disk;
        meanwhile a kernel may finish what it was doing."""
        if seconds == "midnight":
            self.now = (self.day + 1) * DAY + 1
        else:
            self.now += seconds
        self.tick()
        if report is not None and self.in_state(*IN_FLIGHT):
            self.kernel_report(report)
        if spill is not None:
            self.spill(*spill)

    def tick(self) -> None:
        day = int(self.now // DAY)
        if day != self.day:
            self.day = day
            self.usage.clear()
        self.call("tick", self.now)
        self.tell_positions()
        if self.policy.idle_timeout:
            for kid in self.alive:
                kernel = self.core.kernels[kid]
                if (
                    kernel.state == S.RESIDENT
                    and not (kernel.pinned or kernel.refused)
                    and kernel.stalled_since is None  # it would not answer
                    and self.now - kernel.last_activity >= self.policy.idle_timeout
                ):
                    raise AssertionError(f"{kid} idle past the timeout but still resident")
        for user in set(self.usage) | set(self.core.usage_today):
            expected = self.usage.get(user, 0.0)
            assert self.core.usage_today.get(user, 0.0) == pytest.approx(expected), user

    def tell_positions(self) -> None:
        """The service tells the cells that moved up the queue where they wait now (decisions
        tell only new waits and changed reasons): then every waiting request knows its place."""
        self.check_actions(self.core.positions(), Call())
        for place, request in enumerate(self.core.queue(), 1):
            assert request.position == place, (request, place)

    def set_quotas(self, config: dict | None) -> None:
        self.call("set_quotas", Quotas.parse(config), self.now)

    # ---------------------------------------------------------------------------- invariants

    @invariant()
    def memory_never_overcommitted(self) -> None:
        if not hasattr(self, "core"):
            return
        booked = dict.fromkeys(self.devices, 0)
        for kernel in self.core.kernels.values():
            if kernel.device is not None:
                booked[kernel.device] += booking_of(kernel)
        for index, info in self.devices.items():
            assert booked[index] <= info.total_bytes or index in self.excess, (index, booked)
        assert booked == self.core.device_bookings()

    @invariant()
    def pinned_pools_within_bounds(self) -> None:
        if not hasattr(self, "core"):
            return
        allowances = [k.pool_allowance for k in self.core.kernels.values()]
        assert sum(allowances) == self.core.pool_allowances
        assert all(a <= self.policy.pinned_per_kernel for a in allowances)
        if self.policy.pinned_total is not None:
            assert self.core.pool_allowances <= self.policy.pinned_total

    @invariant()
    def kernels_match_the_model(self) -> None:
        if not hasattr(self, "core"):
            return
        assert set(self.core.kernels) == set(self.alive)
        assert not self.gone & set(self.core.kernels)
        for kid, kernel in self.core.kernels.items():
            # (a cell's request may wait while the kernel's explicit restore runs)
            assert kernel.request is None or kernel.lease is None or not kernel.lease.hold, kernel
            assert (kernel.lease is not None) == (kid in self.leases), (kernel, self.leases)
            if kernel.lease is not None:
                assert kernel.lease.request_id == self.leases[kid].request_id
                assert kernel.device == kernel.lease.device
                assert kernel.state in (S.RUNNING, S.RESTORING)
            assert (kernel.request is not None) == (kid in self.pending), (kernel, self.pending)
            if kernel.request is not None:
                assert kernel.request.request_id == self.pending[kid]
            assert (kernel.state == S.OFFLOADING) == (kid in self.offloading), kernel
            if kid not in self.unjoined:  # (the core knows nothing of it yet)
                assert kernel.host_bytes + kernel.disk_bytes == self.saved.get(kid, 0), kernel
            if kernel.state in (S.RUNNING, S.RESIDENT, S.OFFLOADING, S.RESTORING):
                assert kernel.device is not None, kernel
            if kernel.state == S.QUEUED:
                assert kernel.request is not None, kernel

    @invariant()
    def host_memory_within_budget(self) -> None:
        """Host copies and the room reserved for offloads in flight never exceed the pool's
        host_memory_limit; a user over their host_memory quota (lowered, say) has every copy that
        can move on its way to disk."""
        if not hasattr(self, "core"):
            return
        kernels = self.core.kernels.values()
        reserved = {k: self.host_limits[k] or 0 for k in self.offloading}
        held = sum(k.host_bytes for k in kernels) + sum(reserved.values())
        assert held == self.core.host_held, (held, self.core.host_held)
        if self.policy.host_memory_limit and not self.host_over:
            assert held <= self.policy.host_memory_limit, self.core.snapshot(self.now)
        for user in set(self.alive.values()):
            quota = self.core.limits(user, USERS[user]).host_memory
            mine = [k for k in kernels if k.user == user]
            staying = [k for k in mine if k.host_bytes and k.kernel_id not in self.spilling]
            kept = sum(k.host_bytes for k in staying) + sum(
                reserved.get(k.kernel_id, 0) for k in mine
            )
            if quota is not None and kept > quota:
                movable = [
                    k
                    for k in staying
                    if k.state in SPILLABLE_STATES and k.lease is None and not k.spill_refused
                ]
                assert not movable, (user, quota, kept, movable)

    @invariant()
    def every_waiting_request_is_served(self) -> None:
        """Liveness: when nothing is running or moving, nobody is left waiting."""
        if not hasattr(self, "core"):
            return
        kernels = self.core.kernels.values()
        moving = (S.OFFLOADING, S.RESTORING)
        if self.core.closed_devices() or any(k.stalled_since is not None for k in kernels):
            return  # they may hold what a request waits for, until they answer again
        # (a cell of the broker's previous run runs without a lease: see broker.rejoin)
        if not any(k.lease is not None or k.state in (S.RUNNING, *moving) for k in kernels):
            assert self.core.queue() == [], self.core.snapshot(self.now)


BrokerMachine.TestCase.settings = settings(
    # BROKER_CORE_EXAMPLES=5000 for a deeper search by hand; the default keeps the file fast
    max_examples=int(os.environ.get("BROKER_CORE_EXAMPLES", "200")),
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestBrokerMachine = BrokerMachine.TestCase


def test_a_restore_with_nothing_to_copy_may_be_evicted_by_the_cell_behind_it():
    """Found by the state machine: a user's restore of a kernel whose lease was revoked (no state
    to copy) is granted, and the cell queued behind it evicts that idle kernel in the same
    decision; the Offload names the device the Grant just gave it."""
    state = BrokerMachine()
    policy = Policy(
        idle_timeout=0.0,
        migration=False,
        pinned_per_kernel=0,
        pinned_total=None,
        host_memory_limit=0,
    )
    state.setup(shape="2x16GiB", config=None, policy=policy, users=["alice"] * 4)
    state.acquire(any_kernel=False, index=0, memory=None)
    state.lifecycle(die=False, index=0, user="alice")
    state.acquire(any_kernel=False, index=0, memory=GiB // 2)
    state.watchdog(index=1, kind="stall")
    state.acquire(any_kernel=False, index=0, memory=None)
    state.lifecycle(die=True, index=0, user="alice")
    state.acquire(any_kernel=False, index=0, memory=GiB // 2)
    state.watchdog(index=0, kind="revoke")
    state.watchdog(index=0, kind="answer")
    state.user_request(any_state=False, index=0, kind="restore")
    state.acquire(any_kernel=False, index=0, memory=None)
    evicting = len(state.offloading)
    state.watchdog(index=1, kind="stall")
    assert len(state.offloading) == evicting + 1
    state.teardown()
