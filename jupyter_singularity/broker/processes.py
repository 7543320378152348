"""What the broker can tell about processes from the OS: alive or not, and which process a pid is.

A pid alone is not an identity: after a crash and a reboot, or simply much later, another process may
have the pid a broker or a kernel had. Its start time (``/proc/<pid>/stat``, Linux) tells them apart.
Nor is a pid the same number everywhere: a process in its own pid namespace (a container, apptainer
``--pid``) knows itself by another number than the broker does (``NSpid`` in ``/proc/<pid>/status``
lists both); the driver tier and NVML need the broker's.
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


def kernel_pid(claimed: int, peer: int | None, launched: int | None) -> int | None:
    """The pid, in this process's pid namespace, of the kernel that says its pid is ``claimed``
    (its own view: ``os.getpid()`` there); None where the OS cannot confirm one.

    ``peer`` is the process that sent the claim, as the OS reports it (SO_PEERCRED): it is the
    kernel, unless its own view of its pid differs from the claim, which raises ValueError (not
    the kernel's runtime speaking). Without a peer (TCP, or a peer in a pid namespace this process
    cannot see), the claim is looked for among ``launched`` (the process the provisioner started,
    maybe a wrapper such as ``conda run`` or a shell) and its descendants."""
    if peer is not None:
        own = _own_pid(peer)
        if own is not None and own != claimed:
            raise ValueError(
                f"the sending process (pid {peer} here) is pid {own} in its own namespace, "
                f"not {claimed}"
            )
        return peer
    if launched is None:
        return None
    for pid in (launched, *_descendants(launched)):
        if _own_pid(pid) == claimed:
            return pid
    return None


def launched_pid(claimed: int, server: int) -> int | None:
    """The pid, in this process's pid namespace, of the process that the server ``server`` (a
    pid here) started and knows as ``claimed`` (in the server's own namespace, which differs from
    this one in a container); None where no descendant of the server is that process."""
    for pid in _descendants(server):
        if _own_pid(pid) == claimed:
            return pid
    return None


def _own_pid(pid: int) -> int | None:
    """The pid ``pid`` has in its own (innermost) pid namespace: the last of ``NSpid``; None
    where /proc does not say (not Linux, before Linux 4.1, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        return None
    return None


def _descendants(root: int) -> list[int]:
    """The processes below ``root`` in the process tree, nearest first (empty without /proc)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, frontier = [], [root]
    while frontier:
        frontier = [child for pid in frontier for child in sorted(children.get(pid, []))]
        found += frontier
    return found
