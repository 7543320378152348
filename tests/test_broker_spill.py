"""The broker core's spill decisions: host memory over budget moves the coldest host copies to disk."""

from __future__ import annotations

from jupyter_singularity.broker.core import BrokerCore
from jupyter_singularity.broker.model import Deny, Grant, KernelState, Offload, Policy, Spill
from jupyter_singularity.broker.quotas import Quotas
from jupyter_singularity.devices import DeviceInfo

GiB = 1 << 30


def offloaded_kernel(core: BrokerCore, kernel_id: str, user: str, nbytes: int, now: float) -> list:
    """Register, run one cell holding ``nbytes``, offload it; returns the actions of the offload."""
    core.register(kernel_id, user, now)
    core.acquire(kernel_id, "c1", now, memory=nbytes)
    core.release(kernel_id, "c1", now + 1, peak_bytes=nbytes, gpu_bytes=nbytes)
    actions = core.offload(kernel_id, now + 2)
    assert any(isinstance(a, Offload) for a in actions)
    return core.offloaded(kernel_id, now + 3, host_bytes=nbytes)


def one(actions: list, cls: type):
    found = [a for a in actions if isinstance(a, cls)]
    assert len(found) == 1, f"expected one {cls.__name__} in {actions}"
    return found[0]


def spills(actions: list) -> list[str]:
    return [a.kernel_id for a in actions if isinstance(a, Spill)]


def make_core(limit: int, quotas: dict | None = None) -> BrokerCore:
    devices = [DeviceInfo(0, "SIM-0", "Simulated GPU", "simulated", 64 * GiB)]
    return BrokerCore(devices, Quotas.parse(quotas), Policy(host_memory_limit=limit))


def test_host_budget_spills_least_recently_used_first():
    core = make_core(limit=10 * GiB)
    assert spills(offloaded_kernel(core, "old", "alice", 6 * GiB, now=0)) == []
    actions = offloaded_kernel(core, "new", "bob", 6 * GiB, now=100)
    assert spills(actions) == ["old"]
    assert core.kernels["old"].state == KernelState.OFFLOADED  # until the kernel reports
    # Reported: the host copy is on disk now, and nothing more needs to move.
    actions = core.spilled("old", 104, host_bytes=0, disk_bytes=6 * GiB)
    assert core.kernels["old"].state == KernelState.SPILLED
    assert core.kernels["old"].disk_bytes == 6 * GiB
    assert spills(actions) == []


def test_spilled_kernel_restores_from_disk_on_its_next_cell():
    core = make_core(limit=4 * GiB)
    spilled = offloaded_kernel(core, "k", "alice", 6 * GiB, now=0)
    assert spills(spilled) == ["k"]
    core.spilled("k", 5, host_bytes=0, disk_bytes=6 * GiB)
    grant = next(a for a in core.acquire("k", "c2", 10) if type(a).__name__ == "Grant")
    assert grant.restore is True
    assert grant.reservation >= 6 * GiB
    core.restored("k", 11, gpu_bytes=6 * GiB)
    kernel = core.kernels["k"]
    assert (kernel.state, kernel.host_bytes, kernel.disk_bytes) == (KernelState.RUNNING, 0, 0)


def test_user_host_quota_spills_only_that_users_kernels():
    core = make_core(limit=0, quotas={"user:alice": {"host_memory": "4GiB"}})
    assert spills(offloaded_kernel(core, "b1", "bob", 6 * GiB, now=0)) == []
    assert spills(offloaded_kernel(core, "a1", "alice", 3 * GiB, now=10)) == []
    assert spills(offloaded_kernel(core, "a2", "alice", 3 * GiB, now=20)) == ["a1"]


def test_failed_spill_keeps_host_copy_and_is_not_retried_until_restore():
    core = make_core(limit=4 * GiB)
    assert spills(offloaded_kernel(core, "k", "alice", 6 * GiB, now=0)) == ["k"]
    actions = core.spill_failed("k", "disk full", 5)
    kernel = core.kernels["k"]
    assert (kernel.state, kernel.host_bytes) == (KernelState.OFFLOADED, 6 * GiB)
    assert spills(actions) == []
    assert spills(core.tick(6)) == []


def test_a_partial_spill_is_not_asked_again_until_the_kernel_runs():
    core = make_core(limit=4 * GiB)
    assert spills(offloaded_kernel(core, "k", "alice", 6 * GiB, now=0)) == ["k"]
    # Its pinned pool had to stay (the driver holds the process): 2 GiB stay in memory.
    assert spills(core.spilled("k", 5, host_bytes=2 * GiB, disk_bytes=4 * GiB)) == []
    assert spills(core.tick(6)) == []
    assert core.kernels["k"].to_dict()["state"] == "offloaded"
    core.acquire("k", "c2", 10)
    core.restored("k", 11, gpu_bytes=6 * GiB)
    core.release("k", "c2", 12, peak_bytes=6 * GiB, gpu_bytes=6 * GiB)
    core.offload("k", 13)
    assert spills(core.offloaded("k", 14, host_bytes=6 * GiB)) == ["k"]  # asked again


def running_cell(core: BrokerCore, kernel_id: str, nbytes: int, now: float) -> None:
    """Register a kernel and start a cell that holds ``nbytes`` of the device until it ends."""
    core.register(kernel_id, "bob", now)
    assert any(isinstance(a, Grant) for a in core.acquire(kernel_id, "c1", now, memory=nbytes))


def test_a_queued_kernels_host_copy_spills_too():
    """Under load the kernels whose host copies fill the budget are waiting to run: they spill."""
    core = make_core(limit=0, quotas={"user:alice": {"host_memory": "8GiB"}})
    assert spills(offloaded_kernel(core, "a1", "alice", 6 * GiB, now=0)) == []
    running_cell(core, "b1", 60 * GiB, now=10)  # the device is busy: a1's next cell waits
    core.acquire("a1", "c2", 11)
    assert core.kernels["a1"].state == KernelState.QUEUED

    actions = core.set_quotas(Quotas.parse({"user:alice": {"host_memory": "2GiB"}}), 12)

    assert spills(actions) == ["a1"]
    actions = core.spilled("a1", 13, host_bytes=0, disk_bytes=6 * GiB)
    kernel = core.kernels["a1"]
    assert (kernel.state, kernel.host_bytes, kernel.disk_bytes) == (
        KernelState.QUEUED,  # still waiting for its turn, now restored from disk
        0,
        6 * GiB,
    )
    assert spills(actions) == [] and core.host_held == 0


def test_a_kernel_that_kept_more_than_its_room_is_spilled_even_while_queued():
    core = make_core(limit=4 * GiB)
    running_cell(core, "b1", 40 * GiB, now=0)
    core.register("k", "alice", 0)
    core.acquire("k", "c1", 0, memory=6 * GiB)
    core.release("k", "c1", 1, peak_bytes=6 * GiB, gpu_bytes=6 * GiB)
    offload = one(core.offload("k", 2), Offload)
    assert offload.host_limit == 4 * GiB
    core.acquire("k", "c2", 3, memory=30 * GiB)  # waits for b1's cell

    # (A kernel that ignored its host_limit, say an older runtime.)
    actions = core.offloaded("k", 4, host_bytes=6 * GiB)

    assert core.kernels["k"].state == KernelState.QUEUED
    assert spills(actions) == ["k"]


def test_an_offload_keeps_only_the_room_left_and_the_rest_goes_to_disk():
    core = make_core(limit=10 * GiB)
    assert spills(offloaded_kernel(core, "old", "alice", 6 * GiB, now=0)) == []
    for kid in ("k1", "k2"):
        core.register(kid, "bob", 10)
        core.acquire(kid, "c1", 10, memory=8 * GiB)
        core.release(kid, "c1", 11, peak_bytes=8 * GiB, gpu_bytes=8 * GiB)

    first = one(core.offload("k1", 12), Offload)
    second = one(core.offload("k2", 12), Offload)

    # 4 GiB are left beside the 6 GiB host copy; k1's offload holds them until it reports.
    assert (first.host_limit, second.host_limit) == (4 * GiB, 0)
    assert core.host_held == 10 * GiB
    assert spills(core.offloaded("k2", 13, host_bytes=0, disk_bytes=8 * GiB)) == []
    assert spills(core.offloaded("k1", 14, host_bytes=4 * GiB, disk_bytes=4 * GiB)) == []
    k1, k2 = core.kernels["k1"], core.kernels["k2"]
    assert (k1.state, k1.host_bytes, k1.disk_bytes) == (KernelState.OFFLOADED, 4 * GiB, 4 * GiB)
    assert (k2.state, k2.host_bytes, k2.disk_bytes) == (KernelState.SPILLED, 0, 8 * GiB)
    assert core.host_held == 10 * GiB
    # The old kernel runs again: its host copy leaves memory once restored, and room is back.
    core.acquire("old", "c2", 20)
    core.restored("old", 21, gpu_bytes=6 * GiB)
    core.release("old", "c2", 22, peak_bytes=6 * GiB, gpu_bytes=6 * GiB)
    assert one(core.offload("old", 23), Offload).host_limit == 6 * GiB


def test_an_offload_gets_no_more_room_than_its_users_host_quota_leaves():
    core = make_core(limit=100 * GiB, quotas={"user:alice": {"host_memory": "5GiB"}})
    assert spills(offloaded_kernel(core, "a1", "alice", 3 * GiB, now=0)) == []
    core.register("a2", "alice", 10)
    core.acquire("a2", "c1", 10, memory=8 * GiB)
    core.release("a2", "c1", 11, peak_bytes=8 * GiB, gpu_bytes=8 * GiB)
    assert one(core.offload("a2", 12), Offload).host_limit == 2 * GiB


def test_an_offload_that_fits_neither_host_memory_nor_disk_is_refused_with_the_reason():
    core = make_core(limit=GiB)
    core.register("idle", "alice", 0)
    core.acquire("idle", "c1", 0, memory=40 * GiB)
    core.release("idle", "c1", 1, peak_bytes=40 * GiB, gpu_bytes=40 * GiB)
    core.register("new", "bob", 2)

    offload = one(core.acquire("new", "c1", 2, memory=30 * GiB), Offload)
    assert (offload.kernel_id, offload.host_limit) == ("idle", GiB)
    why = "cannot write spill file /spill/idle/t-1.spill (0 bytes written): the disk is full"
    actions = core.offload_failed("idle", why, 3, host_full=True)

    message = (
        "host_memory_limit (1.0 GiB) is full and the spill directory cannot take the rest: " + why
    )
    idle = core.kernels["idle"]
    assert (idle.state, idle.device, idle.gpu_bytes, idle.refused) == (
        KernelState.RESIDENT,  # nothing moved, nothing lost
        0,
        40 * GiB,
        message,
    )
    assert core.host_held == 0  # the room it was given is free again
    denied = one(actions, Deny)  # the waiting cell hears why
    assert denied.kernel_id == "new" and denied.reason.endswith(f"kernel idle stays: {message}")
    assert "\n" not in denied.reason


def test_a_refusal_by_the_users_host_quota_names_the_quota():
    core = make_core(limit=100 * GiB, quotas={"user:alice": {"host_memory": "1GiB"}})
    core.register("k", "alice", 0)
    core.acquire("k", "c1", 0, memory=4 * GiB)
    core.release("k", "c1", 1, peak_bytes=4 * GiB, gpu_bytes=4 * GiB)
    assert one(core.offload("k", 2), Offload).host_limit == GiB
    core.offload_failed("k", "no spill directory is configured\n(spill_dir)", 3, host_full=True)
    assert core.kernels["k"].refused == (
        "the host_memory quota of alice (1.0 GiB) is full and the spill directory cannot take "
        "the rest: no spill directory is configured (spill_dir)"
    )
