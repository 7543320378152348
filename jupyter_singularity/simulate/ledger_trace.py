"""A trace from a site's own usage ledger: every ended lease is a GPU cell that ran.

The ledger (broker/ledger.py) keeps each lease (kernel, user, device, start, end, peak bytes) and
each kernel state change. A cell asked for the GPU when its kernel became ``queued`` before the
lease, if it did, else when the lease began; it ran from the end of its restore (``restoring`` to
``running``), if it was restored, until the lease ended. Its memory is the peak the kernel reported
(the reservation where none was). A kernel ends at its last state change (``gone``, when it left
the pool). The waits the ledger saw are taken out (each kernel's later rows move earlier by
them), so the think times between a cell's end and the next one's request are kept and the replay
decides the waits anew. Leases still open are left out; the ledger keeps no groups.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from pathlib import Path

from ..broker.ledger import Ledger, LedgerError
from .trace import Trace, TraceError, build_trace

#: More rows than any ledger holds: the ledger's reads take a limit.
EVERYTHING = 1 << 62


def read_ledger(db_url: str) -> Trace:
    """The trace of one ledger (an SQLAlchemy URL, or the path of an SQLite file)."""
    url = db_url if "://" in db_url else f"sqlite:///{Path(db_url).resolve()}"
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise TraceError(f"--ledger {db_url}: no such ledger file")
    try:
        ledger = Ledger(url)
    except LedgerError as err:
        raise TraceError(f"--ledger {db_url}: {err}") from None
    try:
        leases = ledger.leases(since=-float("inf"), until=float("inf"), limit=EVERYTHING)
        events = ledger.events(limit=EVERYTHING)
    finally:
        ledger.close()
    return _trace(db_url, leases, events)


def _trace(source: str, leases: list[dict], events: list[dict]) -> Trace:
    by_kernel: dict[str, list[dict]] = defaultdict(list)
    for event in sorted(events, key=lambda e: (e["time"], e["id"])):
        by_kernel[event["kernel_id"]].append(event)
    times = {kernel: [e["time"] for e in history] for kernel, history in by_kernel.items()}
    rows = []
    last_row: dict[str, dict] = {}
    previous_end: dict[str, float] = {}
    # Seconds each kernel's cells so far waited: the trace is as if they had not (the replay
    # decides the waits), so its later rows move earlier by them and think times stay.
    waited: dict[str, float] = defaultdict(float)
    for lease in sorted((x for x in leases if x["end"] is not None), key=lambda x: x["start"]):
        kernel = lease["kernel_id"]
        history, moments = by_kernel.get(kernel, []), times.get(kernel, [])
        since = bisect.bisect_left(moments, previous_end.get(kernel, -float("inf")))
        asked = started = lease["start"]
        for event in history[since : bisect.bisect_right(moments, lease["end"])]:
            if event["new_state"] == "queued" and event["time"] <= lease["start"]:
                asked = event["time"]
            elif event["old_state"] == "restoring" and event["new_state"] == "running":
                started = max(started, event["time"])
        previous_end[kernel] = lease["end"]
        peak = lease["peak_bytes"]
        row = last_row[kernel] = {
            "user": lease["user"],
            "kernel": kernel,
            "start": asked - waited[kernel],
            "duration": max(0.0, lease["end"] - started),
            "memory": lease["reservation_bytes"] if peak is None else peak,
        }
        waited[kernel] += started - asked
        rows.append((f"lease {lease['lease_id']}", row))
    for kernel, row in last_row.items():
        history = by_kernel.get(kernel, [])
        if history and history[-1]["new_state"] == "gone":
            end = history[-1]["time"] - waited[kernel]
            row["kernel_end"] = max(end, row["start"] + row["duration"])
    if not rows:
        raise TraceError(f"--ledger {source}: no ended leases in the ledger")
    return build_trace(rows, source=f"ledger {source}")
