"""The kernel's end of the broker channel: a blocking API over one background I/O thread.

User cells run on the kernel's main thread, which may block for a long time (waiting
for a GPU lease, or just computing). The broker must still get answers to its pings
meanwhile, so a daemon thread receives from the DEALER socket. ZeroMQ sockets are not
thread-safe: every use of the socket holds one lock, and the I/O thread waits on the socket's
file descriptor (not on the socket itself) without it. A thread sending a message sends it
itself, under that lock: a hand-over to the I/O thread would cost a thread wake-up (and a turn
of the GIL) on every lease's path. For the same reason a thread that waits for a reply (a cell
for its lease) takes in the broker's messages itself while it waits, and the I/O thread stands
aside meanwhile (see :meth:`BrokerClient.wait`): the hand-over of each reply from the I/O thread
cost a quarter of a lease's round trip. A cell's acquire goes out before the cell is ready to wait
(see .early_acquire): the I/O thread then leaves the messages on the socket from the send on, for
a short window (see :meth:`BrokerClient.submit`).

The client keeps its session with the broker alive by itself: when the broker refuses a message
for its session (another process holding the key pushed the counter ahead, or took the session
over), it starts a fresh session and sends the message again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import os
import queue
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from ..protocol import (
    ENV_BROKER_URL,
    ENV_KERNEL_ID,
    ENV_KERNEL_KEY,
    MAX_BROKER_FRAME_BYTES,
    MAX_KERNEL_FRAME_BYTES,
    ORIGIN_BROKER,
    ORIGIN_KERNEL,
    RENEW_SESSION,
    DropLog,
    Message,
    ProtocolError,
    ReplayGuard,
    Sequencer,
    Signer,
    decode,
    encode,
    error_text,
)

log = logging.getLogger(__name__)

PushCallback = Callable[[dict], dict | None]

#: How long messages still queued at close() may take to reach the broker.
CLOSE_LINGER_MS = 500
#: Messages sent lately, kept to be sent again should the broker refuse their session.
SENT_MEMORY = 256
#: How often one message is sent again in a fresh session before the client gives up on it.
MAX_RESENDS = 3
#: While a caller waits on the broker, it is pinged this often; so many pings in a row without an
#: answer mean it is gone.
HEARTBEAT_INTERVAL = 2.0
HEARTBEAT_MISSES = 3
#: When a waiting caller took the messages in, the I/O thread looks this long after (ms) whether it
#: is its turn again, then sleeps until woken: a caller whose wait ended within that time does not
#: wake it (that would cost the caller a turn of the GIL right when its reply came), a longer wait
#: does.
STAND_ASIDE_POLL_MS = 5
#: A caller that will wait for its reply soon (a cell's acquire, sent as its execute_request is
#: dispatched) has the I/O thread leave the messages on the socket for this long at most (s), so
#: that the reply is not handed over between threads (see :meth:`BrokerClient.submit`).
COLLECT_WINDOW = 0.02


class BrokerError(Exception):
    """The broker answered a request with an error, or the client is closed."""


class BrokerUnreachable(BrokerError):
    """A message could not even be queued for the broker."""


class BrokerRestarted(BrokerError):
    """The broker refused a message of a kernel that did not say hello to it: it is a new run of
    the broker (a node broker restarted), which must hear the kernel's hello first."""


@dataclass
class _Outgoing:
    type: str
    body: dict
    reply_to: str | None = None
    msg_id: str | None = None
    session: str = ""
    """The session it was last sent in."""
    attempts: int = 0
    """How often it was sent again in a fresh session."""


class BrokerClient:
    """Synchronous, thread-safe client for the broker's RPC channel."""

    def __init__(self, endpoint: str, kernel_id: str, key: bytes) -> None:
        self.endpoint = endpoint
        self.kernel_id = kernel_id
        self._key = key
        self._signer = Signer(key)
        # Held for every use of the socket, and while a message is numbered and sent: the
        # broker's replay guard rejects any message that overtakes a later-numbered one.
        self._socket_lock = threading.Lock()
        self._socket: zmq.Socket | None = None
        self._sequencer = Sequencer(kernel_id, ORIGIN_KERNEL)
        self._sent: OrderedDict[str, _Outgoing] = OrderedDict()  # under _socket_lock
        self._guard = ReplayGuard(ORIGIN_BROKER)  # I/O thread only
        self._drops = DropLog(log, "from the broker")
        self._jobs: queue.SimpleQueue[tuple[PushCallback, Message] | None] = queue.SimpleQueue()
        self._callbacks: dict[str, PushCallback] = {}
        self._lock = threading.Lock()  # guards _pending and _closing
        self._pending: dict[str, concurrent.futures.Future[dict]] = {}
        self._closing = False
        self._wake_rx, self._wake_tx = socket.socketpair()
        self._caller_rx, self._caller_tx = socket.socketpair()
        for end in (self._wake_rx, self._wake_tx, self._caller_rx, self._caller_tx):
            end.setblocking(False)
        # Held by the one thread that takes messages in and handles them (the replay guard wants
        # them in order): the I/O thread, or a caller waiting for its reply (see wait()).
        self._receiving = threading.Lock()
        self._park_lock = threading.Lock()  # guards the three flags below
        self._parked = False  # a waiting caller takes the messages in
        self._io_on_socket = False  # the I/O thread waits on the socket
        self._io_asleep = False  # the I/O thread stands aside until woken
        self._collect_until = 0.0  # (monotonic) a caller will take the messages in before then
        self._threads: list[threading.Thread] = []
        self.on_rejoin: Callable[[], None] | None = None
        """Called (on the I/O thread) when the broker refuses a message with ``rejoin``, before
        whoever waits for the reply hears of it."""

    @classmethod
    def from_env(cls) -> BrokerClient | None:
        """The client this kernel was launched for, or None outside a pooled kernel."""
        endpoint = os.environ.get(ENV_BROKER_URL)
        kernel_id = os.environ.get(ENV_KERNEL_ID)
        key = os.environ.get(ENV_KERNEL_KEY)
        if not (endpoint and kernel_id and key):
            return None
        return cls(endpoint, kernel_id, key.encode())

    def start(self) -> None:
        """Connect and start the I/O and push-worker threads (daemons: never block exit)."""
        if self._threads:
            raise RuntimeError("BrokerClient already started")
        # Used by one thread at a time, under _socket_lock: the lock is the memory barrier
        # ZeroMQ asks for when a socket changes threads.
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.maxmsgsize = MAX_BROKER_FRAME_BYTES
        sock.connect(self.endpoint)
        self._socket = sock
        self._threads = [
            threading.Thread(target=self._io_loop, args=(sock.FD,), name="singularity-io"),
            threading.Thread(target=self._work_loop, name="singularity-push"),
        ]
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def submit(
        self, type: str, body: dict, *, collect: bool = False
    ) -> concurrent.futures.Future[dict]:
        """Send a request without waiting for its reply; the future resolves to the reply.

        A reply carrying an "error" resolves it with BrokerError instead. The caller that gives
        up waiting calls :meth:`abandon` so the pending entry does not linger. The request is
        on its way when this returns. ``collect``: the caller will :meth:`wait` for the reply
        within :data:`COLLECT_WINDOW`; until then the I/O thread leaves the broker's messages on
        the socket (woken by the reply, it would take the interpreter from a caller busy with
        other work, then hand the reply over between threads).
        """
        msg_id = self._sequencer.new_id()
        answer: concurrent.futures.Future[dict] = concurrent.futures.Future()
        answer.msg_id = msg_id  # type: ignore[attr-defined]
        with self._lock:
            self._check_usable()
            self._pending[msg_id] = answer
        if collect:
            with self._park_lock:
                self._collect_until = time.monotonic() + COLLECT_WINDOW
        self._transmit(_Outgoing(type, body, msg_id=msg_id))
        return answer

    def abandon(self, answer: concurrent.futures.Future[dict]) -> None:
        """Stop waiting for the reply of a :meth:`submit` (a late reply is then ignored)."""
        with self._lock:
            self._pending.pop(getattr(answer, "msg_id", ""), None)

    def request(self, type: str, body: dict, timeout: float | None = None) -> dict:
        """Send and block until the broker replies; safe from any thread but the I/O one.

        Raises TimeoutError, or BrokerError when the reply carries an "error".
        """
        answer = self.submit(type, body)
        try:
            self.wait(answer, timeout)
            return answer.result(0)
        except concurrent.futures.TimeoutError:  # an alias of TimeoutError from 3.11 only
            raise TimeoutError(f"no {type!r} reply from the broker in {timeout}s") from None
        finally:
            self.abandon(answer)

    def wait(self, answer: concurrent.futures.Future, timeout: float | None) -> bool:
        """Wait until ``answer`` (of :meth:`submit`) is done or ``timeout`` passed; whether it is.

        The waiting thread takes in and handles the broker's messages itself (pings and pushes
        included) while the I/O thread stands aside, so its reply reaches it without a hand-over
        between threads. Another thread doing so already, it waits for the reply plainly.
        """
        if answer.done():
            return True
        if not self._receiving.acquire(blocking=False):
            return concurrent.futures.wait([answer], timeout).not_done == set()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            with self._park_lock:
                self._parked = True
                # (it may take in what came first: it then wakes us); within a collect window it
                # takes nothing in, and stands aside once a message wakes it
                if self._io_on_socket and self._collect_until <= time.monotonic():
                    self._wake()
            poller = zmq.Poller()
            poller.register(self._caller_rx, zmq.POLLIN)
            with self._socket_lock:
                if self._socket is not None:
                    poller.register(self._socket.FD, zmq.POLLIN)
            while True:
                for frames in self._receive_all():
                    self._dispatch(frames)
                left = None if deadline is None else deadline - time.monotonic()
                if answer.done() or self._closing or (left is not None and left <= 0):
                    return answer.done()
                try:
                    poller.poll(None if left is None else max(1, int(left * 1000)))
                except zmq.ZMQError:  # the socket closed meanwhile (close())
                    return answer.done()
                _drain(self._caller_rx)
        finally:
            with self._park_lock:
                self._parked = False
                self._collect_until = 0.0
                if self._io_asleep:
                    self._wake()
            self._receiving.release()

    def send(self, type: str, body: dict) -> None:
        """Fire-and-forget message to the broker."""
        with self._lock:
            self._check_usable()
        self._transmit(_Outgoing(type, body))

    def on(self, type: str, callback: PushCallback) -> None:
        """Answer broker pushes of `type` with `callback(body)`, run on the push worker.

        The worker is a single thread, so callbacks run one at a time in arrival order;
        a slow one delays other pushes but never the pings, answered on the I/O thread.
        """
        if type == "ping":
            raise ValueError("pings are answered by the client itself")
        self._callbacks[type] = callback

    def close(self) -> None:
        """Stop the threads; requests still waiting fail with BrokerError."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            pending = list(self._pending.values())
            self._pending.clear()
        for future in pending:
            future.set_exception(BrokerError("broker client closed"))
        self._jobs.put(None)
        self._wake()
        with contextlib.suppress(OSError):  # a caller that waits: its answer failed
            self._caller_tx.send(b"\0")
        # Only the I/O thread is joined: a push callback may be stuck in user code, and
        # the worker is a daemon that stops at the sentinel or with the process.
        if self._threads and self._threads[0] is not threading.current_thread():
            self._threads[0].join()
        for end in (self._wake_rx, self._wake_tx, self._caller_rx, self._caller_tx):
            end.close()
        self._drops.flush()

    def _check_usable(self) -> None:
        if self._closing:
            raise BrokerError("broker client closed")
        if not self._threads:
            raise RuntimeError("BrokerClient.start() was not called")

    def _wake(self) -> None:
        # OSError: the buffer is full of wake-ups already, or closed with nobody to wake.
        with contextlib.suppress(OSError):
            self._wake_tx.send(b"\0")

    def _wake_receiver(self) -> None:
        """Wake whoever takes messages in: a waiting caller, else the I/O thread (within a collect
        window it then waits for the window's end: the signal of what arrived was taken)."""
        with contextlib.suppress(OSError):
            (self._caller_tx if self._parked else self._wake_tx).send(b"\0")

    def _key_for(self, kernel_id: str) -> bytes | None:
        return self._key if kernel_id == self.kernel_id else None

    # -- sending (any thread) ----------------------------------------------------------

    def _transmit(self, item: _Outgoing) -> None:
        """Number, sign and send one message on the calling thread; a failure goes to whoever
        waits for it, or the log."""
        with self._socket_lock:
            sock = self._socket
            if sock is None:
                error: Exception | None = BrokerError("broker client closed")
            else:
                error = self._send_on(sock, item)
                # Sending may have taken in the signal of a message that arrived meanwhile: the
                # socket's descriptor would then not wake the I/O thread for it.
                arrived = sock.get(zmq.EVENTS) & zmq.POLLIN
        if error is not None:
            self._fail(item, error)
        elif arrived:
            self._wake_receiver()

    def _send_on(self, sock: zmq.Socket, item: _Outgoing) -> Exception | None:
        """Encode and send (under _socket_lock); the error that stopped it, if any."""
        try:
            frames = self._encode(item)
        except (TypeError, ValueError) as exc:  # not JSON, or too large for the channel
            if item.reply_to is None:
                return exc
            log.error("unencodable %r: %s", item.type, exc)
            error = {"error": f"unencodable reply: {error_text(exc)}"}
            item = _Outgoing(item.type, error, reply_to=item.reply_to)
            frames = self._encode(item)
        try:
            sock.send_multipart(frames, zmq.DONTWAIT)
        except zmq.ZMQError as exc:  # Again: the broker is gone and the queue is full
            return BrokerUnreachable(f"cannot reach the broker: {exc}")
        self._sent[item.msg_id or ""] = item
        if len(self._sent) > SENT_MEMORY:
            self._sent.popitem(last=False)
        return None

    def _encode(self, item: _Outgoing) -> list[bytes]:
        msg = self._sequencer.make(item.type, item.body, item.reply_to, item.msg_id)
        frames = encode(msg, self._signer)
        if len(frames[0]) > MAX_KERNEL_FRAME_BYTES:  # the broker would cut the connection off
            raise ValueError(
                f"{item.type!r} has a frame of {len(frames[0])} bytes; the channel takes at most "
                f"{MAX_KERNEL_FRAME_BYTES}"
            )
        item.msg_id, item.session = msg.msg_id, msg.session
        return frames

    def _fail(self, item: _Outgoing, error: Exception) -> None:
        with self._lock:
            future = self._pending.pop(item.msg_id, None) if item.msg_id else None
        if future is None:
            log.warning("%r to the broker dropped: %s", item.type, error)
        else:
            future.set_exception(error)

    # -- I/O thread ---------------------------------------------------------------

    def _io_loop(self, descriptor: int) -> None:
        """Wait for the socket's descriptor (which ZeroMQ signals when messages arrive, among
        other things) or a wake-up, then take in what arrived; while a caller takes the messages
        in (see :meth:`wait`), wait for wake-ups only (see STAND_ASIDE_POLL_MS)."""
        on_socket = zmq.Poller()
        on_socket.register(descriptor, zmq.POLLIN)
        aside = zmq.Poller()
        for poller in (on_socket, aside):
            poller.register(self._wake_rx, zmq.POLLIN)
        woken = self._wake_rx.fileno()  # (the poller names a Python socket by its descriptor)
        looked = False  # looked once already whether the caller is done
        try:
            while not self._closing:
                with self._park_lock:
                    collecting = self._collect_until - time.monotonic()
                    active = self._io_on_socket = not (self._parked or collecting > 0)
                    self._io_asleep = self._parked and looked
                if active:
                    looked = False
                    ready = on_socket.poll()
                elif self._parked:
                    ready = aside.poll(None if self._io_asleep else STAND_ASIDE_POLL_MS)
                    looked = True
                else:  # until the window a caller will collect in ends (it then takes all in)
                    ready = aside.poll(max(1, math.ceil(collecting * 1000)))
                if any(fd == woken for fd, _ in ready):
                    _drain(self._wake_rx)
                if self._standing_aside() or not self._receiving.acquire(blocking=False):
                    continue
                try:
                    for frames in self._receive_all():
                        self._dispatch(frames)
                finally:
                    self._receiving.release()
                if self._parked:  # a caller began to wait meanwhile: what we took may be its
                    self._wake_receiver()
        finally:
            with self._socket_lock:
                if self._socket is not None:
                    self._socket.close(linger=CLOSE_LINGER_MS)
                    self._socket = None

    def _standing_aside(self) -> bool:
        return self._parked or self._collect_until > time.monotonic()

    def _receive_all(self) -> list[list[bytes]]:
        """Every message waiting on the socket. Taken under the lock, handled after it: handling
        a reply runs its future's callbacks, which may send."""
        received = []
        with self._socket_lock:
            sock = self._socket
            while sock is not None and sock.get(zmq.EVENTS) & zmq.POLLIN:
                try:
                    received.append(sock.recv_multipart(zmq.DONTWAIT))
                except zmq.Again:
                    break
        return received

    def _dispatch(self, frames: list[bytes]) -> None:
        try:
            msg = decode(frames, self._key_for)
            self._guard.check(msg)
        except ProtocolError as exc:
            self._drops.note(exc)
            return
        if msg.type == RENEW_SESSION:
            self._send_again(msg.reply_to or "", str(msg.body.get("error")))
        elif msg.reply_to is not None:
            # A reply never triggers a callback, so two peers cannot bounce replies forever.
            if msg.body.get("rejoin") is True and self.on_rejoin is not None:
                self.on_rejoin()
            with self._lock:
                future = self._pending.pop(msg.reply_to, None)
            if future is not None:
                if "error" in msg.body:
                    refused = BrokerRestarted if msg.body.get("rejoin") is True else BrokerError
                    future.set_exception(refused(str(msg.body["error"])))
                else:
                    future.set_result(msg.body)
                return
            with self._socket_lock:
                sent = self._sent.get(msg.reply_to)
            if "error" in msg.body and not msg.body.get("rejoin") and sent is not None:
                # (on_rejoin took care of a rejoin)
                log.warning("the broker refused %r: %s", sent.type, msg.body["error"])
            else:
                log.debug("late or unsolicited %r from the broker ignored", msg.type)
        elif msg.type == "ping":
            body = {"pid": os.getpid(), "time": time.time()}
            self._transmit(_Outgoing("ping_reply", body, reply_to=msg.msg_id))
        elif (callback := self._callbacks.get(msg.type)) is not None:
            self._jobs.put((callback, msg))
        else:
            error = {"error": f"unknown request {msg.type!r}"}
            self._transmit(_Outgoing(f"{msg.type}_reply", error, reply_to=msg.msg_id))

    def _send_again(self, msg_id: str, error: str) -> None:
        """The broker refused a message for its session: renew the session (unless that was done
        since the message went out) and send it again, a few times at most."""
        with self._socket_lock:
            item = self._sent.pop(msg_id, None)
            again = item is not None and item.attempts < MAX_RESENDS
            if again:
                if item.session == self._sequencer.session:
                    log.info("new session with the broker (%s)", error)
                    self._sequencer.renew()
                item.attempts += 1
        if item is None:
            log.debug("session renewal for an unknown message ignored")
        elif again:
            self._transmit(item)
        else:
            self._fail(item, BrokerError(f"the broker keeps refusing the session: {error}"))

    # -- push worker thread -------------------------------------------------------

    def _work_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            callback, msg = job
            try:
                body = callback(msg.body) or {}
            except Exception as exc:
                log.exception("callback for broker push %r failed", msg.type)
                body = {"error": error_text(exc)}
            self._transmit(_Outgoing(f"{msg.type}_reply", body, reply_to=msg.msg_id))


def _drain(wake: socket.socket) -> None:
    """Empty a wake-up socket (closed meanwhile: nothing to empty)."""
    with contextlib.suppress(OSError):  # BlockingIOError (empty) included
        while wake.recv(4096):
            pass


class Heartbeat:
    """Tells a caller that waits on the broker (a cell waiting for its lease) when the broker is
    gone: it pings every ``interval`` seconds and gives up after ``misses`` pings in a row went
    unanswered. Without it, a cell would wait forever for a broker that has disappeared."""

    def __init__(
        self,
        client: BrokerClient,
        interval: float = HEARTBEAT_INTERVAL,
        misses: int = HEARTBEAT_MISSES,
    ) -> None:
        self._client = client
        self.interval = interval
        self.misses = misses
        self.missed = 0
        self._ping: concurrent.futures.Future[dict] | None = None
        self._sent_at = time.monotonic()

    def lost(self) -> str | None:
        """Call it often while waiting; it returns why the broker counts as gone, once it does."""
        ping = self._ping
        if ping is not None and ping.done():
            # Any answer, an error included, shows the broker is there.
            self.missed = self.missed + 1 if isinstance(ping.exception(), BrokerUnreachable) else 0
            self._ping = None
        if time.monotonic() - self._sent_at < self.interval:
            return None
        if self._ping is not None:  # no answer for a whole interval
            self._client.abandon(self._ping)
            self._ping = None
            self.missed += 1
        if self.missed >= self.misses:
            return (
                f"the GPU pool's broker stopped answering ({self.missed} pings over "
                f"{self.missed * self.interval:.0f} s went unanswered)"
            )
        try:
            self._ping = self._client.submit("ping", {})
        except BrokerError:
            self.missed += 1
        self._sent_at = time.monotonic()
        return None
