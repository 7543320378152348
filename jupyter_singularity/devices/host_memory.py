"""The memory this server may use: simulated devices and the host-memory budget are sized from it."""

from __future__ import annotations

import os
from pathlib import Path

# Container memory limits (cgroup v2, then v1), as mounted inside the container: there the machine's
# RAM that sysconf reports is the host's, not what the server may use.
_CGROUP_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)


def usable_memory() -> int | None:
    """Bytes of RAM, or the container's memory limit when lower; None where neither can be read."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows) or no such name
        return None
    limits = [physical]
    for path in _CGROUP_LIMITS:
        try:
            limits.append(int(path.read_text().strip()))
        except (OSError, ValueError):  # absent, or "max" (no limit)
            continue
    return min(limits)
