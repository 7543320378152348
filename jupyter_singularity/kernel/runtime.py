"""The kernel's side of the pool: leases for cells, and the broker's requests while the kernel is idle.

One :class:`Runtime` per kernel process. It

* holds a lease while a cell of a GPU-using kernel runs (the gate, :mod:`.gate`, asks for it at the top
  of the cell; ``post_execute`` gives it back with the cell's peak and current GPU bytes, or keeps it
  for the next cell while no other kernel waits: :mod:`.kept_lease`);
* restores the kernel's GPU state before a cell runs when the broker's grant says so;
* answers the broker's ``offload``, ``restore`` and ``spill`` pushes on the client's push-worker
  thread, serialised with cell restores through one lock, and refuses an offload while a cell holds
  its lease;
* keeps the last transfers (kind, bytes, seconds, GB/s) for ``%singularity log`` and the widget.

The tensor tier itself is :class:`~.offload.TensorEngine`, created lazily once torch is imported
(importing torch here would make every kernel pay for it, and on simulated devices an import of torch
is what marks a kernel as a GPU user).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..protocol import ENV_NODE_BROKER, ENV_SIMULATED, UniqueIds
from .client import BrokerClient, BrokerError
from .early_acquire import EarlyAcquire
from .footprint import Footprint
from .gate import (
    CudaInitGate,
    GateInserter,
    InterruptTrap,
    LeaseCancelled,
    LeaseDenied,
    RestoreFailed,
    TorchImportHook,
    WaitLine,
    install_gate,
    parse_cell_options,
    uninstall_gate,
)
from .gc_hold import GcHold
from .kept_lease import KEEP_AGE, Keeper, KeptLease
from .membership import Membership
from .out_of_memory import explain_out_of_memory
from .outliving import OutlivingWork
from .process_probes import cuda_driver_initialised, driver_gpu_bytes
from .pushes import BrokerPushes, TransferRecord
from .relay import MainThreadRelay
from .swap import CellRestores

log = logging.getLogger(__name__)

#: How long the kernel waits for the broker to acknowledge it at start-up (a node broker's kernel
#: then goes on without the answer, and joins it when it answers: see .membership).
HELLO_TIMEOUT, NODE_HELLO_TIMEOUT = 10.0, 2.0
#: Timeout of the small requests made for magics and the widget.
STATUS_TIMEOUT = 10.0
#: How often a waiting cell checks for an interrupt and refreshes its line and widgets.
WAIT_POLL = 0.05
#: Transfers kept for the widget and ``%singularity log``; cells' peaks kept for a rejoin.
TRANSFER_HISTORY, PEAK_HISTORY = 20, 5


@dataclass
class Lease:
    """The lease the running cell holds."""

    request_id: str
    device: dict
    reservation: int
    restore: bool
    granted_at: float
    start_bytes: int = 0
    generation: int = 0
    """The broker run that granted it (``Membership.generation``)."""
    keep: float = 0.0
    """Seconds the lease may be kept after a cell for the next one (see .kept_lease)."""
    kept_at: float | None = None
    """When the last cell under it ended, while it is kept; None while a cell holds it."""
    wanted: bool = False
    """The broker asked for it back: given back when its cell ends."""


@dataclass
class Waiting:
    """The request a cell is waiting on; ``queued`` pushes from the broker update it."""

    request_id: str
    memory: int | None
    since: float
    position: int = 0
    reason: str = ""
    restoring: int = 0
    body: dict = field(default_factory=dict)
    """The acquire, as sent (and sent again to a broker that restarted)."""
    generation: int = 0
    """The broker run it was sent in (``Membership.generation``)."""


class Runtime(CellRestores, BrokerPushes, EarlyAcquire, KeptLease):
    """One per kernel process: the broker client, the lease of the running cell, the engine."""

    current: ClassVar[Runtime | None] = None

    def __init__(
        self,
        client: BrokerClient,
        shell: Any = None,
        *,
        simulated: bool = False,
        min_bytes: int = 1 << 20,
        membership: Membership | None = None,
    ) -> None:
        self.client = client
        self.membership = membership or Membership(client, node=False)
        self.membership.holdings = self.holdings
        self.membership.on_join = self._joined
        self.shell = shell
        self.simulated = simulated
        #: Pinned host memory the pool lets this kernel keep: each grant says how much.
        self.pinned_limit = 0
        self.min_bytes = min_bytes
        #: Serialises everything that moves the kernel's state: offload, restore, spill.
        self.lock = threading.RLock()
        #: Guards which early restore of a swap runs (never held while state moves).
        self.early_lock = threading.Lock()
        #: One lease request at a time (the main thread, or a thread initialising CUDA).
        self._acquire_mutex = threading.Lock()
        #: Whether a kept lease is taken over by a cell or given back is decided under this.
        self._keep_lock = threading.Lock()
        self._keeper = Keeper(self._kept_window_ended)
        self.engine: Any = None
        self.engine_error = ""
        self.gpu_used = False
        self.gc_hold = GcHold()
        self._driver_bytes: int | None = None  # (see _device_bytes)
        self.outliving = OutlivingWork()
        self.lease: Lease | None = None
        self.waiting: Waiting | None = None
        self.device: dict | None = None
        self.state = "cold"
        self.transfers: deque[TransferRecord] = deque(maxlen=TRANSFER_HISTORY)
        self.peaks: deque[int] = deque(maxlen=PEAK_HISTORY)
        self.transitions = 0
        self._transition_cv = threading.Condition()
        self._listeners: list[Callable[[], None]] = []
        self.relay = MainThreadRelay(shell)
        self._depth = 0
        self.footprint = Footprint(min_bytes)
        self._launch_device = os.environ.get("CUDA_VISIBLE_DEVICES")
        self._inserter: GateInserter | None = None
        self._import_hook: TorchImportHook | None = None
        self._cuda_gate = CudaInitGate(self._before_cuda_init, self._after_cuda_init)
        self.widgets: Any = None  # the widget poller, created by the first %singularity
        #: Lease request ids: unique across the kernel's restarts (the broker keys leases by its
        #: kernel id and them), drawn without a system call per cell (see UniqueIds).
        self._request_ids = UniqueIds()

    # ------------------------------------------------------------------------------ lifecycle

    @classmethod
    def attach(cls, ipython: Any) -> Runtime | None:
        """Connect to the broker named in the environment; outside the pool, do nothing."""
        if cls.current is not None:
            return cls.current
        client = BrokerClient.from_env()
        if client is None:
            log.info("jupyter-singularity: not started by a pooled server; runtime inactive")
            return None
        client.start()
        membership = Membership(client, node=os.environ.get(ENV_NODE_BROKER) == "1")
        runtime = cls(
            client,
            ipython,
            simulated=os.environ.get(ENV_SIMULATED) == "1",
            membership=membership,
        )
        if membership.hello(NODE_HELLO_TIMEOUT if membership.node else HELLO_TIMEOUT) is None:
            if not membership.node:
                log.error("jupyter-singularity: the GPU pool did not answer; runtime inactive")
                client.close()
                return None
            log.warning(
                "jupyter-singularity: the GPU pool's broker does not answer; GPU cells wait for it"
            )
        membership.start()
        runtime.install(ipython)
        cls.current = runtime
        return runtime

    def _joined(self, reply: dict) -> None:
        """The kernel joined a broker run (at start, or after a restart): what the pool says."""
        self.simulated = self.simulated or bool(reply.get("simulated"))
        self.state = (reply.get("kernel") or {}).get("state", self.state)
        self.notify()

    @classmethod
    def detach(cls, ipython: Any) -> None:
        runtime, cls.current = cls.current, None
        if runtime is not None:
            runtime.uninstall(ipython)

    def install(self, ipython: Any) -> None:
        from .magics import SingularityMagics

        for push, handler in (
            ("offload", self.on_offload),
            ("restore", self.on_restore),
            ("spill", self.on_spill),
            ("room", self.on_room),
            ("queued", self.on_queued),
            ("lease_wanted", self.on_lease_wanted),
        ):
            self.client.on(push, handler)
        if ipython is not None:
            ipython.events.register("pre_execute", self._pre_execute)
            ipython.events.register("pre_run_cell", self._pre_run_cell)
            ipython.events.register("post_execute", self._post_execute)
            self._inserter = install_gate(ipython, self.gate_cell)
            self._wrap_execute_request(ipython)
            ipython.register_magics(SingularityMagics(ipython, runtime=self))
        self._import_hook = TorchImportHook(self._before_torch_import, self._on_torch_imported)
        self._import_hook.install()
        atexit.register(self._at_exit)

    def uninstall(self, ipython: Any) -> None:
        if self.widgets is not None:
            self.widgets.stop()
        if ipython is not None:
            for event, callback in (
                ("pre_execute", self._pre_execute),
                ("pre_run_cell", self._pre_run_cell),
                ("post_execute", self._post_execute),
            ):
                with contextlib.suppress(ValueError):
                    ipython.events.unregister(event, callback)
            uninstall_gate(ipython, self._inserter)
            self._unwrap_execute_request()
        if self._import_hook is not None:
            self._import_hook.uninstall()
        self._cuda_gate.uninstall()
        atexit.unregister(self._at_exit)
        self._close_keeper()
        self.footprint.close()
        self.membership.close()
        self.client.close()

    def _at_exit(self) -> None:
        """Spill files and host copies go with the process (the broker also forgets the kernel)."""
        engine = self.engine
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.discard()

    # ------------------------------------------------------------------------ listeners (UI)

    def add_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    def notify(self) -> None:
        """Something changed (a transition, a queue position): refresh whoever shows it."""
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                log.exception("jupyter-singularity: listener failed")

    def _transitioned(self, record: TransferRecord) -> None:
        self.transfers.append(record)
        with self._transition_cv:
            self.transitions += 1
            self._transition_cv.notify_all()
        self.notify()

    def wait_for_transition(self, after: int, timeout: float) -> TransferRecord | None:
        """The first transfer recorded after the ``after``-th one, or None within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._transition_cv:
            while self.transitions <= after:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._transition_cv.wait(min(remaining, 0.1))
            return self.transfers[-1]

    # --------------------------------------------------------------------------- broker views

    def status(self, timeout: float = STATUS_TIMEOUT) -> dict:
        return self.client.request("status", {}, timeout=timeout)

    def request(self, type: str, body: dict | None = None, timeout: float = STATUS_TIMEOUT) -> dict:
        return self.client.request(type, body or {}, timeout=timeout)

    # ----------------------------------------------------------------------- cells and leases

    def _pre_execute(self) -> None:
        self.outliving.first_cell()
        self._depth += 1

    def _post_execute(self) -> None:
        # An empty cell fires post_execute without pre_execute: never below zero. A nested
        # run_cell (user code calling IPython) keeps the outer cell's lease.
        self._depth = max(0, self._depth - 1)
        if self._depth:
            return
        held = self._leave_cell()
        if held is None and not (self.gpu_used or self.simulated) and cuda_driver_initialised():
            self._cuda_started_ungated()

    def _leave_cell(self) -> Lease | None:
        """End what the cell took: an acquire sent early that it never used, the lease it holds
        (kept for the next cell, or given back). Returns that lease."""
        early, self._early = self._early, None
        if early is not None:
            self._abandon(early)
        lease = self.lease
        if lease is not None and lease.kept_at is None:  # (else the cell did not take it over)
            self._cell_ended(lease)
        return lease

    def _cuda_started_ungated(self) -> None:
        """The cell that just ended started CUDA outside torch's gated path (CuPy, JAX, Numba,
        torch's pinned memory or streams): its GPU memory is in use already. From now on the
        kernel's cells are gated, and the broker books what it holds at once: a lease on the GPU
        its CUDA runs on, given back with the bytes (NVML's) it holds there."""
        self.gpu_used = True
        try:
            lease = self.acquire(None, top_of_cell=False, what="CUDA started by this cell")
        except (LeaseDenied, LeaseCancelled, RestoreFailed) as err:
            log.warning("jupyter-singularity: CUDA use not booked with the pool: %s", err)
            return
        self.release(lease)

    def gate_cell(self, line: str | None = None) -> None:
        """The top of a cell: take a lease if the kernel uses the GPU (or ``%%singularity`` asks)."""
        explicit = line is not None
        if self.lease is not None:
            if explicit:  # its own reservation, in a lease of its own (not one kept)
                self._hand_back_kept()
            if self._claim_kept():
                return
        if not (explicit or self.gpu_used or self._early is not None):
            return
        memory = parse_cell_options(line) if explicit else None
        self.acquire(memory, top_of_cell=True)

    def acquire(self, memory: int | None, *, top_of_cell: bool, what: str = "this cell") -> Lease:
        """Ask the broker for a lease and wait for it, showing the wait in the cell's output.

        Returns with the lease held and the kernel's state on the device. Raises LeaseDenied,
        LeaseCancelled (interrupted: the request left the queue) or RestoreFailed.
        """
        with self._acquire_mutex:
            if self.lease is not None:
                return self.lease
            early, self._early = self._early, None
            waiting, future = early if early is not None else self._send_acquire(memory)
            request_id = waiting.request_id
            line = WaitLine(top_of_cell, what)
            try:
                with InterruptTrap() as trap:
                    reply, cancelled = self._await_grant(future, waiting, line, trap)
                    if not reply.get("granted"):
                        reason = str(reply.get("reason") or "the broker gave no reason")
                        if cancelled or reason == "cancelled":
                            raise LeaseCancelled(
                                "the cell stopped waiting for a GPU lease and left the queue; "
                                "it did not run."
                            )
                        raise LeaseDenied(reason)
                    lease = self._granted(request_id, reply)
                    self._restore_for_cell(lease, waiting, line)
                    self._lease_started(lease)
                    if cancelled or trap.fired:
                        raise LeaseCancelled(
                            "the lease arrived as the cell was interrupted; the cell did not run."
                        )
                    return lease
            finally:
                self.finish_early_restore(give_back=True)  # (no-op once granted)
                self.waiting = None
                line.close()
                self.notify()

    def _send_acquire(self, memory: int | None) -> tuple[Waiting, concurrent.futures.Future | None]:
        """Send an acquire; the future gets the broker's answer (grant or denial). None: the
        broker is away, the request goes once the kernel joined it (see .membership)."""
        waiting = Waiting(self._request_ids.next(), memory, time.monotonic())
        waiting.body = {"request_id": waiting.request_id, "memory": memory}
        bound = self._bound_gpu()
        if bound is not None:
            waiting.body["bound_uuid"] = bound
        self.waiting = waiting  # before sending: the broker's ``queued`` push may come at once
        if self.membership.node and not self.membership.joined.is_set():
            return waiting, None
        waiting.generation = self.membership.generation
        return waiting, self.client.submit("acquire", waiting.body, collect=True)

    def _bound_gpu(self) -> str | None:
        """Before the first grant: the launch GPU, if something in the process (a library other
        than torch's gated path) initialised the CUDA driver already, which fixed its GPU; the
        broker must then grant that one (see :meth:`_select_device`)."""
        if self.simulated or self.device is not None or not self._launch_device:
            return None
        return self._launch_device if cuda_driver_initialised() else None

    def _await_grant(
        self,
        future: concurrent.futures.Future | None,
        waiting: Waiting,
        line: WaitLine,
        trap: InterruptTrap,
    ) -> tuple[dict, bool]:
        """The broker's answer to the acquire, and whether the cell was interrupted (it then
        left the queue). A server's own broker that stops answering pings is a denial, so the
        cell fails instead of hanging; a node broker is waited for (see .membership)."""
        notified = (0, "")
        on_main = threading.current_thread() is threading.main_thread()
        wait = self.membership.lease_wait(waiting, future)
        while True:
            try:
                return wait.answer(WAIT_POLL), False
            except concurrent.futures.TimeoutError:
                pass
            if trap.fired:
                return wait.cancel(), True
            if (lost := wait.lost()) is not None:
                return {"granted": False, "reason": lost}, False
            line.away(wait.away_for())
            line.tick(waiting)
            if (waiting.position, waiting.reason) != notified:
                notified = (waiting.position, waiting.reason)
                self.notify()
            if on_main:
                self.relay.run_pending()

    def _granted(self, request_id: str, reply: dict) -> Lease:
        device = reply.get("device") or {}
        lease = Lease(
            request_id=request_id,
            device=device,
            reservation=int(reply.get("reservation") or 0),
            restore=bool(reply.get("restore")),
            granted_at=time.monotonic(),
            generation=self.membership.generation,
            keep=_keep_seconds(reply),
        )
        self.lease = lease
        self.gc_hold.release()  # (a process the driver held is restored before its grant)
        self.gpu_used = True
        self.device = device
        self.state = "running"
        self.pinned_limit = int(reply.get("pool_allowance") or 0)
        if self.engine is not None:
            self.engine.pinned_limit = self.pinned_limit
        self._select_device(device)
        return lease

    def _select_device(self, device: dict) -> None:
        """Name the granted GPU in CUDA_VISIBLE_DEVICES (by UUID: each kernel sees exactly one).

        CUDA reads it once, at initialisation: before that, a grant on another GPU than the launch
        one makes CUDA use the granted one. After it, the broker grants another GPU only once the
        driver tier restored the process there (a migration): CUDA runs there already, and the
        processes the kernel starts and its NVML lookups must name the new GPU too.
        """
        uuid_ = device.get("uuid")
        if self.simulated or not uuid_ or os.environ.get("CUDA_VISIBLE_DEVICES") == uuid_:
            return
        os.environ["CUDA_VISIBLE_DEVICES"] = uuid_

    def _lease_started(self, lease: Lease) -> None:
        torch = self._cuda_torch()
        if torch is not None:
            with contextlib.suppress(Exception):
                torch.cuda.reset_peak_memory_stats()
        lease.start_bytes = self._device_bytes(cached=True)

    def release(self, lease: Lease, idle: float = 0.0) -> None:
        """Give the lease back now, with its peak and the bytes now on the device; ``idle``:
        seconds since the last cell under it ended (kept: see .kept_lease)."""
        gpu_bytes = self._device_bytes()
        peak = max(lease.start_bytes, gpu_bytes)
        torch = self._cuda_torch()
        if torch is not None:
            with contextlib.suppress(Exception):
                peak = max(peak, int(torch.cuda.max_memory_allocated()))
        body: dict[str, Any] = {
            "request_id": lease.request_id,
            "peak_bytes": peak,
            "gpu_bytes": gpu_bytes,
        }
        if idle > 0:
            body["idle_seconds"] = idle
        with self.membership.report_lock:
            self.lease = None
            self.state = "resident"
            self.peaks.append(peak)
            self._send("release", body)
        if self._listeners:
            self.notify()
        if (
            torch is not None  # (the pool serves torch's storages, not another library's)
            and self.engine is not None
            and self.engine.pool_bytes < min(gpu_bytes, self.pinned_limit)
        ):
            threading.Thread(
                target=self._prepare_pool, args=(gpu_bytes,), name="singularity-pool", daemon=True
            ).start()

    def _prepare_pool(self, nbytes: int) -> None:
        """Pin host memory for the kernel's footprint while it idles, up to the next cell (the
        end of that cell starts this again; see TensorEngine.prepare)."""
        with self.lock:
            try:
                self.engine.prepare(nbytes, idle=lambda: self.lease is None)
            except Exception as err:  # the offload then allocates what it needs itself
                log.warning("jupyter-singularity: could not prepare the host pool: %s", err)

    def _send(self, type: str, body: dict) -> None:
        try:
            self.client.send(type, body)
        except BrokerError as err:
            log.warning("jupyter-singularity: %s not sent: %s", type, err)

    # ---------------------------------------------------------------- first GPU use (hooks)

    def _before_torch_import(self) -> None:
        """Simulated devices: the kernel's first ``import torch`` is its first GPU use. Whether
        the devices are simulated, the broker says: a cell waits for it to answer first."""
        if self._depth > 0 and self.membership.generation == 0:
            self.membership.wait_joined("import torch in this cell")
        if self.simulated:
            self.first_use("import torch")

    def _on_torch_imported(self, torch: Any) -> None:
        explain_out_of_memory(self.shell, torch, self._booked)
        if self.simulated:
            self.gpu_used = True
            return
        self._cuda_gate.install(torch)
        with contextlib.suppress(Exception):
            if torch.cuda.is_initialized():
                self.gpu_used = True

    def _booked(self) -> tuple[int, int] | None:
        """What the running cell's lease booked, and its GPU's size (see .out_of_memory)."""
        lease = self.lease
        if lease is None:
            return None
        return lease.reservation, int(lease.device.get("total_bytes") or 0)

    def first_use(self, what: str) -> Lease | None:
        """The kernel starts to use the GPU: inside a cell, that cell waits for a lease now.

        Returns a lease taken only for this use (outside any cell), which the caller releases.
        A use that was refused or interrupted did not happen: later cells stay ungated until the
        next try (the grant marks the kernel as a GPU user).
        """
        if self.lease is not None or (self._depth == 0 and self.simulated):
            # Under a lease already; or, simulated, outside a cell (no GPU work happens there):
            # the next cell takes a lease.
            self.gpu_used = True
            return None
        if self._depth > 0:
            self.acquire(None, top_of_cell=False, what=f"{what} in this cell")
            return None
        return self.acquire(None, top_of_cell=False, what=what)

    def _before_cuda_init(self) -> Lease | None:
        return self.first_use("CUDA initialisation")

    def _after_cuda_init(self, token: Lease | None) -> None:
        if token is not None and self.lease is token:
            self.release(token)

    def _cuda_torch(self) -> Any:
        if self.simulated:
            return None
        torch = sys.modules.get("torch")
        if torch is None:
            return None
        try:
            return torch if torch.cuda.is_initialized() else None
        except Exception:
            return None

    # ------------------------------------------------------------------------- the engine

    def get_engine(self) -> Any:
        """The tensor engine, once torch is imported; None before, or if it cannot be loaded."""
        if self.engine is not None:
            return self.engine
        if "torch" not in sys.modules or self.engine_error:
            return None
        with self.lock:
            if self.engine is None and not self.engine_error:
                try:
                    from .offload import TensorEngine

                    self.engine = TensorEngine(
                        simulated=self.simulated,
                        pinned_limit=self.pinned_limit,
                        min_bytes=self.min_bytes,
                    )
                except Exception as err:  # ImportError included: the engine is optional
                    self.engine_error = f"the tensor engine is unavailable: {err}"
                    log.error("jupyter-singularity: %s", self.engine_error)
        return self.engine

    def _device_bytes(self, force: bool = False, cached: bool = False) -> int:
        """Bytes of this kernel's state on its device now: what torch's caching allocator holds on
        CUDA, the engine's large CPU storages on simulated devices (see .footprint; ``cached``:
        the last figure, as at the start of a cell, when no cell ran since it was taken)."""
        torch = self._cuda_torch()
        if torch is not None:
            try:
                return int(torch.cuda.memory_reserved())
            except Exception:
                return 0
        if not self.simulated:  # CUDA started by another library, or none at all: NVML's figure,
            # asked again only where a cell may have changed it (not at the top of each cell)
            if not cached or self._driver_bytes is None:
                self._driver_bytes = driver_gpu_bytes()
            return self._driver_bytes
        engine = self.get_engine()
        if engine is None or engine.offloaded:
            return 0
        if cached and self.footprint.last is not None:
            return self.footprint.last
        with self.lock:
            return self.footprint.measure(engine, force)


def _keep_seconds(reply: dict) -> float:
    """How long a grant lets the kernel keep its lease between cells (0: not at all)."""
    keep = reply.get("keep_seconds")
    if isinstance(keep, bool) or not isinstance(keep, int | float) or not 0 < keep < KEEP_AGE:
        return 0.0
    return float(keep)


__all__ = [
    "LeaseCancelled",
    "LeaseDenied",
    "MainThreadRelay",
    "RestoreFailed",
    "Runtime",
    "TransferRecord",
]
