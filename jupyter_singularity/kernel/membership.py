"""The kernel's place in the pool: its hello to the broker, and joining again after a restart.

A server's own (embedded) broker lives and dies with the server: a kernel whose hello is not
answered runs without the pool, and a cell waiting for its lease fails once the broker stops
answering pings (:class:`~.client.Heartbeat`).

A node broker (``SINGULARITY_NODE_BROKER=1``) is a system service that restarts, so its kernels
never give up on it. A keeper thread checks every few seconds that the broker answers and is still
the run the kernel joined: its hello and ping replies carry that run (``instance``). When it does
not answer, or another run answers, or a reply refuses the kernel as one that did not say hello to
it (``rejoin``), the kernel says hello again, with backoff, and the hello says where its GPU state
is (``holds``: see ``BrokerPushes.holdings``); its server registers it again with the same key, so
the new run soon knows it. Meanwhile a cell that needs the GPU waits, saying why
(:class:`LeaseWait`), and sends its request again once the kernel joined the new run; its state
never leaves the kernel's own memory and spill files.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from .client import BrokerClient, BrokerError, BrokerRestarted, BrokerUnreachable, Heartbeat
from .gate import InterruptTrap, LeaseCancelled, WaitLine

if TYPE_CHECKING:
    from .runtime import Waiting

log = logging.getLogger(__name__)

#: How often a kernel of a node broker checks that its broker answers and is the run it joined.
KEEPALIVE = 2.0
#: How long such a check, or a hello while the broker is away, waits for its answer.
ANSWER_TIMEOUT = 2.0
#: Backoff between hellos while the broker is away: from the first to the last, doubling.
RETRY_FIRST, RETRY_LAST = 0.1, 0.5
#: After an interrupt, how long to wait for the broker to confirm the request left the queue.
CANCEL_TIMEOUT = 10.0
#: What a kernel that never had a GPU holds.
NOTHING_HELD = {"device": None, "gpu_bytes": 0, "host_bytes": 0, "disk_bytes": 0, "running": False}


class Membership:
    """The kernel's membership in the pool (see the module docstring)."""

    def __init__(self, client: BrokerClient, node: bool) -> None:
        self.client = client
        self.node = node
        self.holdings: Callable[[], dict] = lambda: NOTHING_HELD
        """What the kernel holds, for its hellos (the runtime's ``holdings``)."""
        self.on_join: Callable[[dict], None] = lambda reply: None
        """Called with each hello reply of a run the kernel had not joined yet."""
        self.instance: str | None = None
        """The broker run the kernel joined last."""
        self.generation = 0
        """How many broker runs the kernel joined: a request sent in an earlier one is void."""
        self.joined = threading.Event()
        """Set while the broker answers as the run the kernel joined."""
        self.last_answer = time.monotonic()
        self.report_lock = threading.Lock()
        """Held while a hello's report is made and sent, and while a cell's release is: so the
        release of a cell the report calls running never reaches the broker before the report."""
        self._lock = threading.Lock()
        self._recheck = threading.Event()
        self._closing = threading.Event()
        self._keeper: threading.Thread | None = None
        client.on_rejoin = self.lost

    # ---------------------------------------------------------------------------- joining

    def hello(self, timeout: float) -> dict | None:
        """Say hello, with what the kernel holds; the reply, or None when none came in time (or
        the broker refused it: logged)."""
        try:
            with self.report_lock:
                answer = self.client.submit("hello", {"pid": os.getpid(), "holds": self.holdings()})
            reply = answer.result(timeout)
        except concurrent.futures.TimeoutError:
            self.client.abandon(answer)
            return None
        except BrokerError as err:  # (or the client is closed)
            log.warning("jupyter-singularity: the GPU pool refused this kernel's hello: %s", err)
            return None
        self._joined(reply)
        return reply

    def _joined(self, reply: dict) -> None:
        instance = reply.get("instance")
        with self._lock:
            new_run = self.generation == 0 or instance != self.instance
            if new_run:
                self.instance = instance if isinstance(instance, str) else None
                self.generation += 1
            self.last_answer = time.monotonic()
        if new_run:
            if self.generation > 1:
                log.warning(
                    "jupyter-singularity: joined the GPU pool's broker again after it restarted"
                )
            self.on_join(reply)
        self.joined.set()

    def start(self) -> None:
        """Keep the kernel joined to its node broker, in a daemon thread (nothing to do for a
        server's own broker, which does not restart without its kernels)."""
        if not self.node or self._keeper is not None:
            return
        self._keeper = threading.Thread(target=self._keep, name="singularity-member", daemon=True)
        self._keeper.start()

    def close(self) -> None:
        self._closing.set()
        self._recheck.set()

    def lost(self) -> None:
        """The broker does not know this kernel's state (it restarted), or did not answer: say
        hello again now."""
        if self.node:
            self.joined.clear()
            self._recheck.set()

    def away_for(self) -> float | None:
        """Seconds since the broker last answered, while the kernel is not joined to it."""
        if self.joined.is_set():
            return None
        return time.monotonic() - self.last_answer

    def wait_joined(self, what: str) -> None:
        """Wait, showing why, until the kernel is joined to its broker; an interrupt ends the wait
        with LeaseCancelled (``what`` did not happen)."""
        if self.joined.is_set():
            return
        line = WaitLine(top_of_cell=False, what=what)
        try:
            with InterruptTrap() as trap:
                while not self.joined.wait(0.05):
                    if trap.fired:
                        raise LeaseCancelled(f"{what} stopped waiting for the GPU pool's broker")
                    line.away(self.away_for())
                    line.tick(None)
        finally:
            line.close()

    def _keep(self) -> None:
        delay = RETRY_FIRST
        while not self._closing.is_set():
            if not self.joined.is_set():
                if self.hello(ANSWER_TIMEOUT) is None and not self._closing.is_set():
                    self._closing.wait(delay)
                    delay = min(delay * 2, RETRY_LAST)
                continue
            delay = RETRY_FIRST
            self._recheck.wait(KEEPALIVE)
            self._recheck.clear()
            if self._closing.is_set() or not self.joined.is_set():
                continue
            try:
                reply = self.client.request("ping", {}, timeout=ANSWER_TIMEOUT)
            except (BrokerError, TimeoutError):  # a refusal as unknown clears ``joined`` itself
                self.joined.clear()
                continue
            if reply.get("instance") != self.instance:
                self.joined.clear()  # another run answers: the broker restarted
            else:
                self.last_answer = time.monotonic()

    # ------------------------------------------------------------------------- waiting cells

    def lease_wait(self, waiting: Waiting, future: concurrent.futures.Future | None) -> LeaseWait:
        return LeaseWait(self, waiting, future)


class LeaseWait:
    """A cell's wait for the broker's answer to its acquire (``waiting.body``).

    With a server's own broker: the answer, or a denial once the broker stops answering pings. With
    a node broker: the answer of the run the kernel is joined to, however long the broker is away;
    a request the broker cannot answer any more (sent to a run that ended, or refused before the
    kernel joined a new one) is sent again once the kernel joined."""

    def __init__(
        self, membership: Membership, waiting: Waiting, future: concurrent.futures.Future | None
    ) -> None:
        self.membership = membership
        self.client = membership.client
        self.waiting = waiting
        self.future = future
        self._heartbeat = None if membership.node else Heartbeat(self.client)

    def answer(self, timeout: float) -> dict:
        """The broker's answer (a grant or a denial); concurrent.futures.TimeoutError while there
        is none yet."""
        future = self.future
        if future is not None and self.membership.node:
            void = self.waiting.generation != self.membership.generation
            if not void and future.done():
                error = future.exception()
                void = isinstance(error, BrokerRestarted | BrokerUnreachable)
                if void:
                    self.membership.lost()
            if void:
                self.client.abandon(future)
                self.future = future = None
                self.waiting.position, self.waiting.reason = 0, ""
        if future is None:
            if not self.membership.joined.wait(timeout):
                raise concurrent.futures.TimeoutError
            self.waiting.generation = self.membership.generation
            self.future = future = self.client.submit("acquire", self.waiting.body)
            timeout = 0
        if not self.client.wait(future, timeout):
            raise concurrent.futures.TimeoutError
        if self.membership.node and isinstance(future.exception(), BrokerRestarted):
            raise concurrent.futures.TimeoutError  # sent again at the next call
        return answer_of(future, 0)

    def away_for(self) -> float | None:
        """How long the broker has not answered, while the cell waits for it (node brokers)."""
        return self.membership.away_for() if self.membership.node else None

    def lost(self) -> str | None:
        """Why the cell stops waiting: a server's own broker that stopped answering (a request
        of a node broker waits for it instead). The request is cancelled, and a grant that
        still comes is given back."""
        if self._heartbeat is None or (lost := self._heartbeat.lost()) is None:
            return None
        self._leave()
        return lost

    def cancel(self) -> dict:
        """The cell was interrupted: leave the queue; the answer, or a denial saying so. A grant
        that crosses the cancel on the wire is taken (and released by the end of the cell)."""
        if self.future is None:
            return {"granted": False, "reason": "cancelled"}
        if self.membership.node and not self.membership.joined.is_set():
            self._leave()  # a broker that is away may answer much later, or never
            return {"granted": False, "reason": "cancelled"}
        with contextlib.suppress(BrokerError):
            self.client.send("cancel", {"request_id": self.waiting.request_id})
        try:
            return answer_of(self.future, CANCEL_TIMEOUT)
        except concurrent.futures.TimeoutError:
            return {"granted": False, "reason": "cancelled"}

    def _leave(self) -> None:
        assert self.future is not None
        with contextlib.suppress(BrokerError):
            self.client.send("cancel", {"request_id": self.waiting.request_id})
        self.future.add_done_callback(partial(give_back, self.client, self.waiting.request_id))


def answer_of(future: concurrent.futures.Future, timeout: float) -> dict:
    """The acquire reply; a broker error (or a closed channel) is a denial with its reason."""
    try:
        reply = future.result(timeout=timeout)
    except (BrokerError, TimeoutError) as err:
        if isinstance(err, concurrent.futures.TimeoutError) and not future.done():
            raise
        return {"granted": False, "reason": f"the GPU pool did not grant a lease: {err}"}
    return reply


def give_back(client: BrokerClient, request_id: str, future: concurrent.futures.Future) -> None:
    """A grant that came after its cell stopped waiting: released, so no lease is left behind."""
    with contextlib.suppress(Exception):  # no answer, or a denial: nothing to give back
        if future.result().get("granted"):
            client.send("release", {"request_id": request_id})
