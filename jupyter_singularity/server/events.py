"""The pool's jupyter_events schemas: what the browser hears through ``/api/events/subscribe``.

Each schema is a versioned YAML file ``event_schemas/<name>/v<version>.yaml`` whose ``$id`` is
``https://events.jupyter.org/jupyter_singularity/<name>/v<version>``. The broker service emits with
the constants below, or with the bare names ``kernel_state``, ``lease``, ``queue`` and ``pin``,
which :func:`schema_id` maps to the same ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jupyter_events import EventLogger

EVENTS_URI = "https://events.jupyter.org/jupyter_singularity"
SCHEMA_DIR = Path(__file__).parent / "event_schemas"

KERNEL_STATE_SCHEMA = f"{EVENTS_URI}/kernel_state/v1"
"""A kernel changed state: {kernel_id, user, old, new, device, reason}."""
LEASE_SCHEMA = f"{EVENTS_URI}/lease/v1"
"""A lease was granted, denied or ended: {kernel_id, request_id, action, device, reservation,
seconds, reason}."""
QUEUE_SCHEMA = f"{EVENTS_URI}/queue/v1"
"""A lease request waits: {kernel_id, request_id, position, reason}."""
PIN_SCHEMA = f"{EVENTS_URI}/pin/v1"
"""A kernel was pinned or unpinned: {kernel_id, user, pinned, by, state, reason}."""

SCHEMAS: dict[str, str] = {
    "kernel_state": KERNEL_STATE_SCHEMA,
    "lease": LEASE_SCHEMA,
    "queue": QUEUE_SCHEMA,
    "pin": PIN_SCHEMA,
}
"""Short name -> schema id, for every schema this package emits."""


def schema_id(name_or_id: str) -> str:
    """The schema id for a short name (``"lease"``) or an id; anything else raises KeyError."""
    if name_or_id in SCHEMAS.values():
        return name_or_id
    return SCHEMAS[name_or_id]


def schema_path(name_or_id: str) -> Path:
    """The YAML file that defines a schema."""
    relative = schema_id(name_or_id).removeprefix(EVENTS_URI + "/")
    return SCHEMA_DIR / f"{relative}.yaml"


def register_schemas(event_logger: EventLogger) -> None:
    """Register every schema with the server's event logger (idempotent)."""
    for sid in SCHEMAS.values():
        if sid not in event_logger.schemas.schema_ids:
            event_logger.register_event_schema(schema_path(sid))
