"""Lease round trip from a real kernel process: acquire + release, as a GPU cell would do them.

Starts a pool (simulated devices) and a real IPython kernel through jupyter_client with the pool's
provisioner, then times, inside the kernel, N acquire+release pairs over the signed RPC channel.
Twice in one run: with the broker embedded in this process, and with the node broker (``jupyter
singularity broker`` as its own process, joined the way a server joins it). Goals: p50 <= 1 ms
(issue: foundation); through the node broker p50 <= 1 ms and <= 1.2x embedded (issue: node broker).

Those requests never queue (1 GiB asked of a 16 GiB device). The contended variant (embedded) runs
two kernels that each ask for the whole device, N times, releasing each lease as soon as it is
granted: a request is then queued behind the other kernel's lease, and its grant comes only once
the broker received and carried out that release (the release is awaited, not fire-and-forget).
Each kernel times its acquires (send to grant) and counts those the broker said were queued.
Goal (issue 13): contended p50 <= 2x the uncontended round trip of the same run (a queued grant
waits for one release, one message, and is then pushed as the reply).
Run: ``python bench/lease_roundtrip.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager as AsyncContextManager
from typing import Any

from embedded_pool import embedded_pool, node_pool
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

KERNEL_CODE = """
import json, statistics, time
from jupyter_singularity.kernel.runtime import Runtime
client = Runtime.current.client
samples = []
for i in range({n}):
    started = time.perf_counter()
    grant = client.request("acquire", {{"request_id": f"bench-{{i}}", "memory": 1 << 30}})
    client.send("release", {{"request_id": f"bench-{{i}}", "peak_bytes": 1 << 29, "gpu_bytes": 1 << 28}})
    samples.append(time.perf_counter() - started)
    assert grant["granted"], grant
cuts = statistics.quantiles(samples, n=100)
print(json.dumps({{"p50_ms": cuts[49] * 1e3, "p99_ms": cuts[98] * 1e3, "n": len(samples)}}))
"""


CONTENDED_CODE = """
import json, statistics, time
from jupyter_singularity.kernel.runtime import Runtime
client = Runtime.current.client
queued = set()
client.on("queued", lambda body: queued.add(body.get("request_id")) or None)
samples = []
for i in range({n}):
    request_id = f"contended-{{i}}"
    started = time.perf_counter()
    grant = client.request("acquire", {{"request_id": request_id, "memory": {memory}}}, timeout=60)
    samples.append(time.perf_counter() - started)
    assert grant["granted"], grant
    client.send("release", {{"request_id": request_id, "peak_bytes": 1 << 20, "gpu_bytes": 0}})
client.on("queued", Runtime.current.on_queued)
cuts = statistics.quantiles(samples, n=100)
print(json.dumps({{"p50_ms": cuts[49] * 1e3, "p99_ms": cuts[98] * 1e3, "n": len(samples),
                  "queued": len(queued)}}))
"""
DEVICE = 16 << 30


async def run(n: int, pool: Callable[[], AsyncContextManager[Any]]) -> dict:
    _OUTPUT.clear()
    async with pool():
        KernelProvisionerFactory.instance().default_provisioner_name = "singularity-provisioner"
        manager = AsyncKernelManager(kernel_name="python3")
        await manager.start_kernel()
        client = manager.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=60)
            reply = await client.execute_interactive(
                KERNEL_CODE.format(n=n), timeout=300, output_hook=_collect
            )
            assert reply["content"]["status"] == "ok", reply["content"]
        finally:
            client.stop_channels()
            await manager.shutdown_kernel(now=True)
    return json.loads(_OUTPUT[-1])


async def run_contended(n: int) -> dict:
    """Two kernels, each asking for the whole device; every acquire waits for the other's release."""
    _OUTPUT.clear()
    async with embedded_pool():
        KernelProvisionerFactory.instance().default_provisioner_name = "singularity-provisioner"
        kernels = []
        try:
            for _ in range(2):
                manager = AsyncKernelManager(kernel_name="python3")
                await manager.start_kernel()
                client = manager.client()
                client.start_channels()
                kernels.append((manager, client))
                await client.wait_for_ready(timeout=60)
            code = CONTENDED_CODE.format(n=n, memory=DEVICE)
            replies = await asyncio.gather(
                *(
                    client.execute_interactive(code, timeout=600, output_hook=_collect)
                    for _, client in kernels
                )
            )
            for reply in replies:
                assert reply["content"]["status"] == "ok", reply["content"]
        finally:
            for manager, client in kernels:
                client.stop_channels()
                await manager.shutdown_kernel(now=True)
    each = [json.loads(line) for line in _OUTPUT[-2:]]
    return {
        "p50_ms": statistics.median(k["p50_ms"] for k in each),
        "p99_ms": max(k["p99_ms"] for k in each),
        "acquires": sum(k["n"] for k in each),
        "queued_share": round(sum(k["queued"] for k in each) / sum(k["n"] for k in each), 3),
    }


_OUTPUT: list[str] = []


def _collect(msg: dict) -> None:
    if msg["msg_type"] == "stream":
        _OUTPUT.extend(line for line in msg["content"]["text"].splitlines() if line.startswith("{"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=2000, help="round trips")
    args = parser.parse_args()
    embedded = asyncio.run(run(args.n, embedded_pool))
    node = asyncio.run(run(args.n, node_pool))
    contended = asyncio.run(run_contended(args.n // 2))
    ratio = node["p50_ms"] / embedded["p50_ms"]
    print(
        json.dumps(
            {
                "embedded": {**embedded, "goal_p50_ms": 1.0},
                "node_broker": {**node, "goal_p50_ms": 1.0},
                "node_over_embedded_p50": round(ratio, 3),
                "goal_node_over_embedded_p50": 1.2,
                "contended": contended,
                "contended_over_embedded_p50": round(contended["p50_ms"] / embedded["p50_ms"], 3),
                "goal_contended_over_embedded_p50": 2.0,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
