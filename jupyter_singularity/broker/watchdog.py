"""Kernels that stop answering: noticed, shown, and kept from blocking a GPU forever.

A kernel answers the broker's pings on its I/O thread, also while a cell computes, so a kernel that
misses pings is stopped (SIGSTOP, a debugger) or hung holding Python's lock. It is marked *stalled*
in its record; it is then never asked to make room, and requests that could run elsewhere do not
wait for it. When a stalled kernel holds a lease for longer than ``lease_stall_timeout``, its lease
is revoked: where the driver tier exists its process is checkpointed off the GPU (its memory then
free for others, its state kept by the driver until it answers again); otherwise its GPU takes no
new grant, because the stopped kernel may still write to the memory it was given, and the admin is
told why. Both undo themselves when the kernel answers again or ends.

A mixin of :class:`~.service.BrokerService`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .checkpoint import CheckpointError, DriverCapability, DriverCheckpointer
from .kernel_requests import KernelConnection
from .model import Action

if TYPE_CHECKING:
    from ..devices import DeviceInventory
    from .core import BrokerCore
    from .rpc import RPCServer

#: Pings missed in a row before a kernel counts as stalled (one may be lost to a busy moment).
STALL_MISSES = 2


class Watchdog:
    """Pings, stall marks and lease revocation (see the module docstring)."""

    core: BrokerCore
    log: logging.Logger
    clock: Callable[[], float]
    ping_interval: float
    ping_misses: int
    lease_stall_timeout: float
    driver_capability: DriverCapability
    _driver: DriverCheckpointer
    _rpc: RPCServer
    _connections: dict[str, KernelConnection]
    _apply: Callable[[list[Action]], None]
    _spawn: Callable[[Any], asyncio.Future]
    _left_unusable: Callable[[str, KernelConnection, Exception], bool]
    inventory: DeviceInventory
    unregister_kernel: Callable[..., None]

    def _ping_all(self) -> None:
        for kernel_id, connection in list(self._connections.items()):
            if not connection.pinging:
                self._spawn(self._ping(kernel_id, connection))

    async def _ping(self, kernel_id: str, connection: KernelConnection) -> None:
        connection.pinging = True
        try:
            await self._rpc.request(kernel_id, "ping", {}, timeout=self.ping_interval)
        except (TimeoutError, asyncio.TimeoutError, RuntimeError):
            answered = False
        except ConnectionError:
            return  # not connected yet (still starting), or gone: nothing to judge
        else:
            answered = True
        finally:
            connection.pinging = False
        if self._connections.get(kernel_id) is not connection:
            return  # ended or restarted meanwhile
        if answered:
            self._heard_from(kernel_id, connection)
        else:
            self._missed_ping(kernel_id, connection)

    def _heard_from(self, kernel_id: str, connection: KernelConnection) -> None:
        """Any message or ping answer from the kernel: it runs; undo what its stall caused."""
        connection.missed_pings = 0
        connection.last_heard = self.clock()
        if connection.stalled_since is None:
            return
        stalled_for = self.clock() - connection.stalled_since
        connection.stalled_since = None
        self.log.warning(
            "jupyter-singularity: kernel %s answers again after %.0f s", kernel_id, stalled_for
        )
        now = self.clock()
        if kernel_id in self.core.kernels:
            self._apply(self.core.set_stalled(kernel_id, None, now))
        if connection.blocked_device is not None:
            device, connection.blocked_device = connection.blocked_device, None
            self._apply(self.core.set_device_unavailable(device, None, now))
        if connection.revoked:
            # Its cell resumes inside a process the driver holds: bring it back so it can finish.
            connection.revoked = False
            self._apply(self.core.restore(kernel_id, now))

    def _missed_ping(self, kernel_id: str, connection: KernelConnection) -> None:
        connection.missed_pings += 1
        watched = connection.pid or connection.launched_pid
        if watched is None and connection.missed_pings >= self.ping_misses:
            # A kernel whose process the broker cannot watch: silence is its only sign of death.
            self.unregister_kernel(
                kernel_id, f"heartbeat lost ({connection.missed_pings} pings unanswered)"
            )
            return
        if connection.missed_pings < STALL_MISSES or connection.stalled_since is not None:
            return
        connection.stalled_since = connection.last_heard or self.clock()
        self.log.warning(
            "jupyter-singularity: kernel %s stopped answering (%d pings missed): it is stopped or "
            "hung; it is not asked to make room until it answers",
            kernel_id,
            connection.missed_pings,
        )
        if kernel_id in self.core.kernels:
            self._apply(self.core.set_stalled(kernel_id, connection.stalled_since, self.clock()))

    def _check_stalled_leases(self) -> None:
        """Revoke the leases of kernels stalled for longer than ``lease_stall_timeout``."""
        now = self.clock()
        for kernel_id, connection in list(self._connections.items()):
            kernel = self.core.kernels.get(kernel_id)
            if (
                kernel is None
                or kernel.lease is None
                or connection.stalled_since is None
                or connection.revoked
                or connection.blocked_device is not None
                or now - connection.stalled_since < self.lease_stall_timeout
            ):
                continue
            reason = (
                f"kernel {kernel_id} of {kernel.user} holds a lease on GPU {kernel.lease.device} "
                f"and has not answered for {now - connection.stalled_since:.0f} s "
                f"(lease_stall_timeout = {self.lease_stall_timeout:g} s)"
            )
            held = self._process_bytes(kernel_id)
            if (
                self.driver_capability.available
                and connection.pid is not None
                and self.core.reserve_driver_copy(kernel_id, held)
            ):
                connection.revoked = True
                self._spawn(self._revoke_by_checkpoint(kernel_id, connection, reason, held))
            else:
                self._block_device(kernel_id, connection, kernel.lease.device, reason)

    async def _revoke_by_checkpoint(
        self, kernel_id: str, connection: KernelConnection, reason: str, held: int
    ) -> None:
        """Checkpoint the stalled kernel's process, whose ``held`` bytes of GPU memory the
        driver then keeps in host memory (room reserved for them already)."""
        device = self.core.kernels[kernel_id].device
        assert device is not None and connection.pid is not None
        try:
            seconds = await asyncio.to_thread(self._driver.checkpoint, connection.pid)
        except (CheckpointError, ValueError) as err:
            connection.revoked = False
            self.core.release_driver_copy(kernel_id)
            self.log.error(
                "jupyter-singularity: cannot checkpoint stalled kernel %s off its GPU: %s",
                kernel_id,
                err,
            )
            self._block_device(kernel_id, connection, device, reason)
            if self._left_unusable(kernel_id, connection, err) and kernel_id in self.core.kernels:
                kernel = self.core.kernels[kernel_id]
                self._apply(
                    self.core.process_unusable(
                        kernel_id,
                        connection.unusable,
                        self.clock(),
                        host_bytes=kernel.host_bytes,
                        disk_bytes=kernel.disk_bytes,
                    )
                )
            return
        if self._connections.get(kernel_id) is not connection:
            return
        connection.checkpointed_uuid = self.core.devices[device].uuid
        connection.driver_bytes = held
        connection.context_seconds["checkpoint"] = seconds
        self.log.error(
            "jupyter-singularity: lease revoked: %s; its process was checkpointed off the GPU "
            "in %.2f s and comes back when it answers again",
            reason,
            seconds,
        )
        self._apply(self.core.revoke(kernel_id, self.clock(), reason))

    def _process_bytes(self, kernel_id: str) -> int:
        """GPU memory a kernel's process holds: NVML's figure where it has one, else its booking
        (what the driver tier would move into host memory)."""
        kernel = self.core.kernels[kernel_id]
        connection = self._connections.get(kernel_id)
        measured = None
        if kernel.device is not None and connection is not None and connection.pid is not None:
            measured = self.inventory.process_memory(kernel.device).get(connection.pid)
        return measured if measured is not None else kernel.booking()

    def _block_device(
        self, kernel_id: str, connection: KernelConnection, device: int, reason: str
    ) -> None:
        connection.blocked_device = device
        why = f"{reason}; its memory may still be written, so GPU {device} takes no new work"
        self.log.error(
            "jupyter-singularity: %s until it answers or ends (resume it with kill -CONT, or "
            "restart or shut down the kernel)",
            why,
        )
        self._apply(self.core.set_device_unavailable(device, why, self.clock()))
