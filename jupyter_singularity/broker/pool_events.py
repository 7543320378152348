"""The events the broker emits for the browser, and what one batch of them tells it.

``emit(name, data)``: name is ``kernel_state``, ``lease``, ``queue`` or ``pin``; the server maps it
to its versioned event schema (see :mod:`jupyter_singularity.server.events`). The service emits
them in batches (see ``EVENTS_DELAY`` in :mod:`.service`), after the answers that caused them.

A lease that began and ended within one batch, on a kernel that went back to the state it left,
is told by its ``ended`` event alone (see :func:`coalesce`): a notebook run cell after cell
("Run All") takes a few milliseconds per cell, and each cell would cost four events, each
validated against its schema for every listening browser (about 0.25 ms of the server's time)
and sent to it, which refreshes on each, for a state no browser could show for as long as the
batch waited.
"""

from __future__ import annotations

from collections import defaultdict

KERNEL_STATE_SCHEMA, LEASE_SCHEMA, QUEUE_SCHEMA = "kernel_state", "lease", "queue"
PIN_SCHEMA = "pin"
RUNNING = "running"

Event = tuple[str, dict]


def lease_event(
    kernel_id: str,
    request_id: str,
    action: str,
    *,
    device: int | None = None,
    reservation: int | None = None,
    seconds: float | None = None,
    reason: str | None = None,
) -> dict:
    return {
        "kernel_id": kernel_id,
        "request_id": request_id,
        "action": action,
        "device": device,
        "reservation": reservation,
        "seconds": seconds,
        "reason": reason,
    }


def coalesce(events: list[Event]) -> list[Event]:
    """The batch without what a lease that began and ended in it adds to its ``ended`` event.

    Among one kernel's events, in order: its lease granted, the kernel from a state to running,
    the lease ended, the kernel from running back to that state on the same device. The
    ``granted`` event and both state changes are left out; the ``ended`` one stays (the lease
    happened: its seconds count, and a browser refreshes on it). Any other event of the kernel
    between them (a pin, a queue position) keeps all four. Nothing else changes, order included.
    """
    of_kernel: dict[str, list[int]] = defaultdict(list)
    for index, (_, data) in enumerate(events):
        of_kernel[str(data.get("kernel_id"))].append(index)
    dropped: set[int] = set()
    for indices in of_kernel.values():
        at = 0
        while at + 4 <= len(indices):
            window = [events[i] for i in indices[at : at + 4]]
            if _lease_in_passing(*window):
                dropped.update((indices[at], indices[at + 1], indices[at + 3]))
                at += 4
            else:
                at += 1
    if not dropped:
        return events
    return [event for index, event in enumerate(events) if index not in dropped]


def _lease_in_passing(granted: Event, to_running: Event, ended: Event, back: Event) -> bool:
    (g_name, g), (r_name, r), (e_name, e), (b_name, b) = granted, to_running, ended, back
    return (
        (g_name, r_name, e_name, b_name)
        == (LEASE_SCHEMA, KERNEL_STATE_SCHEMA, LEASE_SCHEMA, KERNEL_STATE_SCHEMA)
        and g.get("action") == "granted"
        and e.get("action") == "ended"
        and g.get("request_id") == e.get("request_id")
        and r.get("new") == RUNNING
        and r.get("old") is not None
        and b.get("old") == RUNNING
        and b.get("new") == r.get("old")
        and b.get("device") == r.get("device")
    )
