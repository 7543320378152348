"""A swap against its two copies, on simulated devices, through real kernels and a real pool.

Two kernels of ``--mib`` MiB each (tensors of ``--tensor-mib``) share one simulated device that
holds only one of them. Each round, in the same run:

1. the components, one after the other: the resident kernel is offloaded (``offload_s``, the
   kernel's own measure), then the other restored (``restore_s``), both on request;
2. a swap: a cell of the kernel now offloaded evicts the other one, and is timed from
   ``execute_request`` to its first output (``swap_s``: lease, both copies, the cell's start).

Without pipelining a swap costs about ``offload_s + restore_s``; with it the victim frees each
storage as its copy ends and the incoming kernel restores into that room meanwhile (see
``jupyter_singularity.broker.swaps``), so about the larger of the two. Goal (issue 13):
``swap_s / (offload_s + restore_s) <= 0.6``; min / median / max over ``--runs`` runs (each the
median of ``--rounds`` rounds). The two copies run in two processes: it needs two free cores.

Run: ``python bench/swap_pipeline.py [--mib 1024] [--tensor-mib 64] [--runs 3] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics

from cell_overhead import cell, first_output, printed, start, wait_state
from embedded_pool import embedded_pool

GOAL = 0.6
STATE = "import torch\nxs = [torch.ones({tensor_mib} << 18) for _ in range({count})]"
LOG = "%singularity log"
SECONDS = re.compile(r"(offloaded|restored) .* in ([0-9.]+) s")


async def last_transfer(client, kind: str) -> float:
    """Seconds of the kernel's last ``offloaded``/``restored`` transfer, from its own log (a
    cell of ``%singularity`` magics only: it takes no lease, so it moves nothing)."""
    for verb, seconds in SECONDS.findall(await printed(client, LOG)):
        if verb == kind:
            return float(seconds)
    raise AssertionError(f"no {kind} transfer in the kernel's log")


async def one_run(mib: int, tensor_mib: int, rounds: int) -> dict:
    async with embedded_pool(f"simulated:1x{2 * mib}MiB") as service:
        kernels = [await start("singularity-provisioner") for _ in range(2)]
        try:
            state = STATE.format(tensor_mib=tensor_mib, count=mib // tensor_mib)
            for _, client in kernels:
                await cell(client, state)  # the second evicts the first
            (a_manager, a), (b_manager, b) = kernels
            await wait_state(service, a_manager.kernel_id, "offloaded")
            samples: dict[str, list[float]] = {"offload_s": [], "restore_s": [], "swap_s": []}
            for _ in range(rounds):
                service.offload(b_manager.kernel_id)
                await wait_state(service, b_manager.kernel_id, "offloaded")
                samples["offload_s"].append(await last_transfer(b, "offloaded"))
                service.restore(a_manager.kernel_id)
                await wait_state(service, a_manager.kernel_id, "resident")
                samples["restore_s"].append(await last_transfer(a, "restored"))
                seconds, _ = await first_output(b, "print('swapped')")  # evicts a
                samples["swap_s"].append(seconds)
                await wait_state(service, a_manager.kernel_id, "offloaded")
        finally:
            for manager, client in kernels:
                client.stop_channels()
                await manager.shutdown_kernel(now=True)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    medians["ratio"] = medians["swap_s"] / (medians["offload_s"] + medians["restore_s"])
    return medians


async def run(mib: int, tensor_mib: int, runs: int, rounds: int) -> dict:
    results = [await one_run(mib, tensor_mib, rounds) for _ in range(runs)]

    def spread(name: str) -> list[float]:
        values = sorted(result[name] for result in results)
        return [round(values[0], 3), round(statistics.median(values), 3), round(values[-1], 3)]

    return {
        "state_mib": mib,
        "tensor_mib": tensor_mib,
        "runs": runs,
        "rounds_per_run": rounds,
        "offload_s_min_median_max": spread("offload_s"),
        "restore_s_min_median_max": spread("restore_s"),
        "swap_s_min_median_max": spread("swap_s"),
        "swap_over_offload_plus_restore_min_median_max": spread("ratio"),
        "goal_swap_over_offload_plus_restore": GOAL,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=1024, help="state of each kernel, MiB")
    parser.add_argument("--tensor-mib", type=int, default=64, help="size of each tensor, MiB")
    parser.add_argument("--runs", type=int, default=3, help="runs (min / median / max)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (median)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.mib, args.tensor_mib, args.runs, args.rounds)), indent=2))


if __name__ == "__main__":
    main()
