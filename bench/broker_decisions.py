"""Broker decision latency: 1,000 kernels on 64 simulated devices.

Every decision is one call into the pure core (no I/O): a cell asks for a lease, a cell ends. The
kernels' footprints are chosen so the devices are full, so decisions include placement and eviction.
Goal (issue: foundation): p99 <= 1 ms. Run: ``python bench/broker_decisions.py``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from jupyter_singularity.broker.core import BrokerCore
from jupyter_singularity.broker.model import KernelState
from jupyter_singularity.devices.simulated import SimulatedInventory

GiB = 1 << 30


def run(kernels: int, devices: int, rounds: int, seed: int) -> dict:
    rng = random.Random(seed)
    # Bookkeeping only: devices larger than this machine's memory are fine for the core.
    core = BrokerCore(SimulatedInventory([80 * GiB] * devices).devices())
    now = 0.0
    ids = [f"k{i:04d}" for i in range(kernels)]
    for i, kernel_id in enumerate(ids):
        core.register(kernel_id, f"user{i % 50}", now)
    # Warm up: every kernel runs one cell so it has a footprint and the devices fill up.
    pending: dict[str, str] = {}
    for kernel_id in ids:
        now += 0.001
        core.acquire(kernel_id, "warm", now, memory=rng.choice((2, 4, 8, 12)) * GiB)
        pending[kernel_id] = "warm"
    acquire_times: list[float] = []
    release_times: list[float] = []
    by_depth: dict[bool, list[float]] = {False: [], True: []}  # queue deeper than the devices?
    for r in range(rounds):
        kernel_id = rng.choice(ids)
        kernel = core.kernels[kernel_id]
        now += 0.01
        deep = len(core.queue()) > devices
        if kernel.lease is not None:
            started = time.perf_counter()
            actions = core.release(
                kernel_id,
                kernel.lease.request_id,
                now,
                peak_bytes=kernel.lease.reservation // 2,
                gpu_bytes=kernel.lease.reservation // 3,
            )
            release_times.append(time.perf_counter() - started)
            by_depth[deep].append(release_times[-1])
        elif kernel.request is None:
            started = time.perf_counter()
            actions = core.acquire(kernel_id, f"r{r}", now)
            acquire_times.append(time.perf_counter() - started)
            by_depth[deep].append(acquire_times[-1])
        else:
            continue
        # Offloads finish instantly in this model: report them back (not timed).
        for action in actions:
            if type(action).__name__ == "Offload":
                victim = core.kernels.get(action.kernel_id)
                if victim is not None and victim.state == KernelState.OFFLOADING:
                    core.offloaded(action.kernel_id, now, host_bytes=victim.gpu_bytes)
    every = acquire_times + release_times

    def pct(values: list[float], q: float) -> float | None:
        if len(values) < 2:
            return None  # (none of the decisions was of this kind)
        return statistics.quantiles(values, n=1000)[int(q * 10) - 1] * 1e3

    return {
        "kernels": kernels,
        "devices": devices,
        "decisions": len(every),
        "acquire_p50_ms": pct(acquire_times, 50),
        "acquire_p99_ms": pct(acquire_times, 99),
        "release_p50_ms": pct(release_times, 50),
        "release_p99_ms": pct(release_times, 99),
        "all_p50_ms": pct(every, 50),
        "all_p99_ms": pct(every, 99),
        "decisions_with_queue_deeper_than_devices": len(by_depth[True]),
        "p99_ms_queue_within_devices": pct(by_depth[False], 99),
        "p99_ms_queue_deeper_than_devices": pct(by_depth[True], 99),
        "queue_length_end": len(core.queue()),
        "goal_p99_ms": 1.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kernels", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(run(args.kernels, args.devices, args.rounds, args.seed), indent=2))


if __name__ == "__main__":
    main()
