"""The pool broker as a running service: the decision core plus the I/O it decides on.

It owns the core, the kernels' RPC channel, the ledger and a tick loop. Every event (a kernel
message, a REST call, a clock tick, a dead process) is fed to :class:`~.core.BrokerCore`, and the
actions it returns are carried out here: answer a waiting cell, ask an idle kernel to offload,
write the ledger, emit an event for the browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_runtime_dir

from ..devices import DeviceInfo, DeviceInventory
from ..protocol import (
    ENV_BROKER_URL,
    ENV_KERNEL_ID,
    ENV_KERNEL_KEY,
    ENV_NODE_BROKER,
    ENV_SIMULATED,
    generate_key,
)
from .checkpoint import DriverCapability, DriverCheckpointer, detect
from .core import BrokerCore
from .identity import Identity
from .kept_leases import KeptLeases
from .kernel_requests import KernelConnection, KernelRequests
from .ledger import GONE, Ledger, LedgerError, day_start
from .metrics import TRANSFER_DIRECTIONS, PoolMeter
from .model import (
    Action,
    Deny,
    Forget,
    Grant,
    KernelState,
    LeaseEnded,
    Offload,
    Policy,
    Spill,
    StateChanged,
    Wait,
)
from .pool_events import (
    KERNEL_STATE_SCHEMA,
    LEASE_SCHEMA,
    PIN_SCHEMA,
    QUEUE_SCHEMA,
    coalesce,
    lease_event,
)
from .processes import alive, broker_alive, this_process
from .quotas import Quotas
from .rpc import RPCServer
from .spill_dirs import KernelIdError, SpillDirs, check_kernel_id
from .state_moves import StateMoves, _context_view
from .watchdog import Watchdog

Emit = Callable[[str, dict], None]
"""``emit(name, data)`` for the browser (see .pool_events)."""

#: States whose end is a data transfer the kernel measured (offload, restore, spill).
TRANSFER_STATES = tuple(TRANSFER_DIRECTIONS)

#: How often spill folders left by kernels that died unseen (with a previous server) are looked for.
SWEEP_INTERVAL = 600.0

#: How long, after a node broker starts, the GPUs where kernels of its previous run held memory
#: wait for them to rejoin before taking new grants (see broker.rejoin).
REJOIN_WINDOW = 30.0

#: Ledger writes are buffered and flushed this many seconds after the first one, off the
#: path of the cell that caused them; a busy pool writes one transaction for many cells (each
#: costs about 2 ms of the broker's time, most of it the same whatever its size). Reads flush
#: first; a broker killed with -9 loses the records of this last moment only.
LEDGER_FLUSH_DELAY = 0.5

#: Events for the browser go out in batches, at most this many seconds after their change: each
#: costs the server about 0.35 ms (jupyter_events validates it for a listening browser), which
#: the next message of a kernel would otherwise wait for (see BrokerService._event); a lease that
#: began and ended within a batch is told by one event (see .pool_events.coalesce).
EVENTS_DELAY = 0.05

#: Waiting cells hear where and why they wait at most this many seconds after it changed (see
#: BrokerService._tell_positions); those granted meanwhile never hear they waited.
POSITIONS_DELAY = 0.05


@dataclass
class KernelLaunch:
    """What the provisioner needs to start a kernel inside the pool."""

    kernel_id: str
    home: DeviceInfo | None
    env: dict[str, str]


class BrokerService(KernelRequests, StateMoves, Watchdog, KeptLeases):
    """Carries out the core's decisions; the only object handlers and the provisioner talk to."""

    def __init__(
        self,
        inventory: DeviceInventory,
        ledger: Ledger,
        quotas: Quotas,
        policy: Policy,
        *,
        log: logging.Logger,
        emit: Emit | None = None,
        clock: Callable[[], float] = time.time,
        tick_interval: float = 1.0,
        ping_interval: float = 5.0,
        ping_misses: int = 3,
        offload_timeout: float = 300.0,
        lease_stall_timeout: float = 120.0,
        spill_dir: Path | None = None,
        driver: DriverCheckpointer | None = None,
    ) -> None:
        """``driver`` is the driver tier; by default the machine's libcuda where the pool has
        real GPUs, and none on simulated devices."""
        self.inventory = inventory
        self.ledger = ledger
        self.log = log
        self.emit = emit or (lambda schema, data: None)
        self.clock = clock
        self.tick_interval = tick_interval
        self.ping_interval = ping_interval
        self.ping_misses = ping_misses
        self.offload_timeout = offload_timeout
        self.lease_stall_timeout = lease_stall_timeout
        self.spill_dirs = None if spill_dir is None else SpillDirs(spill_dir)
        self.node = False
        """Whether this is a node broker (a system service every user's server joins)."""
        self.verify_peers = False
        """Whether the kernel channel's peers must be their kernel's owner (the OS says who they
        are): a node broker serving many users sets it; a server's own pool needs not."""
        self.meter = PoolMeter()
        """What happened between two scrapes of the metrics (queue waits, transfers)."""
        self.instance = uuid.uuid4().hex
        """This run of the broker, in its replies to servers and kernels: a new one tells them
        that it restarted and that they must join it again."""
        now = clock()
        closed = ledger.attach(at=now, me=this_process(), alive=broker_alive)
        self._left_on_devices: dict[str, int] = closed["devices"]
        if closed["leases"] or closed["kernels"]:
            log.warning(
                "jupyter-singularity: the last run ended without closing its records: %d "
                "lease(s) and %d kernel(s) closed in the ledger",
                closed["leases"],
                len(closed["kernels"]),
            )
        real_gpus = bool(inventory.devices()) and not inventory.simulated
        if driver is None:
            driver = DriverCheckpointer(
                detect()
                if real_gpus
                else DriverCapability(False, False, None, "no real GPU in the pool")
            )
        self._driver = driver
        self.driver_capability = driver.capability
        if real_gpus or driver.capability.available:
            log.info("jupyter-singularity: %s", self.driver_capability.log_line())
            if policy.migration and not self.driver_capability.migration:
                # Restoring onto another GPU needs the driver's UUID remap.
                policy = replace(policy, migration=False)
        if inventory.simulated:
            # Simulated devices live in host memory already: a kept host pool would only double it.
            policy = replace(policy, pinned_per_kernel=0)
        self.core = BrokerCore(
            inventory.devices(),
            quotas,
            policy,
            usage_today=ledger.gpu_seconds_by_user(day_start(now), now),
            now=now,
        )
        self._connections: dict[str, KernelConnection] = {}
        self._swaps = {}
        self._rpc = RPCServer(self._key_for, self._handle, log)
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._positions_handle: asyncio.TimerHandle | None = None
        self._waits_due: dict[tuple[str, str], Wait] = {}
        self._keepable: dict[str, str] = {}
        self._events: list[tuple[str, dict]] = []
        self.endpoint = ""

    # -------------------------------------------------------------------------------- lifecycle

    async def start(self, socket: Path | None = None) -> None:
        """Start serving kernels: on ``socket`` (a node broker's, shared by every user's kernels),
        else on a Unix socket in a private directory under Jupyter's runtime dir."""
        await self._sweep_spill_dirs()
        if socket is None:
            self.endpoint = await self._rpc.start(Path(jupyter_runtime_dir()))
        else:
            self.endpoint = await self._rpc.start_shared(socket)
        if self.node and self._left_on_devices:
            now = self.clock()
            self._apply(self.core.expect_rejoins(self._left_on_devices, now, now + REJOIN_WINDOW))
        self._loop_task = asyncio.create_task(self._tick_loop())
        self.log.debug("jupyter-singularity broker listening on %s", self.endpoint)

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for task in list(self._tasks):
            task.cancel()
        await self._rpc.stop()
        for handle in (self._flush_handle, self._positions_handle):
            if handle is not None:
                handle.cancel()
        self._emit_events()
        self._flush_ledger()
        try:
            self.ledger.detach(self.clock())
        except LedgerError as err:
            self.log.error("jupyter-singularity: %s", err)

    async def _sweep_spill_dirs(self, min_age: float = 0.0) -> None:
        """Spill folders of kernels that no longer exist (their server was killed, say) go; at
        start none of the kernels they belonged to can still be served. Later, a folder younger
        than ``min_age`` seconds is left for the next sweep: its kernel may be registering."""
        if self.spill_dirs is None:
            return
        removed = await asyncio.to_thread(
            self.spill_dirs.sweep, set(self._connections), alive, min_age
        )
        if removed:
            self.log.warning(
                "jupyter-singularity: removed the spill files of %d kernel(s) that no longer "
                "exist: %s",
                len(removed),
                ", ".join(removed),
            )

    # ----------------------------------------------------------------- kernels (provisioner side)

    def register_kernel(
        self, kernel_id: str, owner: Identity, notebook: str = "", key: bytes | None = None
    ) -> KernelLaunch:
        """Admit ``owner``'s kernel about to be launched; its environment carries the channel and
        key. Where the broker checks peers (a node broker in unix mode), only processes of the
        owner's uid may then speak for the kernel.

        ``key``: the kernel's signing key where its server chose it (a node broker's servers do,
        so that a kernel started while the broker was away, or before it restarted, can join it
        later); else a fresh one.

        The same kernel registered again with the same key (its server joining this broker once
        more) stays as it is; with another key it is a new kernel of that id (restarted).

        Raises KernelIdError for an id that could name a path outside its spill directory, or
        whose spill folder is another user's."""
        check_kernel_id(kernel_id)
        known = self._connections.get(kernel_id)
        if known is None or known.key != key:
            if known is not None:
                self.unregister_kernel(kernel_id, "restarted")
            if self.node and owner.uid is not None and self.spill_dirs is not None:
                self._make_spill_dir(kernel_id, owner.uid)
            key = key or generate_key()
            self._connections[kernel_id] = KernelConnection(key, owner_uid=owner.uid)
            self.ledger.kernel_joined(kernel_id)
            self._apply(
                self.core.register(
                    kernel_id, owner.user, self.clock(), groups=owner.groups, notebook=notebook
                )
            )
            self._rpc.known(kernel_id)
        key = self._connections[kernel_id].key
        home_index = self.core.kernels[kernel_id].home
        home = None if home_index is None else self.core.devices[home_index]
        env = {
            ENV_BROKER_URL: self.endpoint,
            ENV_KERNEL_ID: kernel_id,
            ENV_KERNEL_KEY: key.decode(),
        }
        if home is not None and not self.inventory.simulated:
            env["CUDA_VISIBLE_DEVICES"] = home.uuid
            # torch.cuda.is_available() then asks NVML instead of initialising CUDA, which would
            # fix the kernel to its home GPU before its first lease could choose another.
            env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
        if self.inventory.simulated:
            env[ENV_SIMULATED] = "1"
        if self.node:
            env[ENV_NODE_BROKER] = "1"
        return KernelLaunch(kernel_id, home, env)

    def _make_spill_dir(self, kernel_id: str, uid: int) -> None:
        """Raises KernelIdError where the folder is another user's."""
        try:
            self.spill_dirs.make_for(kernel_id, uid)
        except OSError as err:  # it then spills nowhere: its offloads keep state in memory
            self.log.error(
                "jupyter-singularity: cannot make the spill folder of kernel %s for uid %d: %s",
                kernel_id,
                uid,
                err,
            )

    def _spill_dir_of(self, kernel_id: str) -> Path | None:
        return None if self.spill_dirs is None else self.spill_dirs.of(kernel_id)

    def kernel_started(self, kernel_id: str, pid: int | None) -> None:
        """The provisioner launched the process: watch its pid so a kill -9 is noticed (until
        the kernel's own, verified at its hello, is known)."""
        connection = self._connections.get(kernel_id)
        if connection is not None and pid:
            connection.launched_pid = pid

    def kernel_stopping(self, kernel_id: str, reason: str) -> bool:
        """The server is stopping the kernel: its process exit is expected, not a death.

        Returns True when the process must be ended at once: the driver tier holds it
        checkpointed, so its CUDA calls, and with them its clean exit, would wait for a restore
        that is not coming (its state is being discarded anyway)."""
        connection = self._connections.get(kernel_id)
        if connection is None:
            return False
        connection.stopping = reason
        return connection.checkpointed_uuid is not None

    def unregister_kernel(self, kernel_id: str, reason: str = "shut down") -> None:
        """The kernel ended: everything it held is released."""
        connection = self._connections.pop(kernel_id, None)
        if connection is None:
            return
        self.log.info("jupyter-singularity: kernel %s left the pool (%s)", kernel_id, reason)
        self._rpc.forget(kernel_id)
        self._apply(self.core.unregister(kernel_id, self.clock(), reason=f"kernel {reason}"))
        for waiter in connection.waiters.values():
            if not waiter.done():
                waiter.set_result({"granted": False, "reason": f"kernel {reason}"})

    # ------------------------------------------------------------------------ REST-facing views

    def pool(self) -> dict:
        """The core's view (bookings) beside the driver's (NVML: memory in use, per device and per
        kernel process), so an admin sees both; the driver's figures are null when unknown."""
        snapshot = self.core.snapshot(self.clock())
        by_process: dict[int, int] = {}
        for device in snapshot["devices"]:
            device["used_bytes"] = self.inventory.memory_used(device["index"])
            for pid, nbytes in self.inventory.process_memory(device["index"]).items():
                by_process[pid] = by_process.get(pid, 0) + nbytes
        for kernel in snapshot["kernels"]:
            connection = self._connections.get(kernel["kernel_id"])
            pid = None if connection is None else connection.pid
            kernel["process_gpu_bytes"] = (
                None if pid is None or self.inventory.simulated else by_process.get(pid, 0)
            )
        snapshot["inventory"] = {
            "kind": self.inventory.kind,
            "simulated": self.inventory.simulated,
            "reason": self.inventory.reason,
        }
        return snapshot

    def kernel(self, kernel_id: str) -> dict:
        kernel = self.core.kernels.get(kernel_id)
        if kernel is None:
            raise KeyError(kernel_id)
        record = kernel.to_dict()
        connection = self._connections.get(kernel_id)
        record["context"] = _context_view(connection, self.driver_capability)
        record["events"] = self.ledger.events(kernel_id=kernel_id, limit=20)
        return record

    def offload(self, kernel_id: str) -> dict:
        self._known(kernel_id)
        self._apply(self.core.offload(kernel_id, self.clock(), reason="requested by user"))
        self._want_back(kernel_id)  # (a lease it keeps between cells: offloaded once given back)
        return self.kernel(kernel_id)

    def restore(self, kernel_id: str) -> dict:
        self._known(kernel_id)
        self._apply(self.core.restore(kernel_id, self.clock()))
        return self.kernel(kernel_id)

    def pin(self, kernel_id: str, pinned: bool, by: str | None = None) -> dict:
        """Pin or unpin a kernel; ``by`` is who asked (default: the kernel's user).

        A change is recorded in the kernel's events (its state unchanged, the reason saying who)
        and emitted as a ``pin`` event, before what it causes (unpinned, the kernel may be
        offloaded at once for a waiting cell). Pinning a pinned kernel records nothing.
        """
        self._known(kernel_id)
        kernel = self.core.kernels[kernel_id]
        now = self.clock()
        if kernel.pinned != pinned:
            who = by or kernel.user
            reason = f"{'pinned' if pinned else 'unpinned'} by {who}"
            state = kernel.state.value
            self.ledger.state_changed(
                time=now,
                kernel_id=kernel_id,
                user=kernel.user,
                old=state,
                new=state,
                reason=reason,
                device_index=kernel.device,
            )
            self._event(
                PIN_SCHEMA,
                {
                    "kernel_id": kernel_id,
                    "user": kernel.user,
                    "pinned": pinned,
                    "by": who,
                    "state": state,
                    "reason": reason,
                },
            )
        self._apply(self.core.set_pinned(kernel_id, pinned, now))
        return self.kernel(kernel_id)

    def notebook_renamed(self, old: str, new: str, user: str | None = None) -> list[str]:
        """A notebook, or a folder of notebooks, was renamed or moved from ``old`` to ``new`` (paths
        in the form the kernels' notebooks were recorded in): their kernels (``user``'s only, if
        given) show the new path. Returns the ids of the kernels whose notebook moved. The ledger
        keeps no notebook paths, so only the pool's view changes."""
        moved = self.core.notebook_moved(old, new, user)
        for kernel_id in moved:
            self.log.info(
                "jupyter-singularity: kernel %s now belongs to %s",
                kernel_id,
                self.core.kernels[kernel_id].notebook,
            )
        return moved

    def quota(self, user: str, groups: Iterable[str] = ()) -> dict:
        now = self.clock()
        mine = [k for k in self.core.kernels.values() if k.user == user]
        return {
            "user": user,
            "limits": self.core.limits(user, tuple(groups)).to_dict(),
            "usage": {
                "gpu_seconds_today": self.core.used_seconds(user, now),
                "gpu_bytes": sum(k.booking() for k in mine),
                "host_bytes": sum(k.host_bytes for k in mine),
                "resident_kernels": sum(
                    1
                    for k in mine
                    if k.state in (KernelState.RUNNING, KernelState.RESTORING, KernelState.RESIDENT)
                ),
            },
        }

    def quotas(self) -> Quotas:
        return self.core.quotas

    def set_quotas(self, quotas: Quotas) -> None:
        self._apply(self.core.set_quotas(quotas, self.clock()))

    def usage(self, since: float, until: float, user: str | None = None) -> dict:
        return {
            "since": since,
            "until": until,
            "users": self.ledger.usage(since=since, until=until, user=user),
            "leases": self.ledger.leases(since=since, until=until, user=user),
        }

    def _known(self, kernel_id: str) -> None:
        if kernel_id not in self.core.kernels:
            raise KeyError(kernel_id)

    # ------------------------------------------------------------------------- carrying out

    def _apply(self, actions: list[Action]) -> None:
        self._carry_out(actions)
        if self.ledger.pending and self._flush_handle is None:
            self._flush_handle = _later(LEDGER_FLUSH_DELAY, self._flush_ledger)
        if self._positions_handle is None:
            self._positions_handle = _later(POSITIONS_DELAY, self._tell_positions)

    def _tell_positions(self) -> None:
        """Tell the cells that wait where and why, at most POSITIONS_DELAY after it changed: those
        that moved up the queue, and those queued or given another reason by a decision, unless
        their wait ended meanwhile (a request queued behind a lease about to end is granted in a
        few milliseconds: telling it costs its kernel and the broker a message each for nothing).
        """
        self._positions_handle = None
        due, self._waits_due = self._waits_due, {}
        for wait in self.core.positions():
            due[wait.kernel_id, wait.request_id] = wait
        for wait in due.values():
            kernel = self.core.kernels.get(wait.kernel_id)
            request = kernel.request if kernel is not None else None
            if request is not None and request.request_id == wait.request_id:
                self._tell_wait(wait)

    def _tell_wait(self, wait: Wait) -> None:
        body = {"request_id": wait.request_id, "position": wait.position, "reason": wait.reason}
        self._spawn(self._rpc.push(wait.kernel_id, "queued", body))
        self._event(QUEUE_SCHEMA, {"kernel_id": wait.kernel_id, **body})

    def _event(self, schema: str, data: dict) -> None:
        """Emit with the next batch (see EVENTS_DELAY), after the answers of the decision at hand
        went out: a granted cell does not wait for the validation of the events it caused."""
        self._events.append((schema, data))
        if len(self._events) == 1:
            _later(EVENTS_DELAY, self._emit_events)

    def _emit_events(self) -> None:
        events, self._events = self._events, []
        for schema, data in coalesce(events):
            try:
                self.emit(schema, data)
            except Exception:  # one listener's failure must cost the others nothing
                self.log.exception("jupyter-singularity: could not emit the %s event", schema)

    def _flush_ledger(self) -> None:
        self._flush_handle = None
        try:
            self.ledger.flush()
        except LedgerError as err:
            self.log.error("jupyter-singularity: %s; will retry", err)

    def _carry_out(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, StateChanged):
                self._record_state(action)
            elif isinstance(action, Grant):
                self._granted(action)
            elif isinstance(action, Deny):
                self._resolve(
                    action.kernel_id, action.request_id, {"granted": False, "reason": action.reason}
                )
                self._event(
                    LEASE_SCHEMA,
                    lease_event(
                        action.kernel_id, action.request_id, "denied", reason=action.reason
                    ),
                )
            elif isinstance(action, Wait):
                self._waits_due[action.kernel_id, action.request_id] = action
                if self._keepable:
                    self._want_all_back()
            elif isinstance(action, Offload):
                self._spawn(self._offload(action))
            elif isinstance(action, Spill):
                self._spawn(self._spill(action))
            elif isinstance(action, LeaseEnded):
                self._kept_lease_ended(action.kernel_id)
                self.ledger.lease_ended(
                    f"{action.kernel_id}:{action.request_id}", action.end, action.peak_bytes
                )
                self._event(
                    LEASE_SCHEMA,
                    lease_event(
                        action.kernel_id,
                        action.request_id,
                        "ended",
                        device=action.device,
                        seconds=action.seconds,
                    ),
                )
            elif isinstance(action, Forget):
                self._rpc.forget(action.kernel_id)
                self._remove_spill_files(action.kernel_id)

    def _remove_spill_files(self, kernel_id: str) -> None:
        """A kernel that ended (even by kill -9) leaves no spill files behind."""
        if self.spill_dirs is None:
            return
        try:
            self.spill_dirs.remove(kernel_id)
        except (OSError, KernelIdError) as err:
            self.log.error(
                "jupyter-singularity: cannot remove spill files of %s: %s", kernel_id, err
            )

    def _record_state(self, action: StateChanged) -> None:
        old = None if action.old is None else action.old.value
        new = None if action.new is None else action.new.value
        connection = self._connections.get(action.kernel_id)
        transfer = None
        if (
            connection is not None
            and connection.transfer
            and action.old in TRANSFER_STATES
            and action.old != action.new
        ):
            transfer, connection.transfer = connection.transfer, None
        self.meter.state_changed(action, transfer)
        self.ledger.state_changed(
            time=action.time,
            kernel_id=action.kernel_id,
            user=action.user,
            old=old,
            new=new or GONE,
            reason=action.reason,
            device_index=action.device,
            nbytes=transfer.get("nbytes") if transfer else None,
            duration=float(transfer["seconds"]) if transfer and "seconds" in transfer else None,
        )
        self._event(
            KERNEL_STATE_SCHEMA,
            {
                "kernel_id": action.kernel_id,
                "user": action.user,
                "old": old,
                "new": new,
                "device": action.device,
                "reason": action.reason,
            },
        )

    def _granted(self, grant: Grant) -> None:
        kernel = self.core.kernels[grant.kernel_id]
        device = self.core.devices[grant.device]
        self.meter.granted(grant, kernel.user, kernel.groups)
        if grant.hold:
            self.ledger.lease_started(
                lease_id=f"{grant.kernel_id}:{grant.request_id}",
                kernel_id=grant.kernel_id,
                user=kernel.user,
                device_index=grant.device,
                device_uuid=device.uuid,
                reservation_bytes=grant.reservation,
                start=grant.start,
            )
        lent = self._room_lent(grant)
        if lent is not None:
            self._spawn(self._grant_when_returned(lent, grant))
        else:
            self._answer_grant(grant)
        self._event(
            LEASE_SCHEMA,
            lease_event(
                grant.kernel_id,
                grant.request_id,
                "granted",
                device=grant.device,
                reservation=grant.reservation,
            ),
        )

    def _answer_grant(self, grant: Grant) -> None:
        connection = self._connections.get(grant.kernel_id)
        frozen = connection is not None and connection.checkpointed_uuid is not None
        if grant.restore or not grant.hold or frozen:
            # (a process the driver holds must be restored even when no tensor was moved)
            self._spawn(self._restore(grant))
        else:
            self._answer(grant)

    def _answer(self, grant: Grant) -> None:
        """Tell the waiting cell it may run (and whether it restores its tensors first)."""
        self._resolve(
            grant.kernel_id,
            grant.request_id,
            {
                "granted": True,
                "device": self.core.devices[grant.device].to_dict(),
                "reservation": grant.reservation,
                "restore": grant.restore,
                "pool_allowance": grant.pool_allowance,
                "keep_seconds": self._keep_seconds(grant),
            },
        )

    def _resolve(self, kernel_id: str, request_id: str, reply: dict) -> None:
        connection = self._connections.get(kernel_id)
        waiter = None if connection is None else connection.waiters.get(request_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    def _spawn(self, coro: Any) -> asyncio.Future:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("jupyter-singularity: broker task failed", exc_info=task.exception())

    # ----------------------------------------------------------------------------- the clock

    async def _tick_loop(self) -> None:
        last_ping = last_sweep = time.monotonic()
        while True:
            await asyncio.sleep(self.tick_interval)
            try:
                self._reap_dead_processes()
                self._apply(self.core.tick(self.clock()))
                if time.monotonic() - last_ping >= self.ping_interval:
                    last_ping = time.monotonic()
                    self._ping_all()
                self._check_stalled_leases()
                if time.monotonic() - last_sweep >= SWEEP_INTERVAL:
                    last_sweep = time.monotonic()
                    await self._sweep_spill_dirs(min_age=SWEEP_INTERVAL)
            except Exception:
                self.log.exception("jupyter-singularity: broker tick failed")

    def _reap_dead_processes(self) -> None:
        for kernel_id, connection in list(self._connections.items()):
            pid = connection.pid or connection.launched_pid
            if pid is not None and not alive(pid):
                self.unregister_kernel(kernel_id, connection.stopping or f"process {pid} died")


def _later(delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle | None:
    """Call ``callback`` after ``delay`` seconds, off the path of the event that asked; at once
    where no event loop runs (then there is no handle)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        callback()
        return None
    return loop.call_later(delay, callback)
