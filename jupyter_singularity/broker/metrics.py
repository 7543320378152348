"""Prometheus metrics of the pool: a snapshot of now, and what happened between scrapes.

A private :class:`~prometheus_client.CollectorRegistry` per scrape keeps these metrics out of the
server's global registry (jupyter_server serves that one at ``/metrics``), and building from one
snapshot means every number of a scrape describes the same instant. What a snapshot cannot show
(how long cells waited, how many bytes moved) is counted as it happens by a :class:`PoolMeter`.

Every metric carries a ``node`` label, the broker's node name, so that one Prometheus scraping
every GPU node of a cluster tells the nodes apart (docs/deploy/kubernetes.md, deploy/grafana/).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .model import Grant, KernelState, StateChanged

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "singularity"

#: The transfers a kernel reports, by the state they end (see BrokerService.TRANSFER_STATES).
TRANSFER_DIRECTIONS = {
    KernelState.OFFLOADING: "offload",
    KernelState.RESTORING: "restore",
    KernelState.OFFLOADED: "spill",
    KernelState.QUEUED: "spill",
}
#: Seconds: a cell that waits a moment, a restore, a queue behind a long training cell.
WAIT_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: Seconds: a transfer at PCIe speed (~50 GB/s) to a slow disk's (~100 MB/s) for tens of GiB.
TRANSFER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _Histogram:
    """Cumulative bucket counts of one labelled series (what HistogramMetricFamily wants)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        running, out = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class PoolMeter:
    """Counts what happens between scrapes, fed by the service as it carries out the core's
    actions: how long each granted cell waited in the queue, each transfer's bytes and seconds,
    and the groups of the users it granted leases to (usage by group)."""

    def __init__(self) -> None:
        self.queue_wait = _Histogram(WAIT_BUCKETS)
        self.transfer_seconds = {d: _Histogram(TRANSFER_BUCKETS) for d in _directions()}
        self.transfer_bytes = dict.fromkeys(_directions(), 0)
        self.groups: dict[str, tuple[str, ...]] = {}
        self._queued_since: dict[str, float] = {}

    def granted(self, grant: Grant, user: str, groups: Iterable[str]) -> None:
        """A lease was granted: a cell's (``hold``) wait is observed, 0 when it did not queue."""
        queued = self._queued_since.pop(grant.kernel_id, grant.start)
        if grant.hold:
            self.queue_wait.observe(max(0.0, grant.start - queued))
        self.groups[user] = tuple(groups)

    def state_changed(self, change: StateChanged, transfer: Mapping[str, Any] | None) -> None:
        """A kernel changed state; ``transfer`` is the kernel's report of the move that ended
        (bytes, seconds), if one did."""
        if change.new == KernelState.QUEUED:
            self._queued_since[change.kernel_id] = change.time
        elif change.old == KernelState.QUEUED or change.new is None:
            self._queued_since.pop(change.kernel_id, None)  # denied, or gone, without a grant
        direction = None if change.old is None else TRANSFER_DIRECTIONS.get(change.old)
        if transfer is None or direction is None:
            return
        nbytes, seconds = transfer.get("nbytes"), transfer.get("seconds")
        if isinstance(nbytes, int) and nbytes >= 0:
            self.transfer_bytes[direction] += nbytes
        if isinstance(seconds, (int, float)) and seconds >= 0:
            self.transfer_seconds[direction].observe(float(seconds))


def _directions() -> list[str]:
    return sorted(set(TRANSFER_DIRECTIONS.values()))


class PoolCollector(Collector):
    """Yields the pool's metrics from ``pool`` (``BrokerService.pool()``), today's usage and the
    ``meter``, each labelled with ``node``."""

    def __init__(
        self,
        pool: Mapping[str, Any],
        gpu_seconds_today: Mapping[str, float],
        meter: PoolMeter,
        node: str,
    ) -> None:
        self.pool = pool
        self.gpu_seconds_today = gpu_seconds_today
        self.meter = meter
        self.node = node

    def _gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["node", *labels])

    def collect(self) -> Iterator[Metric]:
        pool, node = self.pool, self.node
        inventory = pool.get("inventory", {})
        devices = pool.get("devices", [])
        kernels = pool.get("kernels", [])

        info = self._gauge(
            "inventory_info",
            "Where the pool's devices come from (kind: nvml, simulated or none); always 1.",
            ["kind", "simulated"],
        )
        info.add_metric(
            [node, str(inventory.get("kind", "")), str(bool(inventory.get("simulated"))).lower()],
            1,
        )
        yield info

        count = self._gauge("devices", "Devices in the pool.")
        count.add_metric([node], len(devices))
        yield count

        labels = ["device", "uuid", "name"]
        total = self._gauge("device_memory_total_bytes", "Memory of each device.", labels)
        booked = self._gauge(
            "device_memory_booked_bytes",
            "Device memory booked by kernels (idle footprints and running cells' reservations).",
            labels,
        )
        used = self._gauge(
            "device_memory_used_bytes",
            "Device memory in use as the driver (NVML) reports it; absent where it cannot say "
            "(simulated devices).",
            labels,
        )
        leases = self._gauge(
            "device_leases", "Cells running on each device under a lease (0: idle).", labels
        )
        running: dict[int, int] = {}
        for kernel in kernels:
            if kernel.get("lease") is not None:
                device = kernel["lease"]["device"]
                running[device] = running.get(device, 0) + 1
        for device in devices:
            values = [
                node,
                str(device["index"]),
                str(device.get("uuid", "")),
                str(device.get("name", "")),
            ]
            total.add_metric(values, device["total_bytes"])
            booked.add_metric(values, device.get("booked_bytes", 0))
            if device.get("used_bytes") is not None:
                used.add_metric(values, device["used_bytes"])
            leases.add_metric(values, running.get(device["index"], 0))
        yield from (total, booked, used, leases)

        by_state = self._gauge("kernels", "Kernels in the pool, by state.", ["state"])
        counts = dict.fromkeys((state.value for state in KernelState), 0)
        for kernel in kernels:
            counts[kernel["state"]] = counts.get(kernel["state"], 0) + 1
        for state, number in counts.items():
            by_state.add_metric([node, state], number)
        yield by_state

        queue = self._gauge(
            "queue_length", "Lease requests (cells or restores) waiting for a device."
        )
        queue.add_metric([node], len(pool.get("queue", [])))
        yield queue

        offloaded = self._gauge(
            "offloaded_bytes",
            "Kernel state held off the GPU, by tier (host memory or disk).",
            ["tier"],
        )
        offloaded.add_metric([node, "host"], sum(k.get("host_bytes", 0) for k in kernels))
        offloaded.add_metric([node, "disk"], sum(k.get("disk_bytes", 0) for k in kernels))
        yield offloaded

        usage = self._gauge(
            "gpu_seconds_today",
            "GPU-seconds leased since UTC midnight, per user (running leases count so far).",
            ["user"],
        )
        for user, seconds in sorted(self.gpu_seconds_today.items()):
            usage.add_metric([node, user], seconds)
        yield usage

        yield from self._meter_families()

    def _meter_families(self) -> Iterator[Metric]:
        meter, node = self.meter, self.node
        groups = self._gauge(
            "user_group_info",
            "The groups of each user granted a lease since the broker started (one series per "
            "user and group; always 1): join it with gpu_seconds_today for usage by group.",
            ["user", "group"],
        )
        for user, names in sorted(meter.groups.items()):
            for group in names:
                groups.add_metric([node, user, group], 1)
        yield groups

        wait = HistogramMetricFamily(
            f"{PREFIX}_queue_wait_seconds",
            "How long each granted cell waited for its lease (0 when granted at once).",
            labels=["node"],
        )
        wait.add_metric([node], meter.queue_wait.buckets(), meter.queue_wait.total)
        yield wait

        moved = CounterMetricFamily(
            f"{PREFIX}_transfer_bytes",
            "Bytes of kernel state moved, by direction (offload: GPU to host, restore: back to "
            "the GPU, spill: host to disk), as the kernels report them.",
            labels=["node", "direction"],
        )
        took = HistogramMetricFamily(
            f"{PREFIX}_transfer_seconds",
            "How long each offload, restore or spill took, as the kernels report it.",
            labels=["node", "direction"],
        )
        for direction, histogram in sorted(meter.transfer_seconds.items()):
            moved.add_metric([node, direction], meter.transfer_bytes[direction])
            took.add_metric([node, direction], histogram.buckets(), histogram.total)
        yield moved
        yield took


def render(
    pool: Mapping[str, Any],
    gpu_seconds_today: Mapping[str, float],
    meter: PoolMeter,
    node: str,
) -> bytes:
    """The Prometheus text exposition of the pool."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(pool, gpu_seconds_today, meter, node))
    return generate_latest(registry)
