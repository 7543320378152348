"""Pipelined swaps: the room an offloading victim frees goes at once to the kernel waiting for it.

The core decides as before: a request claims a device, idle kernels there are offloaded, and the
request is granted once their offloads are reported; the bookings and the ledger never see a
swap. What changes is only when the bytes move. When an ``Offload`` makes room on the device that
a queued request claims, and that request's kernel has its whole state in host memory (not on
disk, not checkpointed by the driver), the victim is asked to free its storages one by one as
their copies end and to report the bytes freed (``freed``); the broker passes the room to the
incoming kernel (``room`` push, ``bytes``), which restores early within it (see
:mod:`jupyter_singularity.kernel.swap`): what no booking held on the device when the swap began
(a request's reservation, its peak plus a margin, often asks more than the state it restores)
plus the sum freed by the swap's victims, at most the incoming kernel's state. The incoming
kernel's device memory is thus never more than what no other kernel holds or is promised. A
kernel whose process the driver tier holds checkpointed off that GPU is brought back first, out
of the free room, its CUDA context booked there from then on (``core.context_back``); it gets
room only then (a kernel cannot make CUDA calls while checkpointed). Should it not be granted that
GPU after all, the driver takes the process back (``core.context_off``).

A victim whose offload fails after freeing storages asks for its room back (``room_back``); the
broker revokes the incoming kernel's room (``room`` push, ``revoke``) and answers once that kernel
reported ``room_returned`` (its early restore undone), or left the pool, or after
``offload_timeout``. The room is also revoked when, after a victim's report, the incoming kernel's
request no longer claims the device (cancelled, denied, overtaken).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..protocol import MAX_STORED_BYTES, count_field
from .checkpoint import CheckpointError
from .model import Action, Grant, KernelState, Offload

if TYPE_CHECKING:
    from .core import BrokerCore
    from .kernel_requests import KernelConnection
    from .rpc import RPCServer

#: How often a victim waiting for its room back looks whether the incoming kernel is still there.
RETURN_POLL = 0.1


@dataclass
class Swap:
    """One incoming kernel and the victims making room for it on ``device``."""

    incoming: str
    device: int
    free: int = 0
    """Room no booking held on the device when the swap began: the incoming kernel's at once."""
    context: int = 0
    """The incoming kernel's CUDA context, which the driver tier holds checkpointed: brought
    back onto the device first, out of ``free``; no room is given before."""
    waking: bool = False
    """The driver is bringing the context back: it lands in room no booking holds yet."""
    woken: bool = False
    freed: dict[str, int] = field(default_factory=dict)
    """Bytes freed so far, by victim (those still offloading, and those done)."""
    victims: set[str] = field(default_factory=set)
    given: int = 0
    """The room passed to the incoming kernel so far."""
    revoked: str = ""
    returned: asyncio.Event = field(default_factory=asyncio.Event)


class SwapRoom:
    """A mixin of :class:`~.service.BrokerService` (through StateMoves): see the module docstring."""

    core: BrokerCore
    log: logging.Logger
    offload_timeout: float
    _rpc: RPCServer
    _connections: dict[str, KernelConnection]
    _spawn: Callable[[Any], asyncio.Future]
    _answer_grant: Callable[[Grant], None]
    _apply: Callable[[list[Action]], None]
    _driver_restore: Callable[[str, int], Awaitable[None]]
    _checkpoint_context: Callable[[str, int, int, int], Awaitable[bool]]
    clock: Callable[[], float]
    _swaps: dict[str, Swap]
    """Each swap under way, by its incoming kernel and by each of its victims."""

    def _pair_swap(self, action: Offload) -> bool:
        """Whether the victim of ``action`` makes room for a kernel that can restore meanwhile
        (then it is asked to report what it frees)."""
        incoming = self._incoming_on(action.device)
        if incoming is None:
            return False
        table = self._swaps
        swap = table.get(incoming)
        if swap is None or swap.device != action.device:
            if swap is not None and (swap.victims or (swap.given and not swap.returned.is_set())):
                return False  # still tied to another device's room
            swap = Swap(incoming, action.device, self._unbooked(incoming, action))
            connection = self._connections[incoming]
            if connection.checkpointed_uuid is not None:
                if swap.free < connection.driver_bytes or connection.driver_busy is not None:
                    return False  # no room for its context (or the driver is busy with it)
                swap.context, swap.waking = connection.driver_bytes, True
                connection.driver_busy = self._spawn(self._wake(swap, connection))
            table[incoming] = swap
        elif swap.revoked:
            return False
        swap.victims.add(action.kernel_id)
        table[action.kernel_id] = swap
        self._give_room(swap)
        return True

    def _unbooked(self, incoming: str, action: Offload) -> int:
        """Room no booking holds on the device, within the GPU memory quota of the incoming
        kernel's user (whose kernels the victims may be)."""
        core = self.core
        free = core.devices[action.device].total_bytes - core.device_bookings()[action.device]
        kernel = core.kernels[incoming]
        quota = core.limits(kernel.user, kernel.groups).gpu_memory
        if quota is not None:
            free = min(free, quota - core.booked_by(kernel.user))
        return max(0, free)

    def _incoming_on(self, device: int) -> str | None:
        """The queued kernel whose request claims ``device`` and whose tensors are all in host
        memory, ready to restore early (the waiting requests only, not every kernel). What it
        left on a GPU (the CUDA context, where the driver tier did not take it) must be on that
        one; a context the driver tier holds checkpointed comes back with the grant."""
        for request in self.core.queue():
            kernel = self.core.kernels[request.kernel_id]
            if (
                kernel.request is request
                and request.claimed == device
                and request.hold
                and kernel.lease is None
                and kernel.state == KernelState.QUEUED
                and kernel.host_bytes
                and not kernel.disk_bytes
                and kernel.device in (None, device)
            ):
                connection = self._connections.get(kernel.kernel_id)
                frozen = None if connection is None else connection.checkpointed_uuid
                if connection is None or frozen not in (None, self.core.devices[device].uuid):
                    return None  # (a checkpointed process moves to another GPU at its grant)
                return kernel.kernel_id
        return None

    async def _wake(self, swap: Swap, connection: KernelConnection) -> None:
        """Driver tier, for a swap: bring the incoming kernel's process back onto the device
        ahead of its grant, its context booked there, so its tensors can follow meanwhile.

        If by then its request no longer claims the device (it ended, or the kernel is placed on
        another GPU), or the room was taken back meanwhile, the driver takes the process back,
        as it was before the swap: its grant then brings it back onto the GPU it is granted (a
        grant waits for all this), and a grant that took the room back is told then."""
        try:
            try:
                await self._driver_restore(swap.incoming, swap.device)
            except (CheckpointError, ValueError) as err:
                self.log.warning(
                    "jupyter-singularity: %s restores after its grant: the driver could not "
                    "bring it back for a swap: %s",
                    swap.incoming,
                    err,
                )
                return
            kernel = self.core.kernels.get(swap.incoming)
            if kernel is None:
                return
            if swap.revoked or not self._claims(swap):
                state = kernel.host_bytes - swap.context
                if await self._checkpoint_context(swap.incoming, swap.device, state, swap.context):
                    return
                self.log.warning(  # (its context stays booked on the device, as if never taken)
                    "jupyter-singularity: %s keeps its CUDA context on GPU %d: a swap brought it "
                    "back, the room was no longer its own, and the driver could not take it "
                    "again",
                    swap.incoming,
                    swap.device,
                )
            now = self.clock()
            self._apply(self.core.context_back(swap.incoming, swap.device, swap.context, now))
            swap.woken = True
            if not swap.revoked and self._claims(swap):
                self._give_room(swap)
        finally:
            connection.driver_busy = None
            swap.waking = False
            if swap.revoked and not swap.given:
                swap.returned.set()
            if not swap.victims and self._settled(swap):
                self._drop_swap(swap)

    def _claims(self, swap: Swap) -> bool:
        """Whether the room is still the incoming kernel's: its request claims the device, or
        it was granted there (the room is booked for it now)."""
        kernel = self.core.kernels.get(swap.incoming)
        if kernel is None:
            return False
        if kernel.lease is not None:
            return kernel.lease.device == swap.device
        return kernel.request is not None and kernel.request.claimed == swap.device

    def _revoke(self, swap: Swap, reason: str) -> None:
        if swap.revoked:
            return
        swap.revoked = reason
        if swap.given:
            self._spawn(self._rpc.push(swap.incoming, "room", {"revoke": reason}))
        elif not swap.waking:  # (else once the driver took the context back: see _wake)
            swap.returned.set()  # it never had any

    def _on_freed(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> None:
        """A victim freed ``bytes`` so far: pass the swap's room on to the incoming kernel."""
        nbytes = count_field(body, "bytes", MAX_STORED_BYTES)
        table = self._swaps
        swap = table.get(kernel_id)
        if swap is None or kernel_id not in swap.victims or swap.revoked:
            return
        # Never more than the core booked for the victim: its word is all the broker has.
        nbytes = min(nbytes, self.core.kernels[kernel_id].booking())
        swap.freed[kernel_id] = max(swap.freed.get(kernel_id, 0), nbytes)
        if not self._claims(swap):
            self._revoke(swap, "the request no longer claims this GPU")
            return
        self._give_room(swap)

    def _give_room(self, swap: Swap) -> None:
        """Pass on the room free since the swap began and freed by its victims, at most the
        incoming kernel's state, when it grew."""
        if swap.context and not swap.woken:
            return
        state = self.core.kernels[swap.incoming].host_bytes  # (its context left it, woken)
        room = min(state, swap.free - swap.context + sum(swap.freed.values()))
        if room > swap.given:
            swap.given = room
            self._spawn(self._rpc.push(swap.incoming, "room", {"bytes": room}))

    def _on_room_returned(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> None:
        """The incoming kernel undid its early restore: the room it took is free again."""
        swap = self._swaps.get(kernel_id)
        if swap is not None and swap.incoming == kernel_id:
            swap.revoked = swap.revoked or "given back"
            swap.returned.set()
            self._drop_swap(swap)

    def _on_room_back(
        self, kernel_id: str, connection: KernelConnection, body: dict, now: float
    ) -> dict | Any:
        """A victim's offload failed midway: it may refill its storages once the incoming kernel
        gave back the room it restored into."""
        swap = self._swaps.get(kernel_id)
        if swap is None or kernel_id not in swap.victims:
            return {}
        self._revoke(swap, f"the offload of kernel {kernel_id[:8]} failed")
        return self._until_returned(swap)

    async def _until_returned(self, swap: Swap) -> dict:
        waited = 0.0
        while not self._settled(swap):
            if waited >= self.offload_timeout:
                return {"error": f"kernel {swap.incoming} did not give its room back"}
            try:
                await asyncio.wait_for(swap.returned.wait(), RETURN_POLL)
            except (TimeoutError, asyncio.TimeoutError):
                waited += RETURN_POLL
        return {}

    def _room_lent(self, grant: Grant) -> Swap | None:
        """The swap whose incoming kernel holds room on the device of ``grant``, a grant to
        another kernel (a request that overtook it), where that room and the bookings do not
        fit together: the room is revoked, and the grant must wait until it is back
        (``_grant_when_returned``), or the device would hold both. A grant to the incoming
        kernel itself settles its swap: the room is booked for it now."""
        table = self._swaps
        own = table.get(grant.kernel_id)
        if own is not None and own.incoming == grant.kernel_id and not own.victims:
            self._drop_swap(own)
        for swap in {id(s): s for s in table.values()}.values():
            if swap.device != grant.device or self._settled(swap):
                continue
            device = self.core.devices[grant.device]
            lent = swap.given + (swap.context if swap.waking else 0)
            if device.total_bytes - self.core.device_bookings()[grant.device] >= lent:
                continue  # the room fits beside every booking
            self._revoke(swap, "another request was granted this GPU first")
            return swap
        return None

    def _settled(self, swap: Swap) -> bool:
        """Whether the room of ``swap`` needs no more watching: its kernel's process is gone
        (its memory with it; a kernel restarted under the same id is cold), or no context is
        landing in it and none was given, it came back, or it was granted this GPU (the room is
        booked)."""
        kernel = self.core.kernels.get(swap.incoming)
        if kernel is None or kernel.state == KernelState.COLD:
            return True
        return not swap.waking and (
            not swap.given
            or swap.returned.is_set()
            or (kernel.lease is not None and kernel.lease.device == swap.device)
        )

    async def _grant_when_returned(self, swap: Swap, grant: Grant) -> None:
        answer = await self._until_returned(swap)
        if "error" in answer:
            self.log.warning("jupyter-singularity: %s; granting anyway", answer["error"])
        self._drop_swap(swap)
        if grant.kernel_id in self.core.kernels:
            self._answer_grant(grant)

    def _victim_done(self, victim: str) -> None:
        """The victim's offload was reported (done or refused): it makes no more room. The room
        given stays with the incoming kernel while its request still claims the device (the
        swap is kept until it is settled: see ``_room_lent``)."""
        table = self._swaps
        swap = table.pop(victim, None)
        if swap is None:
            return
        swap.victims.discard(victim)
        if not self._claims(swap):
            self._revoke(swap, "the request no longer claims this GPU")
        if not swap.victims and self._settled(swap):
            self._drop_swap(swap)

    def _drop_swap(self, swap: Swap) -> None:
        table = self._swaps
        for victim in swap.victims:
            if table.get(victim) is swap:
                del table[victim]
        swap.victims.clear()
        if table.get(swap.incoming) is swap:
            del table[swap.incoming]
        self._take_back_if_left(swap)

    def _take_back_if_left(self, swap: Swap) -> None:
        """A kernel the driver brought back for ``swap`` whose request then ended without a
        grant, what it restored early given back: the driver takes its process back, or its
        context would stay booked on the GPU until its next cell."""
        kernel = self.core.kernels.get(swap.incoming)
        connection = self._connections.get(swap.incoming)
        if (
            swap.woken
            and kernel is not None
            and kernel.request is None
            and kernel.lease is None
            and kernel.device == swap.device
            and (not swap.given or swap.returned.is_set())
            and connection is not None
            and connection.driver_busy is None
            and connection.checkpointed_uuid is None
        ):
            connection.driver_busy = self._spawn(self._take_back(swap, connection))

    async def _take_back(self, swap: Swap, connection: KernelConnection) -> None:
        try:
            kernel = self.core.kernels.get(swap.incoming)
            if kernel is None or kernel.lease is not None:
                return  # (granted meanwhile: its lease books the context)
            if await self._checkpoint_context(
                swap.incoming, swap.device, kernel.host_bytes, swap.context
            ):
                self._apply(self.core.context_off(swap.incoming, swap.context, self.clock()))
        finally:
            connection.driver_busy = None
