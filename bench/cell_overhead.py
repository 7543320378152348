"""What the kernel runtime adds to a trivial cell: pooled kernel (a lease per cell) vs plain kernel.

Starts the broker service (one simulated device) and four real IPython kernels through
jupyter_client: plain ones (local provisioner, no runtime) and pooled ones (the pool's provisioner,
runtime loaded), one of each with torch imported and one without. On simulated devices importing
torch makes a kernel a GPU user, so every cell of the pooled torch kernel is gated: acquire (a round
trip to the broker, sent when ipykernel dispatches the request) at the top, release (one message) at
the end, with the footprint check. The pair without torch shows what the runtime costs a kernel that
never uses a GPU (its gate is a no-op). It times N trivial cells on each, interleaved, from ``execute_request`` to
the reply and the kernel back to idle, as a frontend sees it, and reports p50/p99 of each and the
differences, all from the same run.
Goal (issue 3): <= 1 ms added at p50 (``added_p50_ms``). Run: ``python bench/cell_overhead.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from embedded_pool import embedded_pool
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

SETUP = "import torch\nx = torch.ones(2**22)"
CHECK_POOLED = (
    "from jupyter_singularity.kernel.runtime import Runtime\n"
    "assert Runtime.current is not None and Runtime.current.gpu_used, 'runtime not gating'"
)
TRIVIAL = "pass"


async def start(provisioner: str) -> tuple[AsyncKernelManager, object]:
    KernelProvisionerFactory.instance().default_provisioner_name = provisioner
    manager = AsyncKernelManager(kernel_name="python3")
    await manager.start_kernel()
    client = manager.client()
    client.start_channels()
    await client.wait_for_ready(timeout=60)
    return manager, client


async def cell(client, code: str) -> float:
    started = time.perf_counter()
    reply = await client.execute_interactive(code, timeout=60, output_hook=lambda msg: None)
    elapsed = time.perf_counter() - started
    assert reply["content"]["status"] == "ok", reply["content"]
    return elapsed


def summary(samples: list[float]) -> dict:
    cuts = statistics.quantiles(samples, n=100)
    return {"p50_ms": round(cuts[49] * 1e3, 3), "p99_ms": round(cuts[98] * 1e3, 3)}


async def run(n: int, warmup: int) -> dict:
    async with embedded_pool() as service:
        kernels = []
        try:
            for provisioner in ("local-provisioner", "singularity-provisioner") * 2:
                kernels.append(await start(provisioner))
            plain, pooled, plain_cpu, pooled_cpu = kernels
            for _, client in (plain, pooled):
                await cell(client, SETUP)
            await cell(pooled[1], CHECK_POOLED)
            began = time.time()
            named = {
                "plain": plain[1],
                "pooled": pooled[1],
                "plain_no_gpu": plain_cpu[1],
                "pooled_no_gpu": pooled_cpu[1],
            }
            times: dict[str, list[float]] = {name: [] for name in named}
            for i in range(warmup + n):
                order = list(named.items())
                order = order[i % 4 :] + order[: i % 4]
                for name, client in order:
                    elapsed = await cell(client, TRIVIAL)
                    if i >= warmup:
                        times[name].append(elapsed)
            await asyncio.sleep(0.2)
            leases = len(
                service.ledger.leases(since=began, until=time.time(), limit=10 * (n + warmup))
            )
        finally:
            for manager, client in kernels:
                client.stop_channels()
                await manager.shutdown_kernel(now=True)
    result = {name: summary(samples) for name, samples in times.items()}
    result["added_p50_ms"] = round(result["pooled"]["p50_ms"] - result["plain"]["p50_ms"], 3)
    result["added_p99_ms"] = round(result["pooled"]["p99_ms"] - result["plain"]["p99_ms"], 3)
    result["added_p50_no_gpu_ms"] = round(
        result["pooled_no_gpu"]["p50_ms"] - result["plain_no_gpu"]["p50_ms"], 3
    )
    result["cells_each"] = n
    result["leases_taken"] = leases
    result["goal_added_p50_ms"] = 1.0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=1000, help="timed cells per kernel")
    parser.add_argument("--warmup", type=int, default=50, help="untimed cells per kernel first")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.n, args.warmup)), indent=2))


if __name__ == "__main__":
    main()
