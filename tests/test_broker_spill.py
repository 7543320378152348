"""The broker core's spill decisions: host memory over budget moves the coldest host copies to disk."""

from __future__ import annotations

from jupyter_singularity.broker.core import BrokerCore
from jupyter_singularity.broker.model import KernelState, Offload, Policy, Spill
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


def test_a_kernel_waiting_to_run_is_not_spilled():
    core = make_core(limit=4 * GiB)
    core.register("k", "alice", 0)
    core.acquire("k", "c1", 0, memory=6 * GiB)
    core.release("k", "c1", 1, peak_bytes=6 * GiB, gpu_bytes=6 * GiB)
    core.offload("k", 2)
    # Its next cell asks for the GPU while the offload is in flight: spilling now would only
    # make the coming restore slower.
    core.acquire("k", "c2", 3)
    assert spills(core.offloaded("k", 4, host_bytes=6 * GiB)) == []
