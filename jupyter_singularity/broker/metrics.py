"""Prometheus metrics of the pool, built per scrape from a snapshot of the broker.

A private :class:`~prometheus_client.CollectorRegistry` per scrape keeps these metrics out of the
server's global registry (jupyter_server serves that one at ``/metrics``), and building from one
snapshot means every number of a scrape describes the same instant.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .model import KernelState

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "singularity"


class PoolCollector(Collector):
    """Yields the pool's metrics from ``pool`` (``BrokerService.pool()``) and today's usage."""

    def __init__(self, pool: Mapping[str, Any], gpu_seconds_today: Mapping[str, float]) -> None:
        self.pool = pool
        self.gpu_seconds_today = gpu_seconds_today

    def collect(self) -> Iterator[Metric]:
        pool = self.pool
        inventory = pool.get("inventory", {})
        devices = pool.get("devices", [])
        kernels = pool.get("kernels", [])

        info = GaugeMetricFamily(
            f"{PREFIX}_inventory_info",
            "Where the pool's devices come from (kind: nvml, simulated or none); always 1.",
            labels=["kind", "simulated"],
        )
        info.add_metric(
            [str(inventory.get("kind", "")), str(bool(inventory.get("simulated"))).lower()], 1
        )
        yield info

        yield GaugeMetricFamily(f"{PREFIX}_devices", "Devices in the pool.", value=len(devices))

        labels = ["device", "uuid", "name"]
        total = GaugeMetricFamily(
            f"{PREFIX}_device_memory_total_bytes", "Memory of each device.", labels=labels
        )
        booked = GaugeMetricFamily(
            f"{PREFIX}_device_memory_booked_bytes",
            "Device memory booked by kernels (idle footprints and running cells' reservations).",
            labels=labels,
        )
        for device in devices:
            values = [
                str(device["index"]),
                str(device.get("uuid", "")),
                str(device.get("name", "")),
            ]
            total.add_metric(values, device["total_bytes"])
            booked.add_metric(values, device.get("booked_bytes", 0))
        yield total
        yield booked

        by_state = GaugeMetricFamily(
            f"{PREFIX}_kernels", "Kernels in the pool, by state.", labels=["state"]
        )
        counts = dict.fromkeys((state.value for state in KernelState), 0)
        for kernel in kernels:
            counts[kernel["state"]] = counts.get(kernel["state"], 0) + 1
        for state, count in counts.items():
            by_state.add_metric([state], count)
        yield by_state

        yield GaugeMetricFamily(
            f"{PREFIX}_queue_length",
            "Lease requests (cells or restores) waiting for a device.",
            value=len(pool.get("queue", [])),
        )

        offloaded = GaugeMetricFamily(
            f"{PREFIX}_offloaded_bytes",
            "Kernel state held off the GPU, by tier (host memory or disk).",
            labels=["tier"],
        )
        offloaded.add_metric(["host"], sum(k.get("host_bytes", 0) for k in kernels))
        offloaded.add_metric(["disk"], sum(k.get("disk_bytes", 0) for k in kernels))
        yield offloaded

        usage = GaugeMetricFamily(
            f"{PREFIX}_gpu_seconds_today",
            "GPU-seconds leased since UTC midnight, per user (running leases count so far).",
            labels=["user"],
        )
        for user, seconds in sorted(self.gpu_seconds_today.items()):
            usage.add_metric([user], seconds)
        yield usage


def render(pool: Mapping[str, Any], gpu_seconds_today: Mapping[str, float]) -> bytes:
    """The Prometheus text exposition of the pool."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(pool, gpu_seconds_today))
    return generate_latest(registry)
