"""Generated traces: notebook users with documented, seedable distributions.

Every user opens ``sessions`` sessions a day (its whole part, and one more with the chance of its
fraction), each one kernel that starts at a time
drawn uniformly between ``start`` and ``end`` (hours of the UTC day). A kernel runs GPU cells
(``cells`` per session, Poisson, at least one) of a median ``cell`` seconds, with a median
``think`` seconds between them (both log-normal, sigma 1: most are short, a few are long); its
GPU footprint is drawn once (log-normal around ``memory``, sigma 0.5, between 256 MiB and
``max_memory``) and every cell peaks at it. It stays alive ``linger`` seconds on average
(exponential) after its last cell. With ``length`` > 0 the session is a lab session instead: cells
come until ``length`` seconds after its start, and the kernel ends then.

Presets: ``day`` (a research group's working day) and ``lab`` (a teaching lab: 60 students in one
2-hour session, small models).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone

from ..units import parse_size
from .trace import Cell, Session, Trace

GiB = 1 << 30
MiB = 1 << 20
HOUR = 3600.0
MIN_MEMORY = 256 * MiB
#: The first generated day: a Monday, at UTC midnight (where daily quotas reset).
EPOCH = datetime(2026, 1, 5, tzinfo=timezone.utc).timestamp()


@dataclass(frozen=True)
class Workload:
    """The generator's parameters (see the module docstring); sizes in bytes, times in seconds."""

    users: int = 200
    days: int = 1
    sessions: float = 2.0
    cells: float = 30.0
    cell: float = 20.0
    think: float = 120.0
    memory: int = 8 * GiB
    max_memory: int = 40 * GiB
    linger: float = 1800.0
    start: float = 9.0
    end: float = 17.0
    length: float = 0.0
    seed: int = 0


PRESETS = {
    "day": Workload(),
    "lab": Workload(
        users=60,
        sessions=1,
        cell=10.0,
        think=90.0,
        memory=2 * GiB,
        max_memory=8 * GiB,
        start=9.0,
        end=9.0 + 10 / 60,
        length=2 * HOUR,
    ),
}

_WHOLE = ("users", "days", "seed")
_SIZES = ("memory", "max_memory")


def parse_workload(spec: str) -> Workload:
    """``[PRESET][,KEY=VALUE...]`` (e.g. ``lab,users=30,seed=2``); without a preset, ``day``'s
    parameters are the base. Raises ValueError naming the parameter."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    workload = PRESETS["day"]
    if parts and "=" not in parts[0]:
        name = parts.pop(0)
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
        workload = PRESETS[name]
    known = [f.name for f in fields(Workload)]
    changes: dict[str, float | int] = {}
    for part in parts:
        key, sep, text = part.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ValueError(f"unknown parameter {key!r} (known: {', '.join(known)})")
        changes[key] = _value(key, text.strip())
    workload = replace(workload, **changes)
    _check(workload)
    return workload


def _value(key: str, text: str) -> float | int:
    try:
        if key in _SIZES:
            return parse_size(text)
        if key in _WHOLE:
            return int(text)
        number = float(text)
    except (ValueError, TypeError) as err:
        kind = "a size" if key in _SIZES else "a whole number" if key in _WHOLE else "a number"
        raise ValueError(f"{key}: expected {kind}, not {text!r} ({err})") from None
    if not math.isfinite(number):
        raise ValueError(f"{key}: expected a finite number, not {text!r}")
    return number


def _check(w: Workload) -> None:
    if not 1 <= w.users <= 100_000:
        raise ValueError(f"users: must be between 1 and 100000, not {w.users}")
    if not 1 <= w.days <= 366:
        raise ValueError(f"days: must be between 1 and 366, not {w.days}")
    for key in ("sessions", "cells", "linger", "length"):
        if getattr(w, key) < 0:
            raise ValueError(f"{key}: must be >= 0, not {getattr(w, key):g}")
    for key in ("cell", "think"):
        if getattr(w, key) <= 0:
            raise ValueError(f"{key}: must be > 0 seconds, not {getattr(w, key):g}")
    if not 0 <= w.start <= w.end <= 24:
        raise ValueError(
            f"start, end: hours of the day with 0 <= start <= end <= 24, not {w.start:g} and "
            f"{w.end:g}"
        )
    if not MIN_MEMORY <= w.memory <= w.max_memory:
        raise ValueError("memory: must be between 256 MiB and max_memory")


def generate(w: Workload) -> Trace:
    """The same trace for the same parameters (seed included), on any machine."""
    rng = random.Random(w.seed)
    sessions = []
    for day in range(w.days):
        midnight = EPOCH + day * 24 * HOUR
        for u in range(w.users):
            user = f"user{u:03d}"
            for s in range(_count(rng, w.sessions)):
                begin = midnight + rng.uniform(w.start, w.end) * HOUR
                kernel = f"{user}-d{day}s{s}"
                sessions.append(_session(rng, w, kernel, user, begin))
    sessions.sort(key=lambda s: (s.cells[0].start, s.kernel))
    return Trace(tuple(sessions), f"generated: {_describe(w)}")


def _session(rng: random.Random, w: Workload, kernel: str, user: str, begin: float) -> Session:
    footprint = int(rng.lognormvariate(math.log(w.memory), 0.5))
    footprint = min(w.max_memory, max(MIN_MEMORY, footprint))
    cells = []
    now = begin
    count = math.inf if w.length > 0 else max(1, _poisson(rng, w.cells))
    while len(cells) < count:
        duration = rng.lognormvariate(math.log(w.cell), 1.0)
        if w.length > 0 and cells and now + duration > begin + w.length:
            break
        cells.append(Cell(now, duration, footprint))
        now += duration + rng.lognormvariate(math.log(w.think), 1.0)
    last = cells[-1].end
    if w.length > 0:
        end = max(last, begin + w.length)
    else:
        end = last + (rng.expovariate(1 / w.linger) if w.linger else 0.0)
    return Session(kernel, user, tuple(cells), end)


def _count(rng: random.Random, mean: float) -> int:
    """``mean`` sessions on average: its whole part, and one more with its fraction's chance."""
    whole = math.floor(mean)
    return whole + (rng.random() < mean - whole)


def _poisson(rng: random.Random, mean: float) -> int:
    """Knuth's method, in steps of 20 so that large means do not underflow."""
    count = 0
    while mean > 0:
        step = min(mean, 20.0)
        mean -= step
        limit, product = math.exp(-step), rng.random()
        while product > limit:
            count += 1
            product *= rng.random()
    return count


def _describe(w: Workload) -> str:
    preset = next((n for n, p in PRESETS.items() if p == w), None)
    if preset is not None:
        return preset
    base = PRESETS["lab"] if w.length > 0 else PRESETS["day"]
    changed = [
        f"{f.name}={getattr(w, f.name):g}"
        for f in fields(Workload)
        if getattr(w, f.name) != getattr(base, f.name)
    ]
    name = "lab" if w.length > 0 else "day"
    return ",".join([name, *changed])
