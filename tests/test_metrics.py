"""The pool's Prometheus metrics after real kernels moved real (simulated-device) state: every
sample names its node, and queue waits, transfers and users' groups are counted."""

from __future__ import annotations

import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jupyter_singularity.broker.identity import server_owner

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
