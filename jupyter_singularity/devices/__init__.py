"""GPU inventories: where the pool learns which devices exist, chosen by the `devices` setting."""

import re

from ..units import parse_size
from .base import DeviceInfo, DeviceInventory
from .host_memory import usable_memory
from .nvml import NvmlInventory
from .simulated import MAX_SIMULATED_DEVICES, SimulatedInventory, default_simulated_spec

__all__ = [
    "DeviceInfo",
    "DeviceInventory",
    "default_simulated_spec",
    "open_inventory",
    "usable_memory",
]

_SIMULATED_PREFIX = "simulated:"
_COUNT_TIMES_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(.+)$", re.IGNORECASE)


def open_inventory(spec: str) -> DeviceInventory:
    """Open the inventory a `devices` config value names.

    "auto" never fails for want of a driver (it yields an empty inventory with a reason);
    a malformed spec does fail, because a typo should not silently mean "no GPUs".
    """
    normalized = spec.strip()
    if normalized.lower() == "auto":
        return NvmlInventory.open()
    if normalized.lower().startswith(_SIMULATED_PREFIX):
        sizes = _simulated_sizes(spec, normalized[len(_SIMULATED_PREFIX) :])
        return SimulatedInventory(sizes, memory=usable_memory())
    raise _unknown(spec)


def _simulated_sizes(spec: str, body: str) -> list[int]:
    """Sizes from "2x16GiB" or "16GiB,8GiB"; bad sizes surface parse_size's message."""
    if not body.strip():
        raise _unknown(spec)
    match = _COUNT_TIMES_SIZE.match(body)
    if match is not None:
        count, size = int(match.group(1)), match.group(2)
        # Checked before building the list so "simulated:10**12x1GiB" cannot eat memory.
        if not 1 <= count <= MAX_SIMULATED_DEVICES:
            raise ValueError(
                f"invalid device spec {spec!r}: simulated device count must be between 1 and "
                f"{MAX_SIMULATED_DEVICES}, got {count}"
            )
        return [parse_size(size)] * count
    return [parse_size(size) for size in body.split(",")]


def _unknown(spec: str) -> ValueError:
    return ValueError(
        f"unknown device spec {spec!r}: use 'auto' (NVIDIA GPUs through NVML) or "
        "'simulated:NxSIZE' such as 'simulated:2x16GiB' (or a list of sizes such as "
        "'simulated:16GiB,8GiB')"
    )
