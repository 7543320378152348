"""The pool's history as its pictures need it: leases and transfers over a time window, and GPU
time per day, user and group.

The GPU pool panel draws a timeline (one lane per device, a bar per lease, marks for offloads and
restores) and bar charts of GPU-hours from these answers. Reads only: the ledger has the leases and
state changes; notebook paths come from the kernels in the pool now, since the ledger keeps none.
Who may see what is decided by the caller (broker.frontend): every answer here is complete.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..devices.base import DeviceInfo
from .ledger import Ledger, day_start
from .model import Kernel

DAY = 86400.0
MAX_WINDOW_HOURS = 168
"""The longest timeline window (7 days): a bound on what one request makes the ledger read."""
MAX_DAYS = 31
"""The most days one GPU-time answer covers."""
MAX_RECORDS = 5000
"""The most leases, and the most state changes, in one timeline; older ones are left out."""
TRANSFER_STATES = ("offloading", "restoring")
"""A state change into or out of these starts or ends an offload or a restore."""


def window_error(since: float, until: float) -> str | None:
    """Why ``[since, until]`` is no timeline window, or None when it is one."""
    if since < 0:
        return f"since must be epoch seconds >= 0, not {since!r}"
    if until <= since:
        return f"since ({since}) must be before until ({until})"
    if until - since > MAX_WINDOW_HOURS * 3600:
        hours = (until - since) / 3600
        return (
            f"the window from since to until is {hours:.1f} hours: at most "
            f"{MAX_WINDOW_HOURS} (7 days)"
        )
    return None


def days_error(days: Any) -> str | None:
    """Why ``days`` is no number of days for :func:`gpu_time`, or None."""
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        return f"days must be a whole number from 1 to {MAX_DAYS}, not {days!r}"
    return None


def timeline(
    ledger: Ledger,
    *,
    since: float,
    until: float,
    now: float,
    devices: Iterable[DeviceInfo],
    kernels: Mapping[str, Kernel],
) -> dict:
    """Leases overlapping ``[since, until]`` and the state changes that start or end a transfer in
    it, oldest first, with the devices (the lanes) and each kernel's user and notebook (``""``
    where the kernel has left the pool). ``truncated`` says that older records were left out."""
    leases = ledger.leases(since=since, until=until, limit=MAX_RECORDS + 1)
    changes = ledger.state_changes(
        since=since, until=until, states=TRANSFER_STATES, limit=MAX_RECORDS + 1
    )
    truncated = len(leases) > MAX_RECORDS or len(changes) > MAX_RECORDS
    leases, changes = leases[:MAX_RECORDS][::-1], changes[:MAX_RECORDS][::-1]
    owners = {record["kernel_id"]: record["user"] for record in (*leases, *changes)}
    return {
        "since": since,
        "until": until,
        "now": now,
        "devices": [{"index": d.index, "name": d.name} for d in devices],
        "leases": [
            {
                "lease_id": lease["lease_id"],
                "kernel_id": lease["kernel_id"],
                "user": lease["user"],
                "device": lease["device_index"],
                "start": lease["start"],
                "end": lease["end"],
                "peak_bytes": lease["peak_bytes"],
                "reservation_bytes": lease["reservation_bytes"],
            }
            for lease in leases
        ],
        "changes": changes,
        "kernels": {
            kernel_id: {"user": user, "notebook": _notebook(kernels.get(kernel_id), user)}
            for kernel_id, user in owners.items()
        },
        "truncated": truncated,
    }


def _notebook(kernel: Kernel | None, user: str) -> str:
    # A kernel id is reused only by the same user's restarted kernel; check anyway.
    return kernel.notebook if kernel is not None and kernel.user == user else ""


def gpu_time(
    ledger: Ledger,
    *,
    user: str,
    days: int,
    now: float,
    limit: float | None,
    everyone: bool = False,
    groups: Iterable[str] = (),
    groups_of: Callable[[str], Iterable[str]] = lambda user: (),
) -> dict:
    """``user``'s GPU-seconds on each of the last ``days`` UTC days (today last) against their
    daily ``limit``; with ``everyone``, also every user's and each of ``groups``' GPU-seconds today
    and over those days (``groups_of(user)`` names a user's groups)."""
    today = day_start(now)
    starts = [today - (days - 1 - n) * DAY for n in range(days)]
    per_day = [
        (start, _seconds_by_user(ledger, start, min(start + DAY, now), None if everyone else user))
        for start in starts
    ]
    answer: dict[str, Any] = {
        "user": user,
        "now": now,
        "gpu_seconds_per_day": limit,
        "days": [{"day": start, "gpu_seconds": used.get(user, 0.0)} for start, used in per_day],
    }
    if not everyone:
        return answer
    totals: dict[str, list[float]] = {}
    for start, used in per_day:
        for name, seconds in used.items():
            total = totals.setdefault(name, [0.0, 0.0])
            total[1] += seconds
            if start == today:
                total[0] += seconds
    answer["users"] = [
        {"user": name, "gpu_seconds_today": today_s, "gpu_seconds": all_s}
        for name, (today_s, all_s) in sorted(totals.items())
    ]
    named = sorted(set(groups))
    by_group: dict[str, dict[str, Any]] = {
        g: {"group": g, "members": [], "gpu_seconds_today": 0.0, "gpu_seconds": 0.0} for g in named
    }
    for name, (today_s, all_s) in sorted(totals.items()):
        for group in sorted(set(groups_of(name)) & set(named)):
            entry = by_group[group]
            entry["members"].append(name)
            entry["gpu_seconds_today"] += today_s
            entry["gpu_seconds"] += all_s
    answer["groups"] = list(by_group.values())
    return answer


def _seconds_by_user(ledger: Ledger, since: float, until: float, user: str | None) -> dict:
    if until <= since:
        return {}
    return {
        row["user"]: row["gpu_seconds"] for row in ledger.usage(since=since, until=until, user=user)
    }
