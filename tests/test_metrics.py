"""The pool's Prometheus metrics after real kernels moved real (simulated-device) state: every
sample names its node, and queue waits, transfers and users' groups are counted."""

from __future__ import annotations

import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jupyter_singularity.broker.identity import server_owner
from jupyter_singularity.broker.metrics import PoolMeter
from jupyter_singularity.broker.model import Grant, KernelState, StateChanged

MiB = 1 << 20
HOLD = "import torch\nx = torch.ones({mib} * 2**20 // 4)\nprint('held')"


@pytest.fixture
def singularity_devices() -> str:
    """One device: a second kernel's first GPU cell (it reserves the whole device) evicts the
    first kernel's state, and the first one's next cell brings it back."""
    return "simulated:1x256MiB"


def samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(found: list, name: str, **labels: str) -> float:
    for sample in found:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    raise AssertionError(f"no sample {name} {labels}")


async def test_metrics_count_waits_and_transfers_and_name_the_node(
    start_kernel, wait_in_pool, run, state, jp_fetch
):
    k1, k2 = await start_kernel(), await start_kernel()
    await wait_in_pool([k1, k2])
    status, out, _ = await run(k1, HOLD.format(mib=40))
    assert status == "ok" and "held" in out, out
    status, out, _ = await run(k2, HOLD.format(mib=40))  # waits while k1 is offloaded
    assert status == "ok" and "held" in out, out
    await state(k1, "offloaded", "spilled")
    status, out, _ = await run(k1, "print(int(x.sum()))")  # restored first
    assert status == "ok" and str(40 * MiB // 4) in out, out
    await state(k1, "resident")

    found = samples((await jp_fetch("singularity", "metrics")).body.decode())

    assert found and {s.labels.get("node") for s in found} == {socket.gethostname()}
    for direction in ("offload", "restore"):
        assert value(found, "singularity_transfer_bytes_total", direction=direction) >= 40 * MiB
        assert value(found, "singularity_transfer_seconds_count", direction=direction) >= 1
        assert value(found, "singularity_transfer_seconds_sum", direction=direction) > 0
    assert value(found, "singularity_transfer_bytes_total", direction="spill") == 0
    # Every granted cell counts once, 0 s if it did not queue; k2's waited for k1's offload.
    assert value(found, "singularity_queue_wait_seconds_count") >= 3
    assert value(found, "singularity_queue_wait_seconds_sum") > 0
    assert value(found, "singularity_queue_wait_seconds_bucket", le="+Inf") == value(
        found, "singularity_queue_wait_seconds_count"
    )
    assert value(found, "singularity_device_leases", device="0") == 0
    owner = server_owner()
    for group in owner.groups:
        assert value(found, "singularity_user_group_info", user=owner.user, group=group) == 1
    assert value(found, "singularity_gpu_seconds_today", user=owner.user) > 0


def test_the_meter_counts_each_grant_once_and_forgets_a_denied_wait() -> None:
    meter = PoolMeter()
    queued = KernelState.QUEUED

    def change(kernel: str, old: KernelState | None, new: KernelState | None, at: float):
        return StateChanged(kernel, "ann", old, new, 0, "", at)

    meter.state_changed(change("k1", KernelState.OFFLOADED, queued, 100.0), None)
    meter.state_changed(change("k2", KernelState.COLD, queued, 100.0), None)
    # The core emits a grant before the state change that leaves the queue.
    meter.granted(Grant("k1", "r1", 0, 1 << 30, True, 102.5), "ann", ("lab", "ml"))
    meter.state_changed(
        change("k1", queued, KernelState.RESTORING, 102.5), {"nbytes": 5, "seconds": 0.3}
    )
    meter.state_changed(
        change("k1", KernelState.RESTORING, KernelState.RUNNING, 103.0),
        {"nbytes": 1 << 30, "seconds": 0.5},
    )
    meter.state_changed(change("k2", queued, KernelState.COLD, 104.0), None)  # denied
    meter.granted(Grant("k2", "r2", 0, 1 << 30, False, 110.0, hold=True), "bob", ())
    meter.granted(Grant("k3", "r3", 0, 1 << 30, False, 111.0, hold=False), "bob", ())

    # Cells: k1 waited 2.5 s, k2's next cell none (its denied wait is not carried over); k3's
    # explicit restore is no cell.
    assert meter.queue_wait.total == 2.5
    assert dict(meter.queue_wait.buckets())["2.5"] == 2  # le: a wait on a bound counts there
    assert dict(meter.queue_wait.buckets())["1.0"] == 1
    assert dict(meter.queue_wait.buckets())["+Inf"] == 2
    # A spill reported as a queued kernel leaves the queue counts as a spill.
    assert meter.transfer_bytes == {"offload": 0, "restore": 1 << 30, "spill": 5}
    assert dict(meter.transfer_seconds["restore"].buckets())["0.5"] == 1
    assert meter.groups == {"ann": ("lab", "ml"), "bob": ()}
