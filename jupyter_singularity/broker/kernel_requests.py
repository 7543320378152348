"""The kernels' requests to the broker (hello, acquire, release, status...), answered for the
service: each ``_on_<type>`` method takes one decoded, authenticated message of its kernel.

A mixin of :class:`~.service.BrokerService`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..protocol import Message
from .model import BrokerError

if TYPE_CHECKING:
    import logging

    from ..devices import DeviceInventory
    from .core import BrokerCore
    from .model import Action


@dataclass
class KernelConnection:
    """What the service knows of one kernel beside the core's record: its key, its process, the
    driver tier's doing, and the cells waiting for an answer."""

    key: bytes
    pid: int | None = None
    missed_pings: int = 0
    checkpointed_uuid: str | None = None
    """UUID of the GPU the driver tier checkpointed this kernel's process off, if it did."""
    context_note: str = ""
    """Why the kernel's CUDA context stayed on the GPU after an offload, if it did."""
    context_seconds: dict[str, float] = field(default_factory=dict)
    """How long the driver tier's last checkpoint and restore of this kernel took."""
    transfer: dict | None = None
    """The kernel's report of its last offload, restore or spill (bytes, seconds), recorded with
    the state change it caused."""
    stopping: str = ""
    """Why the kernel's process is about to exit (shut down, restarted), when the server said so."""
    waiters: dict[str, asyncio.Future] = field(default_factory=dict)
    last_heard: float = 0.0
    """When the kernel last sent anything (a request, a reply, a ping answer)."""
    pinging: bool = False
    stalled_since: float | None = None
    """When it last answered, if it stopped answering (see :mod:`.watchdog`)."""
    revoked: bool = False
    """Its lease was revoked while it was stalled: the driver holds its process checkpointed."""
    blocked_device: int | None = None
    """The GPU that takes no new work because this stalled kernel holds a lease there."""


class KernelRequests:
    """Answers to the kernels' requests (see the module docstring)."""

    core: BrokerCore
    inventory: DeviceInventory
    log: logging.Logger
    owner: str
    owner_groups: tuple[str, ...]
    _connections: dict[str, KernelConnection]
    _apply: Callable[[list[Action]], None]
    kernel: Callable[[str], dict]
    pool: Callable[[], dict]
    quota: Callable[..., dict]
    offload: Callable[[str], dict]
    restore: Callable[[str], dict]
    pin: Callable[..., dict]
    _heard_from: Callable[[str, KernelConnection], None]

    def _key_for(self, kernel_id: str) -> bytes | None:
        connection = self._connections.get(kernel_id)
        return None if connection is None else connection.key

    def _handle(self, msg: Message) -> dict | Awaitable[dict] | None:
        """One request from a kernel's runtime, answered at once where possible (an awaitable
        only when it must wait, as a cell for its lease); readable errors go back as
        ``{"error": ...}``."""
        kernel_id, body, now = msg.kernel_id, msg.body, self.clock()
        connection = self._connections.get(kernel_id)
        if connection is None or kernel_id not in self.core.kernels:
            return {"error": "this kernel is not registered with the pool"}
        self._heard_from(kernel_id, connection)
        handler = getattr(self, f"_on_{msg.type}", None)
        if handler is None:
            return {"error": f"unknown request {msg.type!r}"}
        try:
            return handler(kernel_id, connection, body, now)
        except BrokerError as err:
            return {"error": str(err)}
        except (KeyError, TypeError, ValueError) as err:
            self.log.warning(
                "jupyter-singularity: bad %s request from %s: %r", msg.type, kernel_id, err
            )
            return {"error": f"malformed {msg.type} request: {err!r}"}

    def _on_hello(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> dict:
        pid = int(body["pid"])
        if connection.pid is None:
            connection.pid = pid
        return {"kernel": self.kernel(kernel_id), "simulated": self.inventory.simulated}

    def _on_status(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> dict:
        return {
            "kernel": self.kernel(kernel_id),
            "quota": self.quota(self.owner, self.owner_groups),
            "queue": self.pool()["queue"],
        }

    def _on_offload_me(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> dict:
        return {"kernel": self.offload(kernel_id)}

    def _on_restore_me(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> dict:
        record = self.restore(kernel_id)
        queued = [q for q in self.pool()["queue"] if q["kernel_id"] == kernel_id]
        return {"kernel": record, "queue": queued[0] if queued else None}

    def _on_pin(self, kernel_id: str, connection: KernelConnection, body: dict, now: float) -> dict:
        return {"kernel": self.pin(kernel_id, bool(body["pinned"]))}

    def _on_devices(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> dict:
        pool = self.pool()
        devices = [
            {
                **device,
                "kernels": sum(1 for k in pool["kernels"] if k["device"] == device["index"]),
                "running": sum(
                    1 for k in pool["kernels"] if k["device"] == device["index"] and k["lease"]
                ),
            }
            for device in pool["devices"]
        ]
        return {
            "devices": devices,
            "inventory": pool["inventory"],
            "kernel": self.kernel(kernel_id),
        }

    def _on_acquire(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> dict | Awaitable[dict]:
        request_id = str(body["request_id"])
        memory = body.get("memory")
        bound = body.get("bound_uuid")  # CUDA in the kernel already chose this GPU
        device = None if bound is None else self._device_index(str(bound))
        waiter = asyncio.get_running_loop().create_future()
        connection.waiters[request_id] = waiter
        try:
            self._apply(
                self.core.acquire(
                    kernel_id, request_id, now, None if memory is None else int(memory), device
                )
            )
        except BaseException:
            connection.waiters.pop(request_id, None)
            raise
        if waiter.done():  # granted or denied at once: the common case, answered without a task
            connection.waiters.pop(request_id, None)
            return waiter.result()
        return self._until_answered(connection, request_id, waiter)

    def _device_index(self, uuid: str) -> int:
        for index, info in self.core.devices.items():
            if info.uuid == uuid:
                return index
        raise BrokerError(f"GPU {uuid} is not in this pool")

    async def _until_answered(
        self, connection: KernelConnection, request_id: str, waiter: asyncio.Future
    ) -> dict:
        try:
            return await waiter
        finally:
            connection.waiters.pop(request_id, None)

    def _on_cancel(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> None:
        request_id = str(body["request_id"])
        self._apply(self.core.cancel(kernel_id, request_id, now))
        waiter = connection.waiters.get(request_id)
        if waiter is not None and not waiter.done():
            waiter.set_result({"granted": False, "reason": "cancelled"})

    def _on_release(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> None:
        self._apply(
            self.core.release(
                kernel_id,
                str(body["request_id"]),
                now,
                peak_bytes=_optional_int(body.get("peak_bytes")),
                gpu_bytes=_optional_int(body.get("gpu_bytes")),
            )
        )

    def _on_restored(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> None:
        connection.transfer = body.get("transfer")
        self._apply(
            self.core.restored(kernel_id, now, gpu_bytes=_optional_int(body.get("gpu_bytes")))
        )

    def _on_restore_failed(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> None:
        self._apply(self.core.restore_failed(kernel_id, str(body.get("reason", "unknown")), now))

    def _on_discarded(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> dict:
        """``%singularity discard``: the kernel dropped its damaged state; what is left, where."""
        host_bytes, disk_bytes = _size(body, "host_bytes"), _size(body, "disk_bytes")
        self._apply(self.core.discarded(kernel_id, now, host_bytes, disk_bytes))
        return {"kernel": self.kernel(kernel_id)}


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _size(body: dict, name: str) -> int:
    """A byte count a kernel reports: a non-negative integer, or the request is refused."""
    value = body[name]
    if type(value) is not int or value < 0:
        raise BrokerError(f"{name} must be a non-negative integer of bytes, not {value!r}")
    return value
