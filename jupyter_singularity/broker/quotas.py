"""Quota configuration: parsing, validation and the limits that apply to one user.

Admins write quotas as a dict keyed ``default``, ``user:NAME`` and ``group:NAME``. A user's limit for
each resource is their ``user:`` entry if it sets one, else the most generous of their groups' entries,
else ``default``, else unlimited. Validation happens here, once, so that a typo in a quota file is
reported with the key and resource it concerns instead of surfacing later as a strange decision.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..units import parse_size

HOUR = 3600.0


class QuotaError(ValueError):
    """A quota configuration that cannot be used, with a message naming the offending entry."""


@dataclass(frozen=True)
class Limits:
    """What one user may use. ``None`` means unlimited."""

    gpu_memory: int | None = None
    """Bytes of GPU memory the user's kernels may hold resident (booked) at once."""
    gpu_seconds_per_day: float | None = None
    """Seconds of leased GPU time per UTC day."""
    max_resident_kernels: int | None = None
    """Kernels of the user that may hold GPU state at once."""
    host_memory: int | None = None
    """Bytes of offloaded state the user may keep in host memory before it spills to disk."""
    priority: float = 1.0
    """Weight in fair share and eviction: a higher weight waits less and is evicted later."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RESOURCES = (*(f.name for f in fields(Limits)), "gpu_hours_per_day")


def _positive_number(key: str, resource: str, value: Any, scale: float = 1.0) -> float:
    """``value * scale`` as a float, finite and >= 0: an infinite limit would reach the REST
    answers as ``Infinity``, which is not JSON (leave a resource out for no limit)."""
    number = math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):  # an int too large for a float
            number = float(value) * scale
    if not (math.isfinite(number) and number >= 0):
        raise QuotaError(
            f"quota {key!r}: {resource} must be a number >= 0 and finite (leave it out for no "
            f"limit), not {value!r}"
        )
    return number


def _parse_entry(key: str, entry: Any) -> dict[str, Any]:
    if not isinstance(entry, Mapping):
        raise QuotaError(f"quota {key!r} must be a mapping of resource to limit, not {entry!r}")
    parsed: dict[str, Any] = {}
    for resource, value in entry.items():
        if resource not in RESOURCES:
            known = ", ".join(RESOURCES)
            raise QuotaError(f"quota {key!r}: unknown resource {resource!r} (known: {known})")
        if value is None:
            continue
        if resource in ("gpu_memory", "host_memory"):
            try:
                parsed[resource] = parse_size(value)
            except (ValueError, TypeError) as err:  # TypeError: a float or bool, not a size
                raise QuotaError(f"quota {key!r}: {resource}: {err}") from None
        elif resource == "gpu_hours_per_day":
            parsed["gpu_seconds_per_day"] = _positive_number(key, resource, value, HOUR)
        elif resource == "gpu_seconds_per_day":
            parsed[resource] = _positive_number(key, resource, value)
        elif resource == "max_resident_kernels":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise QuotaError(
                    f"quota {key!r}: {resource} must be an integer >= 0, not {value!r}"
                )
            parsed[resource] = value
        else:
            weight = _positive_number(key, resource, value)
            if weight == 0:
                raise QuotaError(f"quota {key!r}: priority must be > 0")
            parsed[resource] = weight
    return parsed


@dataclass(frozen=True)
class Quotas:
    """A validated quota configuration."""

    entries: Mapping[str, Mapping[str, Any]]

    @classmethod
    def parse(cls, config: Mapping[str, Any] | None) -> Quotas:
        """Validate an admin's quota dict; raises :class:`QuotaError` with a readable message."""
        if config is None:
            return cls({})
        if not isinstance(config, Mapping):
            raise QuotaError(
                f"quotas must be a mapping keyed 'default', 'user:NAME' or 'group:NAME', not {config!r}"
            )
        entries: dict[str, dict[str, Any]] = {}
        for key, entry in config.items():
            if not isinstance(key, str) or not (
                key == "default" or (key.startswith(("user:", "group:")) and key.split(":", 1)[1])
            ):
                raise QuotaError(f"quota key {key!r}: use 'default', 'user:NAME' or 'group:NAME'")
            entries[key] = _parse_entry(key, entry)
        return cls(entries)

    def limits_for(self, user: str, groups: Iterable[str] = ()) -> Limits:
        """The limits that apply to ``user`` (see the module docstring for the precedence)."""
        own = self.entries.get(f"user:{user}", {})
        group_entries = [self.entries[f"group:{g}"] for g in groups if f"group:{g}" in self.entries]
        default = self.entries.get("default", {})
        values: dict[str, Any] = {}
        for f in fields(Limits):
            name = f.name
            if name in own:
                values[name] = own[name]
            elif any(name in g for g in group_entries):
                values[name] = max(g[name] for g in group_entries if name in g)
            elif name in default:
                values[name] = default[name]
        return Limits(**values)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {key: dict(entry) for key, entry in self.entries.items()}
