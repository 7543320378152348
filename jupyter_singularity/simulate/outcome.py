"""What users saw in one replay: every cell's wait, the cells that did not run, GPU time, bytes
moved, evictions; summed up as percentiles and a table per user.

A cell's wait is the time from when it asked for the GPU to when it started computing (queueing,
restoring its state, re-running lost cells). A cell that did not run (denied, out of memory,
larger than any GPU, never granted) counts as an infinite wait in the percentiles: a model that fails cells
cannot look fast for it.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

NEVER = math.inf
"""The wait of a cell that did not run."""


def percentile(ordered: list[float], q: float) -> float | None:
    """The ``q``-th percentile of sorted values, interpolated linearly (as numpy's default);
    None for no values."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    a, b = ordered[low], ordered[high]
    if position == low or a == b:
        return a
    return NEVER if b == NEVER else a + (b - a) * (position - low)


@dataclass
class Outcome:
    """One model's replay of a trace on one pool."""

    model: str
    gpus: int
    waits: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    """Per user, every cell's wait (NEVER for a cell that did not run)."""
    failures: Counter[str] = field(default_factory=Counter)
    """Cells that did not run, by reason."""
    rerun_cells: int = 0
    """Cells run again because their kernel's state was lost (the idle culler)."""
    gpu_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    """Per user, seconds their cells held a GPU (leases: restores and re-runs included)."""
    busy: dict[int, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    """Per GPU, when cells held it (start, end): several at once where they share it."""
    span: float = 0.0
    """Seconds from the first cell's request until the last kernel ended."""
    moved: Counter[str] = field(default_factory=Counter)
    """Bytes offloaded, restored and spilled."""
    evictions: int = 0

    def held(self, user: str, device: int, start: float, end: float) -> None:
        """A cell of ``user`` held ``device`` (its lease, restore or re-runs included)."""
        self.gpu_seconds[user] += end - start
        self.busy[device].append((start, end))

    def waited(self, user: str, seconds: float) -> None:
        self.waits[user].append(max(0.0, seconds))

    def failed(self, user: str, reason: str, cells: int = 1) -> None:
        self.failures[reason] += cells
        self.waits[user].extend([NEVER] * cells)

    def summary(self) -> dict[str, Any]:
        every = sorted(w for waits in self.waits.values() for w in waits)
        hours = self.span / 3600
        return {
            "model": self.model,
            "cells": len(every),
            **{f"p{q}_wait_s": _finite(percentile(every, q)) for q in (50, 95, 99)},
            "mean_wait_s": _finite(
                sum(every) / len(every) if every and every[-1] != NEVER else None
            ),
            "failed_cells": sum(self.failures.values()),
            "failures": dict(sorted(self.failures.items())),
            "rerun_cells": self.rerun_cells,
            "gpu_utilisation": _share(
                sum(map(_covered, self.busy.values())), self.span * self.gpus
            ),
            "leased_per_gpu": _share(sum(self.gpu_seconds.values()), self.span * self.gpus),
            "bytes_moved": dict(sorted(self.moved.items())),
            "evictions": self.evictions,
            "evictions_per_hour": round(self.evictions / hours, 2) if hours > 0 else None,
        }

    def wait(self, q: float) -> float:
        """The ``q``-th percentile of the waits (NEVER where more than ``100 - q`` % of the
        cells did not run, or there were none)."""
        value = percentile(sorted(w for waits in self.waits.values() for w in waits), q)
        return NEVER if value is None else value

    def per_user(self) -> list[dict[str, Any]]:
        rows = []
        for user in sorted(self.waits):
            waits = sorted(self.waits[user])
            rows.append(
                {
                    "user": user,
                    "cells": len(waits),
                    "p50_wait_s": _finite(percentile(waits, 50)),
                    "p95_wait_s": _finite(percentile(waits, 95)),
                    "max_wait_s": _finite(waits[-1] if waits else None),
                    "failed_cells": sum(1 for w in waits if w == NEVER),
                    "gpu_hours": round(self.gpu_seconds.get(user, 0.0) / 3600, 4),
                }
            )
        return rows


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of the intervals."""
    total, reach = 0.0, -NEVER
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _share(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole > 0 else None


def _finite(value: float | None) -> float | None:
    """Seconds for JSON: None where cells did not run (JSON has no infinity)."""
    return None if value is None or value == NEVER else round(value, 3)
