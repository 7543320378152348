"""What the broker can tell about processes from the OS: alive or not, and which process a pid is.

A pid alone is not an identity: after a crash and a reboot, or simply much later, another process may
have the pid a broker or a kernel had. Its start time (``/proc/<pid>/stat``, Linux) tells them apart.
"""

from __future__ import annotations

import os
import socket


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return True


def process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), or None where the OS does not say."""
    try:
        return _stat_fields(pid)[19]
    except (OSError, IndexError):
        return None


def this_process() -> dict:
    """How the ledger records this broker, so that a later broker can tell if it still runs."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "process_start": process_start(pid)}


def broker_alive(record: dict) -> bool:
    """Whether the broker of a ledger record (see :func:`this_process`) still runs. A broker on
    another host cannot be checked from here and counts as running."""
    if record.get("host") != socket.gethostname():
        return True
    pid = int(record["pid"])
    if not alive(pid):
        return False
    started = record.get("process_start")
    return started is None or process_start(pid) in (None, started)


def _stat_fields(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3, the state, first)."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
        return stat.read().rsplit(")", 1)[1].split()
