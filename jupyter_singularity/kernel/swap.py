"""The kernel's side of a pipelined swap, and the restore a cell waits for.

When a cell's grant needs an idle kernel (the *victim*) evicted first, the broker lets the two
copies overlap: the victim frees its device storages one by one as their copies to host memory
end (:class:`RoomReport` tells the broker the bytes freed so far), and the broker passes that room
on to the waiting kernel (the *incoming* one) in ``room`` pushes. The incoming kernel then restores
early, storage by storage, never past the room it was given (:class:`Allowance`), while the user's
cell still waits for the grant proper; at the grant the allowance opens and the restore finishes.
So a swap costs about the longer of the two copies, not their sum (on CUDA the two processes copy
on their own streams, one each way over the full-duplex bus; on simulated devices each copy runs
in its own process). On CUDA the room is counted in what the driver has back and what the
incoming kernel's allocator reserves, not in the bytes of the storages (see .device_room).

Nothing may be lost, and the room an early restore fills is never more than the broker gave (what
no booking held and what the victims freed):

* a victim whose offload fails after it freed storages asks the broker for its room back
  (``room_back``) and waits for the answer before refilling them; the broker first revokes the
  incoming kernel's allowance, whose restore then stops and frees what it refilled (its state stays
  offloaded, with its host copy) and reports ``room_returned``;
* an early restore that is revoked, or whose cell stops waiting (interrupted, denied), or that
  meets another move of the kernel's state (a spill), gives its room back the same way;
* an incoming kernel that dies mid-restore frees its device memory with its process.

Only state wholly in host memory restores early (a spilled kernel reads its files after the grant,
within the host budget), and only one early restore runs at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .damage import restore_failure
from .gate import RestoreFailed
from .pushes import TransferRecord

if TYPE_CHECKING:
    from .footprint import Footprint
    from .gate import WaitLine
    from .runtime import Lease, Waiting

log = logging.getLogger(__name__)

#: A victim reports the bytes it freed at most this often, or after this many more bytes.
REPORT_INTERVAL, REPORT_STEP = 0.005, 64 << 20
#: How long a victim whose offload failed waits for the broker to give its room back.
ROOM_BACK_TIMEOUT = 60.0


class RoomRevoked(Exception):
    """The room an early restore was filling is taken back; the restore stops and undoes."""


class Allowance:
    """Device bytes an early restore may fill: grows with the victims' freed bytes, opens at the
    grant, and may be revoked (the restore then stops at its next storage)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._bytes = 0
        self._open = False
        self.revoked = ""

    def grow(self, nbytes: int) -> None:
        with self._cv:
            self._bytes = max(self._bytes, nbytes)
            self._cv.notify_all()

    def open(self) -> None:
        with self._cv:
            self._open = True
            self._cv.notify_all()

    def revoke(self, reason: str) -> None:
        with self._cv:
            self.revoked = self.revoked or reason
            self._cv.notify_all()

    def settle(self) -> str:
        """Wait until the allowance opens (the grant) or is revoked; the revocation's reason."""
        with self._cv:
            while not (self._open or self.revoked):
                self._cv.wait()
            return self.revoked

    def wait_for(self, nbytes: int) -> None:
        """Return once ``nbytes`` may be on the device; raise RoomRevoked if revoked first."""
        with self._cv:
            while True:
                if self.revoked:
                    raise RoomRevoked(self.revoked)
                if self._open or self._bytes >= nbytes:
                    return
                self._cv.wait()


class RoomReport:
    """A victim's pipelined offload: the bytes freed so far go to the broker (``freed``), a few
    per swap; a failure midway asks the broker for the room back before refilling it."""

    def __init__(self, send: Callable[[str, dict], None], request: Callable[..., dict]) -> None:
        self._send, self._request = send, request
        self._freed, self._sent, self._at = 0, 0, 0.0

    def freed(self, nbytes: int, handed_back: Callable[[int], int]) -> None:
        """Storages of ``nbytes`` are freed so far; ``handed_back(nbytes)``, asked only when a
        report is due, says how much of that the device has back (see .device_room)."""
        now = time.monotonic()
        if nbytes - self._freed >= REPORT_STEP or now - self._at >= REPORT_INTERVAL:
            self._freed, self._at = nbytes, now
            room = handed_back(nbytes)
            if room > self._sent:
                self._sent = room
                self._send("freed", {"bytes": room})

    def wait_room_back(self) -> None:
        """Block until the broker says the room this offload freed is free again (the incoming
        kernel gave back what it restored into it). Without an answer the refill is tried anyway:
        on a real device a failed refill leaves those storages offloaded, nothing is lost."""
        try:
            reply = self._request("room_back", {}, timeout=ROOM_BACK_TIMEOUT)
        except Exception as err:
            log.warning("jupyter-singularity: the room freed was not confirmed back: %s", err)
            return
        if "error" in reply:
            log.warning("jupyter-singularity: the room freed was not confirmed back: %s", reply)


@dataclass
class EarlyRestore:
    """The early restore under way in this kernel, and its record once it restored everything."""

    allowance: Allowance
    thread: threading.Thread | None = None
    record: TransferRecord | None = None


class CellRestores:
    """A mixin of :class:`~.runtime.Runtime`: the early restore of a swap and the restore a cell's
    grant asks for (see the module docstring)."""

    lock: threading.RLock
    early_lock: threading.Lock
    shell: Any
    state: str
    lease: Lease | None
    footprint: Footprint
    get_engine: Callable[[], Any]
    notify: Callable[[], None]
    _send: Callable[[str, dict], None]
    _device_bytes: Callable[..., int]
    _record_transfer: Callable[..., TransferRecord]
    _transitioned: Callable[[TransferRecord], None]
    _early_restore: EarlyRestore | None = None

    def on_room(self, body: dict) -> None:
        """The broker passes on room a victim freed (``bytes``), or takes it back (``revoke``).
        An early restore is started and published as one step (``early_lock``): a cell granted
        meanwhile either finds it running or, its lease set first, keeps one from starting."""
        revoke = body.get("revoke")
        nbytes = body.get("bytes")
        with self.early_lock:
            early = self._early_restore
            if revoke:
                if early is not None:
                    early.allowance.revoke(str(revoke))
                return
            if early is not None and early.thread is not None and not early.thread.is_alive():
                early = self._early_restore = None  # an earlier swap's, over
            if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
                return
            if early is None:
                engine = self.get_engine()
                if self.lease is not None or engine is None or not engine.offloaded:
                    return
                if engine.disk_bytes or engine.damage is not None:
                    return  # spilled state is read back after the grant, within the host budget
                early = EarlyRestore(Allowance())
                early.thread = threading.Thread(
                    target=self._restore_early, args=(early,), name="singularity-early-restore"
                )
                early.thread.start()
                self._early_restore = early
            early.allowance.grow(nbytes)

    def _restore_early(self, early: EarlyRestore) -> None:
        """Restore within the allowance; stopped, everything refilled is freed again and the
        broker hears that the room is back. Done before the grant, it waits for the grant; a
        revocation then offloads the state again (outside the lock meanwhile: a rejoining
        broker asks the kernel's holdings under it)."""
        engine, allowance = self.get_engine(), early.allowance
        try:
            with self.lock:
                if engine is None or not engine.offloaded or allowance.revoked:
                    return
                self.state = "restoring"
                try:
                    transfer = engine.restore(room=allowance.wait_for)
                except Exception as err:
                    self.state = "queued"
                    if not allowance.revoked:
                        log.warning("jupyter-singularity: early restore stopped: %s", err)
                    return
                early.record = self._record_transfer("restore", transfer, "swap")
                self.footprint.known(transfer.nbytes)
            self._transitioned(early.record)
            if allowance.settle():
                self._offload_again(engine)
        finally:
            if engine is not None and engine.offloaded:
                self._send("room_returned", {})

    def _offload_again(self, engine: Any) -> None:
        with self.lock:
            if self.lease is not None or engine.offloaded:
                return  # granted meanwhile: the room is booked for it now
            try:
                engine.offload()
            except Exception as err:
                log.error("jupyter-singularity: could not give back the room restored: %s", err)
            else:
                self.state = "offloaded"

    def finish_early_restore(self, give_back: bool) -> TransferRecord | None:
        """End the early restore, if one runs: let it finish (the grant came) or stop it and wait
        until it gave its room back (``give_back``: the cell stopped waiting, or another move of
        the state comes). Returns its record if it restored everything and the grant came."""
        with self.early_lock:
            early, self._early_restore = self._early_restore, None
        if early is None or early.thread is None:
            return None
        if give_back:
            early.allowance.revoke("the early restore is no longer wanted")
        else:
            early.allowance.open()
        early.thread.join()
        return None if give_back else early.record

    def _restore_for_cell(self, lease: Lease, waiting: Waiting, line: WaitLine) -> None:
        """Bring the kernel's state back before the cell runs (the grant's ``restore``)."""
        early = self.finish_early_restore(give_back=False)
        engine = self.get_engine()
        offloaded = engine is not None and engine.offloaded
        if not (lease.restore or offloaded):
            return
        with self.lock:
            if early is not None and not engine.offloaded:  # restored early, in a swap
                line.restoring(early.nbytes, "host")
                line.progress(early.nbytes, early.nbytes)
                self.state = "running"
                self._send(
                    "restored", {"gpu_bytes": self._device_bytes(), "transfer": early.to_dict()}
                )
                return
            if not offloaded:
                # The broker believes the state is off the device, but nothing of it is held here.
                self._send("restored", {"gpu_bytes": self._device_bytes(force=True)})
                return
            source = (
                ("host and " if engine.host_bytes else "") + "disk" if engine.disk_bytes else "host"
            )
            total = int(engine.host_bytes + engine.disk_bytes)
            waiting.restoring = total
            line.restoring(total, source)
            self.state = "restoring"
            self.notify()
            started = time.perf_counter()
            try:
                transfer = engine.restore(progress=line.progress)
            except Exception as err:
                seconds = time.perf_counter() - started
                self.lease = None
                self.state = "error"
                self._send("restore_failed", {"reason": str(err) or type(err).__name__})
                message = restore_failure(err, engine, self.shell)
                self._transitioned(TransferRecord("restore", 0, seconds, error=message))
                raise RestoreFailed(message) from err
            record = self._record_transfer("restore", transfer, "cell")
            self.footprint.known(transfer.nbytes)
            self.state = "running"
            self._send(
                "restored",
                {"gpu_bytes": self._device_bytes(), "transfer": record.to_dict()},
            )
            self._transitioned(record)
