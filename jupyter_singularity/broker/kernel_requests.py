"""The kernels' requests to the broker (hello, acquire, release, status...), answered for the
service: each ``_on_<type>`` method takes one decoded, authenticated message of its kernel.

Authenticated is not trusted: every number a kernel reports is checked here, at the edge, with the
helpers of :mod:`..protocol` (GPU bytes up to the device's size, host and disk bytes up to
``MAX_STORED_BYTES``, a pid positive, a flag a boolean). A bad field is answered with an error
naming it, and the core is not told anything.

A mixin of :class:`~.service.BrokerService`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..protocol import (
    MAX_PID,
    MAX_STORED_BYTES,
    REQUIRED,
    FieldError,
    Message,
    count_field,
    error_text,
    flag_field,
    seconds_field,
    text_field,
    transfer_field,
)
from .model import BrokerError
from .processes import kernel_pid

#: The answer to a kernel that speaks to a restarted node broker before saying hello to it.
REJOIN_FIRST = "the GPU pool's broker restarted: this kernel must say hello to it again"

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
    owner_uid: int | None = None
    """The uid of the kernel's owner (None: not known, or not a local user)."""
    peer_pid: int | None = None
    """The pid of the process that sent the kernel's last message, as the OS says it."""
    launched_pid: int | None = None
    """The process the provisioner started (maybe a wrapper: a shell, ``conda run``), watched
    for its death until the kernel says hello."""
    pid: int | None = None
    """The kernel's own process, verified with the OS at hello (see ``processes.kernel_pid``):
    the one the driver tier checkpoints and NVML is asked about. None: not verified (yet)."""
    missed_pings: int = 0
    checkpointed_uuid: str | None = None
    """UUID of the GPU the driver tier checkpointed this kernel's process off, if it did."""
    driver_bytes: int = 0
    """GPU memory of the process the driver tier keeps in host memory while it holds it."""
    driver_busy: asyncio.Future | None = None
    """The driver tier moving the process for a swap (see .swaps): bringing it back ahead of its
    grant, or taking it back after a swap it was not granted. A grant waits for it."""
    unusable: str = ""
    """Why the process cannot use CUDA any more (a failed driver checkpoint left it so): its GPU
    cells are refused with this until the kernel is restarted."""
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
    said_hello: bool = False
    """Whether the kernel said hello to this run of the broker (see :meth:`_handle`)."""


class KernelRequests:
    """Answers to the kernels' requests (see the module docstring)."""

    core: BrokerCore
    inventory: DeviceInventory
    log: logging.Logger
    verify_peers: bool
    node: bool
    instance: str
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
        peer = msg.peer
        if self.verify_peers and (peer is None or peer.uid != connection.owner_uid):
            # The key was right, the process is not its owner's: refuse, and say nothing more.
            self.log.warning(
                "jupyter-singularity: refused %s for kernel %s from a process of uid %s (its "
                "owner's uid is %s)",
                msg.type,
                kernel_id,
                None if peer is None else peer.uid,
                connection.owner_uid,
            )
            return {"error": "refused: this process may not speak for this kernel"}
        connection.peer_pid = None if peer is None or peer.pid <= 0 else peer.pid
        self._heard_from(kernel_id, connection)
        if self.node and not connection.said_hello and msg.type != "hello":
            # A kernel of the previous run (this broker restarted): until its hello says what it
            # holds, nothing it asks can be decided; ``rejoin`` tells it to say hello again.
            return {"error": REJOIN_FIRST, "rejoin": True, "instance": self.instance}
        handler = getattr(self, f"_on_{msg.type}", None)
        if handler is None:
            return {"error": f"unknown request {msg.type!r}"}
        try:
            return handler(kernel_id, connection, body, now)
        except BrokerError as err:
            return {"error": str(err)}
        except FieldError as err:
            self.log.warning(
                "jupyter-singularity: refused %s from %s: %s", msg.type, kernel_id, err
            )
            return {"error": f"{msg.type} refused: {err}"}
        except (KeyError, TypeError, ValueError) as err:
            self.log.warning(
                "jupyter-singularity: bad %s request from %s: %r", msg.type, kernel_id, err
            )
            return {"error": f"malformed {msg.type} request: {err!r}"}

    def _on_hello(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> dict:
        """A kernel joins this run of the broker: at its start, or again after a restart, when
        ``holds`` says where its GPU state is (see :meth:`_holdings`)."""
        claimed = count_field(body, "pid", MAX_PID, minimum=1)
        holds = self._holdings(kernel_id, body.get("holds"))
        # The OS says which process speaks: the kernel itself, also where the provisioner started
        # a wrapper (a shell, conda run) or the kernel runs in its own pid namespace.
        try:
            pid = kernel_pid(claimed, connection.peer_pid, connection.launched_pid)
        except ValueError as err:
            raise FieldError(f"pid: {err}") from None
        if pid is None:
            self.log.warning(
                "jupyter-singularity: kernel %s says it is pid %d, which this broker cannot "
                "confirm (another pid namespace?): no driver tier or NVML figures for it",
                kernel_id,
                claimed,
            )
        connection.pid = pid
        connection.said_hello = True
        if holds is not None:
            self._apply(self.core.rejoin(kernel_id, now, **holds))
        return {
            "kernel": self.kernel(kernel_id),
            "simulated": self.inventory.simulated,
            "instance": self.instance,
        }

    def _holdings(self, kernel_id: str, holds: Any) -> dict | None:
        """A hello's ``holds``, checked: ``device`` (the UUID of the GPU the kernel last ran on,
        or null), ``gpu_bytes`` there, ``host_bytes``, ``disk_bytes``, ``peak_bytes`` (null or
        absent: unknown) and ``running``. A GPU no longer in the pool is logged and left out."""
        if holds is None:
            return None
        if not isinstance(holds, dict):
            raise FieldError(f"field 'holds' must be an object, not {holds!r:.60}")
        uuid = text_field(holds, "device", default=None)
        device = None
        if uuid is not None:
            try:
                device = self._device_index(uuid)
            except BrokerError:
                self.log.warning(
                    "jupyter-singularity: kernel %s rejoined with state on GPU %s, which is not in "
                    "this pool: only its host and disk state is booked",
                    kernel_id,
                    uuid,
                )
        limit = (
            self._gpu_limit(kernel_id) if device is None else self.core.devices[device].total_bytes
        )
        try:
            return {
                "device": device,
                "gpu_bytes": count_field(holds, "gpu_bytes", limit) if device is not None else 0,
                "host_bytes": count_field(holds, "host_bytes", MAX_STORED_BYTES),
                "disk_bytes": count_field(holds, "disk_bytes", MAX_STORED_BYTES),
                "peak_bytes": count_field(holds, "peak_bytes", limit, default=None),
                "running": flag_field(holds, "running"),
            }
        except FieldError as err:
            raise FieldError(f"holds: {err}") from None

    def _on_ping(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> dict:
        """A kernel checks that the broker is still there, and still the run it joined."""
        return {"instance": self.instance}

    def _on_status(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> dict:
        kernel = self.core.kernels[kernel_id]
        return {
            "kernel": self.kernel(kernel_id),
            "quota": self.quota(kernel.user, kernel.groups),
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
        return {"kernel": self.pin(kernel_id, flag_field(body, "pinned"))}

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
        request_id = text_field(body, "request_id")
        if connection.unusable:
            return {"granted": False, "reason": connection.unusable}
        # A reservation larger than any device is refused by the core, with the sizes.
        memory = count_field(body, "memory", MAX_STORED_BYTES, default=None)
        bound = text_field(body, "bound_uuid", default=None)  # CUDA in the kernel chose this GPU
        device = None if bound is None else self._device_index(bound)
        waiter = asyncio.get_running_loop().create_future()
        connection.waiters[request_id] = waiter
        try:
            self._apply(self.core.acquire(kernel_id, request_id, now, memory, device))
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
        request_id = text_field(body, "request_id")
        self._apply(self.core.cancel(kernel_id, request_id, now))
        waiter = connection.waiters.get(request_id)
        if waiter is not None and not waiter.done():
            waiter.set_result({"granted": False, "reason": "cancelled"})

    def _on_release(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> None:
        request_id = text_field(body, "request_id")
        limit = self._gpu_limit(kernel_id)
        peak_bytes = count_field(body, "peak_bytes", limit, default=None)
        gpu_bytes = count_field(body, "gpu_bytes", limit, default=None)
        idle = seconds_field(body, "idle_seconds") if "idle_seconds" in body else 0.0
        self._apply(
            self.core.release(
                kernel_id,
                request_id,
                now,
                peak_bytes=peak_bytes,
                gpu_bytes=self._held_bytes(kernel_id, connection, gpu_bytes),
                idle_seconds=idle,
            )
        )

    def _on_restored(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> None:
        gpu_bytes = count_field(body, "gpu_bytes", self._gpu_limit(kernel_id), default=None)
        connection.transfer = transfer_field(body)
        self._apply(
            self.core.restored(
                kernel_id, now, gpu_bytes=self._held_bytes(kernel_id, connection, gpu_bytes)
            )
        )

    def _on_restore_failed(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> None:
        reason = error_text(body.get("reason") or "unknown")
        self._apply(self.core.restore_failed(kernel_id, reason, now))

    # ------------------------------------------------------------------ numbers kernels report

    def _gpu_limit(self, kernel_id: str) -> int:
        """The most GPU bytes a kernel can report: its device's size (before it has one, the
        largest device's)."""
        device = self.core.kernels[kernel_id].device
        if device is not None:
            return self.core.devices[device].total_bytes
        return max((info.total_bytes for info in self.core.devices.values()), default=0)

    def _held_bytes(
        self, kernel_id: str, connection: KernelConnection, reported: int | None
    ) -> int | None:
        """What a kernel holds on its device: its report, or the driver's figure for its process
        (NVML, on real GPUs) where that is larger, so a kernel cannot book less than it holds."""
        device = self.core.kernels[kernel_id].device
        if reported is None or device is None or connection.pid is None:
            return reported
        return max(reported, self.inventory.process_memory(device).get(connection.pid, 0))

    def _reported(
        self,
        kernel_id: str,
        what: str,
        reply: dict,
        gpu: tuple[str, ...] = (),
        stored: tuple[str, ...] = (),
        default: Any = REQUIRED,
    ) -> dict:
        """A kernel's reply to an offload, spill or restore request with its numbers checked:
        the ``gpu`` fields up to the device's size, the ``stored`` (host, disk) ones up to
        MAX_STORED_BYTES, absent ones ``default`` (or an error when required), and its transfer
        record. A bad field turns it into an error reply naming the field: the move failed."""
        if "error" in reply:
            return reply
        limit = self._gpu_limit(kernel_id)
        try:
            checked = {name: count_field(reply, name, limit, default=default) for name in gpu}
            for name in stored:
                checked[name] = count_field(reply, name, MAX_STORED_BYTES, default=default)
            checked["transfer"] = transfer_field(reply)
        except FieldError as err:
            self.log.warning("jupyter-singularity: bad %s reply from %s: %s", what, kernel_id, err)
            return {"error": f"bad {what} reply: {err}"}
        return checked

    def _on_discarded(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> dict:
        """``%singularity discard``: the kernel dropped its damaged state; what is left, where."""
        host_bytes = count_field(body, "host_bytes", MAX_STORED_BYTES)
        disk_bytes = count_field(body, "disk_bytes", MAX_STORED_BYTES)
        self._apply(self.core.discarded(kernel_id, now, host_bytes, disk_bytes))
        return {"kernel": self.kernel(kernel_id)}
