"""Moving a kernel's state off and back onto a GPU: the requests to the kernel (offload, spill,
restore) and the driver tier's checkpoint and restore of its process around them.

A mixin of :class:`~.service.BrokerService`: the core decided; this carries it out and feeds the
outcome back to the core.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..protocol import error_text
from ..units import format_size
from .checkpoint import CheckpointError, DriverCapability, DriverCheckpointer
from .kernel_requests import KernelConnection
from .model import Action, Grant, Offload, Spill
from .swaps import SwapRoom

if TYPE_CHECKING:
    from .core import BrokerCore
    from .rpc import RPCServer


class StateMoves(SwapRoom):
    """Offload, spill and restore, tensor tier and driver tier (see the module docstring)."""

    core: BrokerCore
    log: logging.Logger
    offload_timeout: float
    driver_capability: DriverCapability
    clock: Callable[[], float]
    _driver: DriverCheckpointer
    _rpc: RPCServer
    _connections: dict[str, KernelConnection]
    _apply: Callable[[list[Action]], None]
    _answer: Callable[[Grant], None]
    _resolve: Callable[[str, str, dict], None]
    _spill_dir_of: Callable[[str], Path | None]
    _reported: Callable[..., dict]

    async def _offload(self, action: Offload) -> None:
        """Ask the kernel to move its GPU state off the device, keeping at most ``host_limit``
        bytes in host memory and writing the rest to its spill directory; it answers with what
        it moved where. A victim making room for a waiting kernel frees it as it goes, for that
        kernel to restore meanwhile (``room``, see .swaps)."""
        directory = self._spill_dir_of(action.kernel_id)
        body = {
            "reason": action.reason,
            "host_limit": action.host_limit,
            "directory": None if directory is None else str(directory),
            "room": self._pair_swap(action),
        }
        try:
            reply = await self._rpc.request(
                action.kernel_id, "offload", body, timeout=self.offload_timeout
            )
        except (TimeoutError, asyncio.TimeoutError, ConnectionError, RuntimeError) as err:
            reply = {
                "error": f"kernel did not answer the offload request ({err or type(err).__name__})"
            }
        try:
            await self._offload_reported(action, reply)
        finally:
            self._victim_done(action.kernel_id)

    async def _offload_reported(self, action: Offload, reply: dict) -> None:
        if action.kernel_id not in self.core.kernels:
            return
        now = self.clock()
        refused = reply.get("tensor_refused")
        reply = self._reported(
            action.kernel_id,
            "offload",
            reply,
            ("gpu_bytes",),
            ("host_bytes", "disk_bytes"),
            default=0,
        )
        if "error" in reply:
            self.log.warning(
                "jupyter-singularity: kernel %s kept its GPU state: %s",
                action.kernel_id,
                reply["error"],
            )
            self._apply(
                self.core.offload_failed(
                    action.kernel_id,
                    str(reply["error"]),
                    now,
                    host_full=reply.get("host_full") is True,
                )
            )
        else:
            self._stash_transfer(action.kernel_id, reply)
            host_bytes, gpu_bytes = reply["host_bytes"], reply["gpu_bytes"]
            if gpu_bytes and await self._checkpoint_context(
                action.kernel_id, action.device, host_bytes, gpu_bytes
            ):
                # What was left on the GPU is now in host memory, the driver's copy of it.
                host_bytes, gpu_bytes = host_bytes + gpu_bytes, 0
            connection = self._connections.get(action.kernel_id)
            if connection is not None and connection.unusable:
                self._apply(
                    self.core.process_unusable(
                        action.kernel_id,
                        connection.unusable,
                        self.clock(),
                        host_bytes=host_bytes,
                        disk_bytes=reply["disk_bytes"],
                        gpu_bytes=gpu_bytes,
                    )
                )
                return
            if refused is not None and gpu_bytes:
                # The tensor tier moved nothing and the driver tier could not take the process.
                why = connection.context_note if connection is not None else ""
                self._apply(
                    self.core.offload_failed(
                        action.kernel_id,
                        f"{error_text(refused)}; the driver tier could not move the whole "
                        f"process instead: {why or 'not available'}",
                        self.clock(),
                    )
                )
                return
            self._apply(
                self.core.offloaded(
                    action.kernel_id,
                    self.clock(),
                    host_bytes=host_bytes,
                    disk_bytes=reply["disk_bytes"],
                    gpu_bytes=gpu_bytes,
                )
            )

    def _stash_transfer(self, kernel_id: str, reply: dict) -> None:
        connection = self._connections.get(kernel_id)
        if connection is not None:
            connection.transfer = reply.get("transfer")

    async def _spill(self, action: Spill) -> None:
        """Ask an offloaded kernel to move its host copy to its spill directory."""
        directory = self._spill_dir_of(action.kernel_id)
        connection = self._connections.get(action.kernel_id)
        # A process the driver holds checkpointed cannot make CUDA calls (free pinned memory).
        frozen = connection is not None and connection.checkpointed_uuid is not None
        try:
            if directory is None:
                raise RuntimeError("no spill directory is configured")
            reply = await self._rpc.request(
                action.kernel_id,
                "spill",
                {"directory": str(directory), "reason": action.reason, "cuda_frozen": frozen},
                timeout=self.offload_timeout,
            )
        except (TimeoutError, asyncio.TimeoutError, ConnectionError, RuntimeError) as err:
            reply = {"error": f"spill request failed ({err or type(err).__name__})"}
        if action.kernel_id not in self.core.kernels:
            return
        reply = self._reported(action.kernel_id, "spill", reply, (), ("host_bytes", "disk_bytes"))
        if "error" not in reply and frozen and connection is not None:
            reply["host_bytes"] += connection.driver_bytes  # the driver's copy stays in memory
        if "error" in reply:
            self.log.error(
                "jupyter-singularity: %s keeps its state in host memory: %s",
                action.kernel_id,
                reply["error"],
            )
            self._apply(self.core.spill_failed(action.kernel_id, str(reply["error"]), self.clock()))
        else:
            self._stash_transfer(action.kernel_id, reply)
            self._apply(
                self.core.spilled(
                    action.kernel_id,
                    self.clock(),
                    host_bytes=reply["host_bytes"],
                    disk_bytes=reply["disk_bytes"],
                )
            )

    async def _checkpoint_context(
        self, kernel_id: str, device: int, host_bytes: int, context_bytes: int
    ) -> bool:
        """Driver tier: checkpoint what the tensor tier left (``context_bytes``: the CUDA context)
        off GPU ``device``, into host memory beside the kernel's ``host_bytes``, if the host
        budget has room for it. A failure that leaves the process unable to use CUDA marks its
        connection ``unusable`` (see :meth:`_left_unusable`)."""
        connection = self._connections.get(kernel_id)
        if connection is None or connection.pid is None or not self.driver_capability.available:
            if connection is not None:
                connection.context_note = self.driver_capability.reason or "process unknown"
            return False
        if not self.core.reserve_driver_copy(kernel_id, host_bytes + context_bytes):
            connection.context_note = (
                f"host memory has no room for the driver's copy of the CUDA context "
                f"({format_size(context_bytes)}) within host_memory_limit or the user's "
                "host_memory quota"
            )
            return False
        try:
            seconds = await asyncio.to_thread(self._driver.checkpoint, connection.pid)
        except (CheckpointError, ValueError) as err:
            connection.context_note = str(err)
            if not self._left_unusable(kernel_id, connection, err):
                self.log.warning(
                    "jupyter-singularity: %s keeps its CUDA context on the GPU: %s",
                    kernel_id,
                    err,
                )
            return False
        connection.checkpointed_uuid = self.core.devices[device].uuid
        connection.driver_bytes = context_bytes
        connection.context_note = ""
        connection.context_seconds["checkpoint"] = seconds
        self.log.info(
            "jupyter-singularity: %s checkpointed off GPU %d in %.2f s",
            kernel_id,
            device,
            seconds,
        )
        return True

    def _left_unusable(self, kernel_id: str, connection: KernelConnection, err: Exception) -> bool:
        """After a failed driver checkpoint: whether the driver left the process unable to use
        CUDA (its ``state`` not "running": failed, still locked, or unknown). Such a kernel is
        reported, and its GPU cells are refused with the reason (``connection.unusable``) until
        it is restarted; one that runs on keeps its GPU state and is used as before."""
        state = getattr(err, "state", None)
        if state is None or state == "running":
            return False
        connection.unusable = (
            f"the CUDA driver left this kernel's process {state.split(':')[0]!r} after a failed "
            f"checkpoint, so its GPU state cannot come back: restart the kernel (its variables "
            f"in host memory are intact until then). The driver said: {err}"
        )
        self.log.error("jupyter-singularity: kernel %s: %s", kernel_id, connection.unusable)
        return True

    async def _restore_context(self, grant: Grant) -> None:
        """Driver tier: bring the process back, onto the granted GPU (a UUID remap migrates it),
        unless a swap brought it back already (or is bringing it back: see .swaps)."""
        connection = self._connections.get(grant.kernel_id)
        if connection is not None and connection.driver_busy is not None:
            await asyncio.shield(connection.driver_busy)  # (it logs its own failure)
        await self._driver_restore(grant.kernel_id, grant.device)

    async def _driver_restore(self, kernel_id: str, device: int) -> None:
        """Driver tier: bring a checkpointed process back onto ``device``."""
        connection = self._connections.get(kernel_id)
        if connection is None or connection.checkpointed_uuid is None or connection.pid is None:
            return
        target = self.core.devices[device].uuid
        pairs = (
            ()
            if target == connection.checkpointed_uuid
            else ((connection.checkpointed_uuid, target),)
        )
        seconds = await asyncio.to_thread(self._driver.restore, connection.pid, pairs)
        connection.checkpointed_uuid = None
        connection.driver_bytes = 0
        self.core.release_driver_copy(kernel_id)
        connection.context_seconds["restore"] = seconds
        self.log.info(
            "jupyter-singularity: %s restored onto GPU %d in %.2f s%s",
            kernel_id,
            device,
            seconds,
            " (migrated)" if pairs else "",
        )

    async def _restore(self, grant: Grant) -> None:
        """Bring offloaded state back: the driver tier first (the context), then the kernel's
        tensors — for a cell, by the kernel itself once it hears the grant; for an explicit
        restore, on request."""
        try:
            await self._restore_context(grant)
        except (CheckpointError, ValueError) as err:
            reason = f"driver restore failed: {err}"
            self.log.error("jupyter-singularity: %s: %s", grant.kernel_id, reason)
            self._resolve(grant.kernel_id, grant.request_id, {"granted": False, "reason": reason})
            if grant.kernel_id in self.core.kernels:
                self._apply(self.core.restore_failed(grant.kernel_id, reason, self.clock()))
            return
        if grant.hold:
            self._answer(grant)
            return
        try:
            reply = await self._rpc.request(
                grant.kernel_id,
                "restore",
                {"device": self.core.devices[grant.device].to_dict()},
                timeout=self.offload_timeout,
            )
        except (TimeoutError, asyncio.TimeoutError, ConnectionError, RuntimeError) as err:
            reply = {
                "error": f"kernel did not answer the restore request ({err or type(err).__name__})"
            }
        if grant.kernel_id not in self.core.kernels:
            return
        now = self.clock()
        reply = self._reported(grant.kernel_id, "restore", reply, ("gpu_bytes",), default=None)
        if "error" in reply:
            self._apply(self.core.restore_failed(grant.kernel_id, str(reply["error"]), now))
        else:
            self._stash_transfer(grant.kernel_id, reply)
            self._apply(self.core.restored(grant.kernel_id, now, gpu_bytes=reply["gpu_bytes"]))


def _context_view(connection: KernelConnection | None, capability: DriverCapability) -> dict:
    """Where the kernel's CUDA context is, for the kernel record: the driver tier's doing."""
    seconds = {} if connection is None else dict(connection.context_seconds)
    if connection is not None and connection.checkpointed_uuid is not None:
        return {
            "checkpointed": True,
            "note": "CUDA context checkpointed off the GPU by the driver",
            "seconds": seconds,
        }
    note = connection.context_note if connection is not None and connection.context_note else ""
    if not note and not capability.available:
        note = f"driver tier unavailable: {capability.reason}"
    return {"checkpointed": False, "note": note, "seconds": seconds}
