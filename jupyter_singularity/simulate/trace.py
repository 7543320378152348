"""A trace of notebook activity: sessions (one kernel each) and their GPU cells, and the file
formats it is read from (CSV or JSON Lines, one row per GPU cell).

A row names its ``user`` and ``kernel``, when the cell asked for the GPU (``start``), how long it
ran once it had it (``duration``) and the most GPU memory it used (``memory``); ``kernel_end``
(when the kernel shut down) and ``groups`` (the user's groups, for group quotas) are optional.
The gaps between one cell's end and the next one's start are the user's think times (and the
kernel's cells without the GPU). A bad row stops the reading with one line naming the file, the
line and the field.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..units import parse_size

REQUIRED = ("user", "kernel", "start", "duration", "memory")
OPTIONAL = ("kernel_end", "groups")
COLUMNS = (*REQUIRED, *OPTIONAL)


class TraceError(ValueError):
    """A trace that cannot be replayed; the message names where (file, line, field)."""


@dataclass(frozen=True)
class Cell:
    start: float
    """When the cell asked for the GPU, in the trace (epoch seconds)."""
    duration: float
    """Seconds it ran once it had the GPU."""
    memory: int
    """The most GPU memory it used (bytes): what stays on the GPU after it, too."""

    @property
    def end(self) -> float:
        return self.start + self.duration


@dataclass(frozen=True)
class Session:
    """One kernel's life: its GPU cells in order, and when it shut down."""

    kernel: str
    user: str
    cells: tuple[Cell, ...]
    end: float
    groups: tuple[str, ...] = ()

    def resume(self, index: int, now: float) -> float:
        """When cell ``index`` starts asking for the GPU if its kernel is free again at ``now``:
        at its time in the trace, or once the kernel's late previous cell is done (a notebook
        runs its cells one after another: the user ran it, it waits in the kernel)."""
        return max(self.cells[index].start, now)


@dataclass(frozen=True)
class Trace:
    sessions: tuple[Session, ...]
    source: str

    @property
    def users(self) -> list[str]:
        return sorted({s.user for s in self.sessions})

    @property
    def cells(self) -> int:
        return sum(len(s.cells) for s in self.sessions)

    @property
    def span(self) -> tuple[float, float]:
        """First cell start and last kernel end, in trace time."""
        if not self.sessions:
            return (0.0, 0.0)
        return (min(s.cells[0].start for s in self.sessions), max(s.end for s in self.sessions))

    def without_cells_over(self, limit: int) -> tuple[Trace, Counter[str]]:
        """The trace without the cells that use more memory than ``limit`` (the largest GPU of a
        pool: they fail in every model), and how many each user lost. A dropped cell's time is
        spent all the same: the next cell's think time spans it."""
        dropped: Counter[str] = Counter()
        kept = []
        for session in self.sessions:
            cells = tuple(c for c in session.cells if c.memory <= limit)
            dropped[session.user] += len(session.cells) - len(cells)
            if cells:
                kept.append(replace(session, cells=cells))
        return replace(self, sessions=tuple(kept)), +dropped

    def summary(self) -> dict[str, Any]:
        first, last = self.span
        return {
            "source": self.source,
            "users": len(self.users),
            "kernels": len(self.sessions),
            "cells": self.cells,
            "hours": round((last - first) / 3600, 3),
        }


def merge_traces(traces: list[Trace]) -> Trace:
    """Several traces as one (the ledgers of several pools or runs); a kernel id may appear in
    only one of them."""
    if len(traces) == 1:
        return traces[0]
    seen: dict[str, str] = {}
    for trace in traces:
        for session in trace.sessions:
            if session.kernel in seen:
                raise TraceError(
                    f"{trace.source}: kernel {session.kernel!r} is also in {seen[session.kernel]}"
                )
            seen[session.kernel] = trace.source
    sessions = sorted(
        (s for trace in traces for s in trace.sessions), key=lambda s: (s.cells[0].start, s.kernel)
    )
    more = f" and {len(traces) - 1} more"
    return Trace(tuple(sessions), traces[0].source + more)


# ------------------------------------------------------------------------------------ reading


def read_trace(path: str | Path) -> Trace:
    """A trace file: JSON Lines (``.jsonl``, ``.ndjson``, ``.json``) or CSV (any other name)."""
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as stream:
            if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
                rows = list(_jsonl_rows(path.name, stream))
            else:
                rows = list(_csv_rows(path.name, stream))
    except OSError as err:
        raise TraceError(f"{path}: cannot read the trace ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise TraceError(f"{path}: not UTF-8 text ({err.reason})") from None
    if not rows:
        raise TraceError(f"{path.name}: no cells in the trace")
    return build_trace(rows, source=str(path))


def _csv_rows(name: str, stream: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(stream)
    header = reader.fieldnames
    if not header:
        raise TraceError(f"{name}: empty file; expected a header line with {', '.join(REQUIRED)}")
    _check_columns(f"{name} line 1", [h.strip() for h in header])
    for row in reader:
        where = f"{name} line {reader.line_num}"
        if None in row:
            raise TraceError(f"{where}: more fields than the header has columns")
        yield where, {k.strip(): v for k, v in row.items() if v is not None and v.strip() != ""}


def _jsonl_rows(name: str, stream: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        where = f"{name} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TraceError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise TraceError(f"{where}: expected a JSON object with {', '.join(REQUIRED)}")
        _check_columns(where, list(row))
        yield where, {k: v for k, v in row.items() if v is not None}


def _check_columns(where: str, names: list[str]) -> None:
    unknown = [n for n in names if n not in COLUMNS]
    if unknown:
        raise TraceError(f"{where}: unknown column {unknown[0]!r} (known: {', '.join(COLUMNS)})")


def build_trace(rows: Iterable[tuple[str, dict[str, Any]]], source: str) -> Trace:
    """Sessions from rows ``(where, fields)``, one per GPU cell; ``where`` names the row in
    messages. A kernel's cells may come in any order but may not overlap."""
    kernels: dict[str, dict[str, Any]] = {}
    for where, row in rows:
        for name in REQUIRED:
            if name not in row:
                raise TraceError(f"{where}: {name}: missing")
        user, kernel = _text(where, row, "user"), _text(where, row, "kernel")
        cell = Cell(_time(where, row, "start"), _seconds(where, row, "duration"), _size(where, row))
        entry = kernels.setdefault(kernel, {"user": user, "cells": [], "end": None, "groups": ()})
        if entry["user"] != user:
            raise TraceError(
                f"{where}: user: kernel {kernel!r} belongs to {entry['user']!r}, not {user!r}"
            )
        entry["cells"].append((cell, where))
        if "kernel_end" in row:
            entry["end"] = max(entry["end"] or -math.inf, _time(where, row, "kernel_end"))
            entry["end_where"] = where
        if "groups" in row:
            entry["groups"] = _groups(where, row["groups"])
    sessions = []
    for kernel, entry in kernels.items():
        cells = sorted(entry["cells"], key=lambda pair: pair[0].start)
        for (before, _), (cell, where) in itertools.pairwise(cells):
            if cell.start < before.end:
                raise TraceError(
                    f"{where}: start: kernel {kernel!r} runs one cell at a time, but this cell "
                    f"starts before its cell at {before.start:g} (lasting {before.duration:g} s) "
                    "ends"
                )
        last = cells[-1][0].end
        end = entry["end"]
        if end is not None and end < last:
            raise TraceError(
                f"{entry['end_where']}: kernel_end: kernel {kernel!r} ends at {end:g}, before "
                f"its last cell ends ({last:g})"
            )
        sessions.append(
            Session(
                kernel,
                entry["user"],
                tuple(c for c, _ in cells),
                last if end is None else end,
                entry["groups"],
            )
        )
    if not sessions:
        raise TraceError(f"{source}: no cells in the trace")
    sessions.sort(key=lambda s: (s.cells[0].start, s.kernel))
    return Trace(tuple(sessions), source)


def _text(where: str, row: dict[str, Any], name: str) -> str:
    value = row[name]
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise TraceError(f"{where}: {name}: expected a name, not {value!r}")
    return value.strip()


def _number(where: str, name: str, value: Any) -> float:
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
        raise TraceError(f"{where}: {name}: expected a number of seconds, not {value!r}")
    return float(number)


def _seconds(where: str, row: dict[str, Any], name: str) -> float:
    seconds = _number(where, name, row[name])
    if seconds < 0:
        raise TraceError(f"{where}: {name}: must be >= 0 seconds, not {seconds:g}")
    return seconds


def _time(where: str, row: dict[str, Any], name: str) -> float:
    """Epoch seconds (or any seconds: the replay only uses differences, and UTC midnights for
    daily quotas), or an ISO 8601 date and time (UTC unless it says otherwise)."""
    value = row[name]
    if isinstance(value, str) and not _looks_numeric(value):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise TraceError(
                f"{where}: {name}: expected seconds or an ISO 8601 time such as "
                f"'2026-01-05T09:00:00', not {value!r}"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.timestamp()
    return _seconds(where, row, name)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _size(where: str, row: dict[str, Any]) -> int:
    value = row["memory"]
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        return parse_size(value)
    except (ValueError, TypeError) as err:
        raise TraceError(f"{where}: memory: {err}") from None


def _groups(where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(g, str) for g in value):
        return tuple(g.strip() for g in value if g.strip())
    if isinstance(value, str):
        return tuple(g for g in value.replace(";", " ").split() if g)
    raise TraceError(f"{where}: groups: expected names separated by spaces, not {value!r}")
