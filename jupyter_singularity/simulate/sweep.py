"""The whole simulation: the trace replayed on each pool, through the pool's decision core and
through each baseline, and the answer: how many users one GPU serves at a target p95 wait.

A pool *serves* the trace when the 95th percentile of its cells' waits is at most the target (a
cell that did not run counts as an infinite wait). A model serves ``users / GPUs`` users per GPU
on the smallest pool of the sweep that it serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..units import format_size
from .baselines import Baseline, SharedGpus
from .outcome import Outcome
from .replay import MODEL, Progress, Replay
from .site import Pool, Site
from .trace import Trace
from .transfers import Transfers


@dataclass
class PoolResult:
    pool: Pool
    outcomes: list[Outcome]
    seconds: dict[str, float]
    """Per model, the wall-clock seconds its replay took."""


@dataclass
class Simulation:
    trace: Trace
    target: float
    transfers: Transfers
    pools: list[PoolResult] = field(default_factory=list)
    first_cell_memory: int = 0
    """The site's ``first_cell_memory`` (0: a kernel's first cell books a whole GPU)."""

    def first_cell_hint(self) -> str | None:
        """Where a baseline serves the trace on fewer GPUs than the pool while every kernel's
        first cell books a whole GPU, the setting that lets first cells start side by side, at
        the size this trace's first cells need (see docs/simulate.md)."""
        users = self.users_per_gpu()
        ours = users.get(MODEL, {}).get("users_per_gpu") or 0
        better = [m for m, found in users.items() if (found["users_per_gpu"] or 0) > ours]
        if self.first_cell_memory or not better or not self.pools:
            return None
        largest = max((s.cells[0].memory for s in self.trace.sessions if s.cells), default=0)
        if not 0 < largest <= self.pools[0].pool.largest // 2:
            return None
        unit, name = (1 << 30, "GiB") if largest >= 1 << 30 else (1 << 20, "MiB")
        size = f"{-(-largest // unit)}{name}"  # (rounded up)
        serve = "serves" if len(better) == 1 else "serve"
        return (
            f"{' and '.join(better)} {serve} more users per GPU here. A kernel's first cell books "
            f"a whole GPU by default, and this trace's first cells use {format_size(largest)} at "
            f'most: try c.SingularityBroker.first_cell_memory = "{size}" (rounded up) in a file '
            "given to --config (see the admin guide: a first cell that needs more may then run "
            "out of GPU memory)"
        )

    def models(self) -> list[str]:
        return [o.model for o in self.pools[0].outcomes] if self.pools else []

    def users_per_gpu(self) -> dict[str, dict[str, Any]]:
        """Per model: users per GPU on the smallest pool it serves (None: none of them)."""
        users = len(self.trace.users)
        answer: dict[str, dict[str, Any]] = {}
        for index, model in enumerate(self.models()):
            served = [r for r in self.pools if r.outcomes[index].wait(95) <= self.target]
            best = min(served, key=lambda r: r.pool.gpus, default=None)
            answer[model] = {
                "users_per_gpu": None if best is None else round(users / best.pool.gpus, 3),
                "pool": None if best is None else best.pool.name,
            }
        return answer


def simulate(
    trace: Trace,
    pools: list[Pool],
    site: Site,
    baselines: list[Baseline],
    target: float = 10.0,
    transfers: Transfers | None = None,
    progress: Callable[[str, int], Progress] | None = None,
) -> Simulation:
    """Replay ``trace`` on every pool: the pool's core first, then each baseline.
    ``progress(label, total_cells)`` gives a callback for one replay's progress."""
    transfers = transfers or Transfers()
    simulation = Simulation(trace, target, transfers)
    if pools:
        simulation.first_cell_memory = site.policy(pools[0]).first_cell_memory
    for pool in pools:
        fitting, dropped = trace.without_cells_over(pool.largest)
        result = PoolResult(pool, [], {})
        for baseline in (None, *baselines):
            name = MODEL if baseline is None else baseline.name
            tick = None if progress is None else progress(f"{pool.name} {name}", fitting.cells)
            started = time.perf_counter()
            if baseline is None:
                policy = site.policy(pool)
                outcome = Replay(fitting, pool, policy, site.quotas, transfers, tick).run()
            else:
                outcome = SharedGpus(fitting, pool, baseline, tick).run()
            result.seconds[name] = time.perf_counter() - started
            for user, cells in dropped.items():
                outcome.failed(user, "larger than any GPU", cells)
            result.outcomes.append(outcome)
        simulation.pools.append(result)
    return simulation
