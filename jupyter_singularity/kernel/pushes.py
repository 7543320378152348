"""The broker's requests to an idle kernel (offload, restore, spill, queue position), answered on
the client's push-worker thread, and the record each transfer leaves for the log and the widget.

A mixin of :class:`~.runtime.Runtime`; every move takes ``Runtime.lock``, so it never overlaps a
cell's restore.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..units import format_size
from .damage import restore_failure
from .gc_hold import GcHold
from .outliving import OutlivingWork
from .process_probes import CONTEXT_ESTIMATE, driver_gpu_bytes, nvml_process_bytes

if TYPE_CHECKING:
    from .client import BrokerClient
    from .footprint import Footprint
    from .runtime import Lease, Waiting


@dataclass
class TransferRecord:
    """One move of the kernel's GPU state: ``offload``, ``restore`` or ``spill``."""

    kind: str
    nbytes: int
    seconds: float
    storages: int = 0
    time: float = field(default_factory=time.time)
    reason: str = ""
    error: str = ""
    disk_bytes: int = 0
    """Of ``nbytes``, what an offload wrote straight to disk (beyond its host room)."""

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "nbytes": self.nbytes,
            "seconds": round(self.seconds, 6),
            "storages": self.storages,
            "gbps": round(self.gbps, 3),
            "time": self.time,
            "reason": self.reason,
            "error": self.error or None,
            "disk_bytes": self.disk_bytes,
        }

    def describe(self) -> str:
        verb = {"offload": "offloaded", "restore": "restored", "spill": "spilled"}.get(
            self.kind, self.kind
        )
        if self.error:
            return f"{self.kind} failed: {self.error}"
        where = {"offload": " to host", "spill": " to disk"}.get(self.kind, "")
        if self.disk_bytes:
            where = f" ({format_size(self.disk_bytes)} of it straight to disk)"
        return (
            f"{verb} {format_size(self.nbytes)}{where} in {self.seconds:.3f} s"
            + (f" ({self.gbps:.1f} GB/s)" if self.nbytes else "")
            + (f", {self.storages} storages" if self.storages else "")
        )


class BrokerPushes:
    """Answers to the broker's pushes (see the module docstring)."""

    lock: threading.RLock
    shell: Any
    simulated: bool
    gc_hold: GcHold
    outliving: OutlivingWork
    gpu_used: bool
    peaks: deque[int]
    lease: Lease | None
    waiting: Waiting | None
    device: dict | None
    state: str
    engine: Any
    engine_error: str
    footprint: Footprint
    get_engine: Callable[[], Any]
    _device_bytes: Callable[..., int]
    _select_device: Callable[[dict], None]
    _cuda_torch: Callable[[], Any]
    _transitioned: Callable[[TransferRecord], None]
    _send: Callable[[str, dict], None]
    finish_early_restore: Callable[[bool], None]
    client: BrokerClient

    def _residual_gpu_bytes(self, transfer: Any) -> int:
        """GPU memory this process still holds after an offload: the CUDA context, what the scan
        could not see (``left_bytes``), what libraries other than torch hold (all of it where
        torch never started CUDA). Non-zero makes the broker try the driver tier."""
        torch = self._cuda_torch()
        if torch is None:
            return 0 if self.simulated else driver_gpu_bytes()
        own = nvml_process_bytes(os.getpid())
        if own is not None:
            return own
        try:
            reserved = int(torch.cuda.memory_reserved())
        except Exception:
            reserved = 0
        return max(reserved, int(getattr(transfer, "left_bytes", 0) or 0)) + CONTEXT_ESTIMATE

    def _record_transfer(self, kind: str, transfer: Any, reason: str) -> TransferRecord:
        return TransferRecord(
            kind,
            int(getattr(transfer, "nbytes", 0)),
            float(getattr(transfer, "seconds", 0.0)),
            int(getattr(transfer, "storages", 0)),
            reason=reason,
        )

    def holdings(self) -> dict:
        """Where this kernel's GPU state is, for a broker it joins (after a restart, it knows
        nothing of it): ``device`` (UUID of the GPU the kernel last ran on, or None),
        ``gpu_bytes`` there, ``host_bytes`` and ``disk_bytes`` offloaded, ``peak_bytes`` of its
        recent cells, and whether a cell ``running`` holds a lease of the broker's previous run."""
        with self.lock:  # not in the middle of an offload, restore or spill
            engine = self.engine
            offloaded = engine is not None and engine.offloaded
            if offloaded:
                gpu_bytes = self._residual_gpu_bytes(None)
            else:
                gpu_bytes = self._device_bytes(force=True) if self.gpu_used else 0
            return {
                "device": None if self.device is None else self.device.get("uuid"),
                "gpu_bytes": gpu_bytes,
                "host_bytes": int(engine.host_bytes) if offloaded else 0,
                "disk_bytes": int(engine.disk_bytes) if offloaded else 0,
                "peak_bytes": max(self.peaks, default=None),
                "running": self.lease is not None,
            }

    # --------------------------------------------------------- broker pushes (push-worker thread)

    def on_queued(self, body: dict) -> dict | None:
        waiting = self.waiting
        if waiting is not None and waiting.request_id == body.get("request_id"):
            waiting.position = int(body.get("position") or 0)
            waiting.reason = str(body.get("reason") or "")
            self.state = "queued"
        return None

    def on_offload(self, body: dict) -> dict:
        """Move the kernel's GPU state to host memory, at most ``host_limit`` bytes of it (null: no
        limit), and the rest straight to files in ``directory``; refuse (stay resident) when
        unsafe, or with ``host_full`` when the rest cannot be written. With ``room`` another
        kernel restores into what this frees as it frees it (a pipelined swap, see .swap)."""
        reason = str(body.get("reason") or "")
        room = None
        if body.get("room") is True:
            from .swap import RoomReport  # (swap imports this module)

            room = RoomReport(self._send, self.client.request)
        host_limit = body.get("host_limit")
        directory = body.get("directory")
        with self.lock:
            if self.lease is not None:
                return {"error": "a cell of this kernel holds its GPU lease"}
            threads = self.outliving.running_threads()
            if threads:
                self._transitioned(TransferRecord("offload", 0, 0.0, reason=reason, error=threads))
                return {"error": threads}
            engine = self.get_engine()
            if engine is None:
                if "torch" in sys.modules and self.engine_error:
                    return {"error": self.engine_error}
                # No torch: what another library holds on the GPU goes with the driver tier.
                self.state = "offloaded"
                return self._left_to_the_driver({"host_bytes": 0, "disk_bytes": 0})
            shared = "" if self.simulated else self.outliving.shared_memory()
            if shared:
                return self._whole_process_offload(shared, 0.0, reason)
            self.state = "offloading"
            started = time.perf_counter()
            try:
                transfer = engine.offload(
                    host_limit=None if host_limit is None else int(host_limit),
                    directory=None if directory is None else Path(str(directory)),
                    swap=room,
                )
            except Exception as err:
                from .offload import HostFullError, UnsafeStateError  # (with the engine)

                # The engine rolled back: nothing moved, nothing lost.
                message = str(err) or type(err).__name__
                seconds = time.perf_counter() - started
                if isinstance(err, UnsafeStateError) and not self.simulated:
                    return self._whole_process_offload(message, seconds, reason)
                self.state = "resident"
                self._transitioned(
                    TransferRecord("offload", 0, seconds, reason=reason, error=message)
                )
                return {"error": message, "host_full": isinstance(err, HostFullError)}
            record = self._record_transfer("offload", transfer, reason)
            record.disk_bytes = int(engine.disk_bytes)
            self.footprint.forget()
            self.state = "spilled" if engine.disk_bytes and not engine.host_bytes else "offloaded"
            reply = self._left_to_the_driver(
                {
                    "host_bytes": int(engine.host_bytes),
                    "disk_bytes": int(engine.disk_bytes),
                    "transfer": record.to_dict(),
                },
                transfer,
            )
        self._transitioned(record)
        return reply

    def _whole_process_offload(self, refused: str, seconds: float, reason: str) -> dict:
        """The tensor tier refused (CUDA graphs, memory torch does not own, a capture under
        way): nothing moved. The driver tier can still take the whole process off the GPU, its
        device addresses kept, so the reply leaves all of it to the broker, saying why
        (``tensor_refused``); the broker keeps the kernel resident with that reason where the
        driver tier cannot."""
        record = TransferRecord(
            "offload", 0, seconds, reason=f"{reason}; the driver tier moves it whole: {refused}"
        )
        self.state = "offloaded"
        reply = self._left_to_the_driver(
            {"host_bytes": 0, "disk_bytes": 0, "tensor_refused": refused}
        )
        reply["transfer"] = record.to_dict()
        self._transitioned(record)
        return reply

    def _left_to_the_driver(self, reply: dict, transfer: Any = None) -> dict:
        """``reply`` with the GPU memory left for the driver tier (``gpu_bytes``); while the
        driver may hold the process, the garbage collector is held off (see .gc_hold)."""
        reply["gpu_bytes"] = gpu_bytes = self._residual_gpu_bytes(transfer)
        if gpu_bytes and not self.simulated:
            self.gc_hold.hold()
        return reply

    def on_restore(self, body: dict) -> dict:
        """An explicit restore (``%singularity restore``, REST): no cell is waiting for it."""
        device = body.get("device")
        self.finish_early_restore(give_back=True)
        self.gc_hold.release()  # (the driver restored the process first)
        with self.lock:
            if isinstance(device, dict):
                self.device = device
                self._select_device(device)  # moved by the driver tier: name the new GPU
            engine = self.get_engine()
            if engine is None or not engine.offloaded:
                self.state = "resident"
                return {"gpu_bytes": self._device_bytes(force=True)}
            self.state = "restoring"
            started = time.perf_counter()
            try:
                transfer = engine.restore()
            except Exception as err:
                self.state = "error"
                self._transitioned(
                    TransferRecord(
                        "restore",
                        0,
                        time.perf_counter() - started,
                        error=restore_failure(err, engine, self.shell),
                    )
                )
                return {"error": str(err) or type(err).__name__}
            record = self._record_transfer("restore", transfer, "requested")
            self.footprint.known(transfer.nbytes)
            self.state = "resident"
            reply = {"gpu_bytes": self._device_bytes(), "transfer": record.to_dict()}
        self._transitioned(record)
        return reply

    def on_spill(self, body: dict) -> dict:
        """Move the host copy of the offloaded state to files in ``directory``."""
        self.finish_early_restore(give_back=True)
        with self.lock:
            engine = self.get_engine()
            if engine is None or not engine.offloaded:
                return {
                    "host_bytes": int(getattr(engine, "host_bytes", 0) or 0),
                    "disk_bytes": int(getattr(engine, "disk_bytes", 0) or 0),
                }
            started = time.perf_counter()
            try:
                directory = Path(str(body["directory"]))
                moved = int(engine.spill(directory, keep_pool=bool(body.get("cuda_frozen"))))
            except Exception as err:
                message = str(err) or type(err).__name__
                self._transitioned(
                    TransferRecord("spill", 0, time.perf_counter() - started, error=message)
                )
                return {"error": message}
            record = TransferRecord("spill", moved, time.perf_counter() - started)
            self.state = "spilled" if not engine.host_bytes else "offloaded"
            reply = {
                "host_bytes": int(engine.host_bytes),
                "disk_bytes": int(engine.disk_bytes),
                "transfer": record.to_dict(),
            }
        self._transitioned(record)
        return reply
