"""A swap against its two copies, on simulated devices, through real kernels and a real pool.

Two kernels of ``--mib`` MiB each (tensors of ``--tensor-mib``) share one simulated device of
``--device-mib`` MiB. By default it holds one state and one tensor of the other: nearly all of the
incoming kernel's room is what the victim frees as it goes. With ``--device-mib`` twice the state,
both states fit and only the margin a cell reserves forces the eviction: the incoming kernel then
restores into the room no booking holds, at once. Each round, in the same run:

1. the components, one after the other: the resident kernel is offloaded (``offload_s``, the
   kernel's own measure), then the other restored (``restore_s``), both on request;
2. a swap: a cell of the kernel now offloaded evicts the other one, and is timed from
   ``execute_request`` to its first output (``swap_s``: lease, both copies, the cell's start).

Without pipelining a swap costs about ``offload_s + restore_s``; with it the incoming kernel
restores into the room free on the device at once and into each storage the victim frees as its
copy ends (see ``jupyter_singularity.broker.swaps``), so about the larger of the two. Goal (issue
13): ``swap_s / (offload_s + restore_s) <= 0.6``; min / median / max over ``--runs`` runs (each the
median of ``--rounds`` rounds). The two copies run in two processes: it needs two free cores.

On simulated devices each copy is CPU work, so beside the seconds it says where they went, read
from ``/proc`` for each kernel's process: CPU seconds, user and system (``*_cpu``: the system
time is mostly page faults into fresh memory) and minor page faults, for the offload alone, the
restore alone and each side of the swap; ``overlap_s``, how long both kernels were busy at once
during the swap (sampled every 10 ms); and ``cpu_stall_share``, the share of the run during which
some task on the machine waited for a CPU (``/proc/pressure/cpu``; a shared machine's cores are
not all free). Each side alone already keeps more than one core busy (torch copies large
storages on several threads), so the two sides of a swap share this machine's cores:
``cpu_bound`` is the least ``swap_s / (offload_s + restore_s)`` the cores allow for the CPU time
the swap's two sides spent, ``(victim cpu + incoming cpu) / cores / (offload_s + restore_s)``, in
the same run. Where it exceeds the goal, the goal needs copies that do not run on the CPU (a
GPU's copy engines). Both copies also cross the same memory bus: ``memory_floor`` is the least
ratio it allows, measured in the same run: two copies of ``--mib`` MiB at once, a memmove each on
two threads (as a swap's sides copy on simulated devices), against the same two copies one after
the other, each as torch copies memory alone (on every core); best of three each. A GPU's copies
cross a full-duplex bus, one direction each, where the two sides do not share bandwidth.

Run: ``python bench/swap_pipeline.py [--mib 1024] [--tensor-mib 64] [--device-mib N] [--runs 3]
[--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import re
import statistics
import threading
import time

from cell_overhead import cell, first_output, printed, start, wait_state
from embedded_pool import embedded_pool
from process_cpu import Busy, Usage, cpu_stall, usage

GOAL = 0.6
SECONDS_SAMPLES = ("offload_s", "restore_s", "swap_s", "overlap_s")
CPU_SAMPLES = ("offload_cpu", "restore_cpu", "swap_victim_cpu", "swap_incoming_cpu")
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


def spent(before: Usage, after: Usage) -> dict[str, float]:
    used = after - before
    return {"cpu": used.cpu, "user": used.user, "system": used.system, "faults": used.faults}


def memory_floor(mib: int, tries: int = 3) -> float:
    """The least swap ratio the memory bus allows (see the module docstring)."""
    import torch

    pairs = [(torch.ones(mib << 20, dtype=torch.uint8), torch.zeros(mib << 20, dtype=torch.uint8))]
    pairs.append((pairs[0][0].clone(), pairs[0][1].clone()))

    def memmove(source: torch.Tensor, target: torch.Tensor) -> None:
        ctypes.memmove(target.data_ptr(), source.data_ptr(), target.nbytes)

    def apart() -> float:
        started = time.perf_counter()
        for source, target in pairs:
            target.copy_(source)
        return time.perf_counter() - started

    def at_once() -> float:
        threads = [threading.Thread(target=memmove, args=pair) for pair in pairs]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - started

    return min(at_once() for _ in range(tries)) / min(apart() for _ in range(tries))


async def one_run(mib: int, tensor_mib: int, device_mib: int, rounds: int) -> dict:
    async with embedded_pool(f"simulated:1x{device_mib}MiB") as service:
        kernels = [await start("singularity-provisioner") for _ in range(2)]
        try:
            state = STATE.format(tensor_mib=tensor_mib, count=mib // tensor_mib)
            for _, client in kernels:
                await cell(client, state)  # the second evicts the first
            (a_manager, a), (b_manager, b) = kernels
            pids = {"a": a_manager.provisioner.process.pid, "b": b_manager.provisioner.process.pid}
            await wait_state(service, a_manager.kernel_id, "offloaded")
            samples: dict[str, list] = {name: [] for name in (*SECONDS_SAMPLES, *CPU_SAMPLES)}
            started, stall = time.perf_counter(), cpu_stall()
            for _ in range(rounds):
                before = usage(pids["b"])
                service.offload(b_manager.kernel_id)
                await wait_state(service, b_manager.kernel_id, "offloaded")
                samples["offload_cpu"].append(spent(before, usage(pids["b"])))
                samples["offload_s"].append(await last_transfer(b, "offloaded"))
                before = usage(pids["a"])
                service.restore(a_manager.kernel_id)
                await wait_state(service, a_manager.kernel_id, "resident")
                samples["restore_cpu"].append(spent(before, usage(pids["a"])))
                samples["restore_s"].append(await last_transfer(a, "restored"))
                victim, incoming = usage(pids["a"]), usage(pids["b"])
                async with Busy(pids) as busy:
                    seconds, _ = await first_output(b, "print('swapped')")  # evicts a
                    await wait_state(service, a_manager.kernel_id, "offloaded")
                samples["swap_s"].append(seconds)
                samples["overlap_s"].append(busy.overlap("a", "b"))
                samples["swap_victim_cpu"].append(spent(victim, usage(pids["a"])))
                samples["swap_incoming_cpu"].append(spent(incoming, usage(pids["b"])))
                # its cell's lease ends after the output: only an idle kernel can be offloaded
                await wait_state(service, b_manager.kernel_id, "resident")
            stall_share = (cpu_stall() - stall) / (time.perf_counter() - started)
        finally:
            for manager, client in kernels:
                client.stop_channels()
                await manager.shutdown_kernel(now=True)
    medians = {
        name: (
            {key: statistics.median(v[key] for v in values) for key in values[0]}
            if isinstance(values[0], dict)
            else statistics.median(values)
        )
        for name, values in samples.items()
    }
    apart = medians["offload_s"] + medians["restore_s"]
    medians["ratio"] = medians["swap_s"] / apart
    both_sides = medians["swap_victim_cpu"]["cpu"] + medians["swap_incoming_cpu"]["cpu"]
    medians["cpu_bound"] = both_sides / len(os.sched_getaffinity(0)) / apart
    medians["cpu_stall_share"] = stall_share
    medians["memory_floor"] = memory_floor(mib)
    return medians


async def run(mib: int, tensor_mib: int, device_mib: int, runs: int, rounds: int) -> dict:
    results = [await one_run(mib, tensor_mib, device_mib, rounds) for _ in range(runs)]

    def spread(name: str, key: str | None = None) -> list[float]:
        values = sorted(result[name] if key is None else result[name][key] for result in results)
        return [round(values[0], 3), round(statistics.median(values), 3), round(values[-1], 3)]

    def cpu(name: str) -> dict[str, list[float]]:
        return {key: spread(name, key) for key in ("cpu", "user", "system", "faults")}

    return {
        "state_mib": mib,
        "tensor_mib": tensor_mib,
        "device_mib": device_mib,
        "runs": runs,
        "rounds_per_run": rounds,
        "offload_s_min_median_max": spread("offload_s"),
        "restore_s_min_median_max": spread("restore_s"),
        "swap_s_min_median_max": spread("swap_s"),
        "swap_over_offload_plus_restore_min_median_max": spread("ratio"),
        "goal_swap_over_offload_plus_restore": GOAL,
        "cpu_bound_min_median_max": spread("cpu_bound"),
        "cores": len(os.sched_getaffinity(0)),
        "memory_floor_min_median_max": spread("memory_floor"),
        "offload_cpu_min_median_max": cpu("offload_cpu"),
        "restore_cpu_min_median_max": cpu("restore_cpu"),
        "swap_victim_cpu_min_median_max": cpu("swap_victim_cpu"),
        "swap_incoming_cpu_min_median_max": cpu("swap_incoming_cpu"),
        "swap_overlap_s_min_median_max": spread("overlap_s"),
        "cpu_stall_share_min_median_max": spread("cpu_stall_share"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=1024, help="state of each kernel, MiB")
    parser.add_argument("--tensor-mib", type=int, default=64, help="size of each tensor, MiB")
    parser.add_argument(
        "--device-mib", type=int, help="the simulated device, MiB (default: state + one tensor)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs (min / median / max)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (median)")
    args = parser.parse_args()
    device_mib = args.device_mib or args.mib + args.tensor_mib
    result = run(args.mib, args.tensor_mib, device_mib, args.runs, args.rounds)
    print(json.dumps(asyncio.run(result), indent=2))


if __name__ == "__main__":
    main()
