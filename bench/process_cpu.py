"""CPU time and page faults of processes, read from ``/proc`` (Linux), for benchmarks that must
say where a copy's time goes: user time (the copy itself), system time (mostly page faults into
fresh memory), and whether two processes' copies really ran at the same time."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Usage:
    """A process's cumulative CPU seconds (user, system) and minor page faults."""

    user: float
    system: float
    faults: int

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.user - other.user, self.system - other.system, self.faults - other.faults)

    @property
    def cpu(self) -> float:
        return self.user + self.system


def usage(pid: int) -> Usage:
    """Cumulative usage of ``pid`` and its threads (from ``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # After the name: state is field 3, so minflt (10), utime (14), stime (15) sit at 7, 11, 12.
    return Usage(int(fields[11]) / TICK, int(fields[12]) / TICK, int(fields[7]))


def cpu_stall() -> float:
    """Seconds so far during which some runnable task waited for a CPU (``/proc/pressure/cpu``),
    a measure of how shared the machine was; 0 where the kernel does not report it."""
    try:
        with open("/proc/pressure/cpu") as pressure:
            some = pressure.readline().split()
    except OSError:
        return 0.0
    return int(some[-1].split("=")[1]) / 1e6


class Busy:
    """Samples the CPU time of some processes every ``interval`` s while it runs, so as to tell
    when each was busy: its busy window runs from the first sample in which it used CPU to the
    last (``threshold`` s of CPU per sample counts as busy)."""

    def __init__(self, pids: dict[str, int], interval: float = 0.01, threshold: float = 0.005):
        self.pids, self.interval, self.threshold = pids, interval, threshold
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Busy:
        self._task = asyncio.ensure_future(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self._take()

    def _take(self) -> None:
        self.samples.append(
            (time.perf_counter(), {name: usage(pid).cpu for name, pid in self.pids.items()})
        )

    async def _sample(self) -> None:
        while True:
            self._take()
            await asyncio.sleep(self.interval)

    def window(self, name: str) -> tuple[float, float] | None:
        """(start, end) of the busy window of ``name`` (perf_counter seconds)."""
        busy = [
            (before, after)
            for (before, used), (after, used_after) in zip(
                self.samples, self.samples[1:], strict=False
            )
            if used_after[name] - used[name] >= self.threshold
        ]
        return (busy[0][0], busy[-1][1]) if busy else None

    def overlap(self, first: str, second: str) -> float:
        """Seconds during which both were busy."""
        a, b = self.window(first), self.window(second)
        if a is None or b is None:
            return 0.0
        return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
