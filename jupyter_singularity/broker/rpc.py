"""The broker's end of the kernel channel: one ROUTER socket serving every kernel.

Kernels connect with DEALER sockets, over a Unix socket in a directory only the server's user can
enter (TCP on 127.0.0.1 only where ZeroMQ has no ipc transport, as on Windows). Every frame that
arrives is untrusted until it verifies and passes the replay guard; anything else is dropped,
counted and summed up in the log once per interval, so that no peer can take the server down,
fill its log or block other kernels.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import shutil
import stat
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import zmq

from ..protocol import (
    DROP_LOG_INTERVAL,
    MAX_KERNEL_FRAME_BYTES,
    ORIGIN_BROKER,
    ORIGIN_KERNEL,
    RENEW_SESSION,
    DropLog,
    Message,
    ProtocolError,
    ReplayGuard,
    Sequencer,
    SessionError,
    Signer,
    UnknownKernel,
    decode,
    encode,
    error_text,
)
from .identity import PeerCredentials, peer_credentials

Handler = Callable[[Message], dict | Awaitable[dict | None] | None]
"""Answers a kernel's message: at once (a dict, or None for a notification), or with an
awaitable when the answer must wait."""

#: A peer sending a bigger frame is cut off by ZeroMQ before the frame is buffered.
MAX_MESSAGE_BYTES = MAX_KERNEL_FRAME_BYTES
#: Messages buffered per connected peer before ZeroMQ stops reading from it (back-pressure, no
#: loss): kernels send a few messages per cell; a flooding peer holds at most this many.
RECEIVE_QUEUE = 100
#: Messages taken in per turn of the event loop at most: a flood must not starve the server's
#: other work (REST requests), nor cost a turn of the loop per message when there is none.
RECEIVE_BATCH = 16
#: A node broker keeps messages from kernels it has no key for yet this long at most, and handles
#: them once their server registers them: after a restart, kernels speak before their servers
#: joined the new run, and a message dropped then would cost the kernel its answer's timeout.
PARK_SECONDS = 5.0
#: ... and this many bytes of them at most (the oldest go first), so that no peer fills memory.
PARK_BYTES = 1 << 20
SOCKET_NAME = "broker.sock"
#: Longest socket path: sun_path holds 108 bytes on Linux, 104 on macOS, the final NUL included.
MAX_SOCKET_PATH = 103
_DIR_PREFIX = "singularity-"
_DIR_SUFFIX_CHARS = 8  # what tempfile.mkdtemp adds to the prefix


def _peer_of(frame: zmq.Frame) -> PeerCredentials | None:
    """The sending process as the OS reports it (ipc transport only), asked for every message."""
    try:
        return _credentials(frame.get("Peer-Address"))
    except zmq.ZMQError:
        return None


#: The same address the OS reports gives the same (frozen) credentials: parsed once.
_credentials = functools.lru_cache(maxsize=1024)(peer_credentials)


def ipc_supported() -> bool:
    """Whether kernels can reach the broker over a Unix socket (not on Windows)."""
    return os.name == "posix" and zmq.has("ipc")


def private_socket_dir(parent: Path | None) -> Path:
    """A fresh directory that only this user can enter, for the channel's socket.

    Made under ``parent`` (the Jupyter runtime directory) when the socket's path fits in
    MAX_SOCKET_PATH there, else under the system's temporary directory. ``mkdtemp`` creates it
    atomically with mode 0700; it is checked all the same, since some file systems ignore modes.
    """
    for base in (parent, Path(tempfile.gettempdir())):
        if base is None:
            continue
        length = len(os.fsencode(base)) + len(_DIR_PREFIX) + _DIR_SUFFIX_CHARS + 2
        if length + len(SOCKET_NAME) > MAX_SOCKET_PATH:
            continue
        try:
            base.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = Path(tempfile.mkdtemp(prefix=_DIR_PREFIX, dir=base))
        except OSError:
            continue
        info = os.lstat(path)
        if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700:
            return path
        shutil.rmtree(path, ignore_errors=True)
    raise OSError(f"no private directory for the kernel channel's socket under {parent}")


class RPCServer:
    """Signed request/reply and broker-initiated pushes over a ZeroMQ ROUTER socket."""

    def __init__(
        self,
        key_for: Callable[[str], bytes | None],
        handler: Handler,
        log: logging.Logger,
        drop_log_interval: float = DROP_LOG_INTERVAL,
    ) -> None:
        self._key_for = key_for
        self._handler = handler
        self._log = log
        self._guard = ReplayGuard(ORIGIN_KERNEL)
        self._drops = DropLog(log, "on the kernel channel", drop_log_interval)
        self._drop_flush: asyncio.TimerHandle | None = None
        self._socket: zmq.Socket | None = None
        self.socket_dir: Path | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._receiving: asyncio.Handle | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        # kernel id -> ROUTER identity frame of its latest valid message
        self._routes: dict[str, bytes] = {}
        # broker->kernel sequences, one per kernel, so each kernel's own guard works
        self._sequencers: dict[str, Sequencer] = {}
        # msg_id of a request() -> (kernel id it was sent to, future for the reply body)
        self._pending: dict[str, tuple[str, asyncio.Future[dict]]] = {}
        self._parked: ParkedMessages | None = None
        self._park_expiry: asyncio.TimerHandle | None = None

    async def start(self, runtime_dir: Path | None = None) -> str:
        """Bind and start serving; returns the concrete endpoint for the kernels.

        The socket goes into a fresh private directory (see :func:`private_socket_dir`) under
        ``runtime_dir``; where there is no ipc transport, onto a free TCP port of 127.0.0.1.
        """
        if self._socket is not None:
            raise RuntimeError("RPCServer already started")
        if ipc_supported():
            self.socket_dir = private_socket_dir(runtime_dir)
            address = f"ipc://{self.socket_dir / SOCKET_NAME}"
        else:
            address = "tcp://127.0.0.1:*"
        try:
            return self._bind(address)
        except zmq.ZMQError:
            self._remove_socket_dir()
            raise

    async def start_shared(self, path: Path) -> str:
        """Bind on ``path``, a socket every user's kernels reach (a node broker's): who sends is
        then told by the OS with each message (``Message.peer``), and checked by the service."""
        if self._socket is not None:
            raise RuntimeError("RPCServer already started")
        path.unlink(missing_ok=True)  # left by a broker that was killed
        self._parked = ParkedMessages()
        return self._bind(f"ipc://{path}")

    def _bind(self, address: str) -> str:
        """A plain (not asyncio) socket, read when the event loop sees its descriptor: ZeroMQ's
        asyncio sockets cost a future and a reader registration per message."""
        socket = zmq.Context.instance().socket(zmq.ROUTER)
        socket.linger = 0
        # Sending to a vanished peer raises (handled in _send) instead of vanishing silently.
        socket.router_mandatory = True
        socket.maxmsgsize = MAX_MESSAGE_BYTES
        socket.rcvhwm = RECEIVE_QUEUE
        try:
            socket.bind(address)
        except zmq.ZMQError:
            socket.close()
            raise
        self._socket = socket
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(socket.FD, self._receive_waiting)
        self._receive_soon()  # (what arrived before the reader was added signalled nobody)
        return socket.last_endpoint.decode()

    async def push(self, kernel_id: str, type: str, body: dict) -> None:
        """Broker-initiated message that expects no answer."""
        if kernel_id not in self._routes:
            self._log.debug("push %r to %s dropped: kernel never connected", type, kernel_id)
            return
        self._send(kernel_id, self._routes[kernel_id], type, body)

    async def request(self, kernel_id: str, type: str, body: dict, timeout: float) -> dict:
        """Push and wait for the kernel's reply body.

        Raises TimeoutError when no reply arrives in time, ConnectionError when the
        kernel is not connected or is forgotten while we wait.
        """
        identity = self._routes.get(kernel_id)
        if identity is None:
            raise ConnectionError(f"kernel {kernel_id} is not connected")
        msg_id = self._send(kernel_id, identity, type, body)
        if msg_id is None:
            raise ConnectionError(f"kernel {kernel_id} is unreachable")
        future: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = (kernel_id, future)
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:  # an alias of TimeoutError only from Python 3.11
            raise TimeoutError(f"no {type!r} reply from kernel {kernel_id} in {timeout}s") from None
        finally:
            self._pending.pop(msg_id, None)

    def known(self, kernel_id: str) -> None:
        """``kernel_id`` was registered: what it sent before is handled now, in order (a node
        broker's; see PARK_SECONDS)."""
        if self._parked is not None and self._loop is not None:
            for parked in self._parked.take(kernel_id):
                self._loop.call_soon(self._receive, parked.identity, parked.frames, parked.peer)

    def forget(self, kernel_id: str) -> None:
        """The kernel is gone: drop its route and replay state, fail its requests."""
        self._routes.pop(kernel_id, None)
        self._sequencers.pop(kernel_id, None)
        self._guard.forget(kernel_id)
        for msg_id, (target, future) in list(self._pending.items()):
            if target == kernel_id:
                del self._pending[msg_id]
                if not future.done():
                    future.set_exception(ConnectionError(f"kernel {kernel_id} is gone"))

    async def stop(self) -> None:
        """Cancel running handlers and fail waiting requests before the socket goes."""
        tasks = [*self._handlers]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("RPC server stopped"))
        self._pending.clear()
        self._routes.clear()
        if self._socket is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._socket.FD)
            self._socket.close()
            self._socket = None
        if self._receiving is not None:
            self._receiving.cancel()
            self._receiving = None
        self._remove_socket_dir()
        if self._park_expiry is not None:
            self._park_expiry.cancel()
            self._park_expiry = None
        if self._parked is not None:
            self._parked.clear()
        if self._drop_flush is not None:
            self._drop_flush.cancel()
            self._drop_flush = None
        self._drops.flush()

    def _remove_socket_dir(self) -> None:
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None

    def _receive_waiting(self) -> None:
        """Take in what waits on the socket, RECEIVE_BATCH messages per turn of the event loop.

        ZeroMQ signals the descriptor once when messages arrive after none waited, and any use
        of the socket (a send too) may take that signal in: so the socket itself is asked whether
        messages wait, after every batch and after every send (see :meth:`_send`)."""
        self._receiving = None
        socket = self._socket
        for _ in range(RECEIVE_BATCH):
            if socket is None or not socket.get(zmq.EVENTS) & zmq.POLLIN:
                return
            try:
                identity, *frames = socket.recv_multipart(zmq.DONTWAIT, copy=False)
            except zmq.Again:
                return
            self._receive(identity.bytes, [frame.bytes for frame in frames], _peer_of(identity))
            socket = self._socket  # (a handler may have stopped the server)
        self._receive_soon()

    def _receive_soon(self) -> None:
        if self._receiving is None and self._loop is not None:
            self._receiving = self._loop.call_soon(self._receive_waiting)

    def _receive(
        self, identity: bytes, frames: list[bytes], peer: PeerCredentials | None = None
    ) -> None:
        msg = None
        try:
            msg = decode(frames, self._key_for)
            self._guard.check(msg)
            msg.peer = peer
        except UnknownKernel as exc:
            if self._parked is None:
                self._dropped(exc)
            else:
                self._park(_Parked(exc, identity, frames, peer, time.monotonic()))
            return
        except ProtocolError as exc:
            self._dropped(exc)
            if isinstance(exc, SessionError) and msg is not None:
                # Authentic but refused for its session: the sender renews it and resends.
                renew = {"error": exc.reason}
                self._send(msg.kernel_id, identity, RENEW_SESSION, renew, reply_to=msg.msg_id)
            return
        self._routes[msg.kernel_id] = identity
        if msg.reply_to is not None:
            self._resolve(msg)
            return
        try:
            result = self._handler(msg)
        except Exception as exc:
            self._log.exception("handler for %r from %s failed", msg.type, msg.kernel_id)
            result = {"error": error_text(exc)}
        if inspect.isawaitable(result):
            # It waits (a lease, say) as its own task, so other kernels are served meanwhile.
            task = asyncio.create_task(self._serve(identity, msg, result))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        else:
            self._reply(identity, msg, result)

    def _park(self, parked: _Parked) -> None:
        assert self._parked is not None and self._loop is not None
        for pushed_out in self._parked.add(parked):
            self._dropped(pushed_out.error)
        if self._park_expiry is None:
            self._park_expiry = self._loop.call_later(PARK_SECONDS, self._expire_parked)

    def _expire_parked(self) -> None:
        assert self._parked is not None and self._loop is not None
        self._park_expiry = None
        for expired in self._parked.expire(time.monotonic() - PARK_SECONDS):
            self._dropped(expired.error)
        if (oldest := self._parked.oldest()) is not None:
            wait = oldest + PARK_SECONDS - time.monotonic()
            self._park_expiry = self._loop.call_later(max(wait, 0.0), self._expire_parked)

    def _dropped(self, error: ProtocolError) -> None:
        """Count a dropped message; its log line comes once per interval at most."""
        wait = self._drops.note(error)
        if wait is None:  # logged now, with what was counted before: no line is due any more
            if self._drop_flush is not None:
                self._drop_flush.cancel()
                self._drop_flush = None
        elif self._drop_flush is None:
            self._drop_flush = asyncio.get_running_loop().call_later(wait, self._flush_drops)

    def _flush_drops(self) -> None:
        self._drop_flush = None
        self._drops.flush()

    def _resolve(self, msg: Message) -> None:
        """Hand a reply to its request(); replies never run the handler (no reply loops)."""
        pending = self._pending.get(msg.reply_to or "")
        if pending is None or pending[0] != msg.kernel_id:
            self._log.debug("unsolicited or late %r from %s ignored", msg.type, msg.kernel_id)
            return
        future = pending[1]
        if not future.done():
            future.set_result(msg.body)

    async def _serve(self, identity: bytes, msg: Message, pending: Awaitable[dict | None]) -> None:
        try:
            body = await pending
        except Exception as exc:
            self._log.exception("handler for %r from %s failed", msg.type, msg.kernel_id)
            body = {"error": error_text(exc)}
        self._reply(identity, msg, body)

    def _reply(self, identity: bytes, msg: Message, body: dict | None) -> None:
        reply_type = f"{msg.type}_reply"
        if body is None:
            return  # a notification (release, cancel...): the kernel waits for no answer
        try:
            self._send(msg.kernel_id, identity, reply_type, body, reply_to=msg.msg_id)
        except (TypeError, ValueError) as exc:  # the handler returned something not JSON
            self._log.error("unencodable %r for %s: %s", reply_type, msg.kernel_id, exc)
            error = {"error": f"unencodable reply: {exc}"}
            self._send(msg.kernel_id, identity, reply_type, error, reply_to=msg.msg_id)

    def _send(
        self,
        kernel_id: str,
        identity: bytes,
        type: str,
        body: dict,
        reply_to: str | None = None,
    ) -> str | None:
        """Sign and send without waiting; returns the msg_id, or None if it was dropped.

        Never blocks and never raises for a peer problem (a vanished kernel, a full
        queue): that must not stall the broker for everyone else. A body that is not
        JSON raises TypeError or ValueError, which is the caller's bug.
        """
        assert self._socket is not None
        key = self._key_for(kernel_id)
        if key is None:
            self._log.debug("%r to %s dropped: kernel no longer known", type, kernel_id)
            return None
        sequencer = self._sequencers.get(kernel_id)
        if sequencer is None:
            sequencer = self._sequencers[kernel_id] = Sequencer(kernel_id, ORIGIN_BROKER)
        msg = sequencer.make(type, body, reply_to=reply_to)
        frames = encode(msg, Signer(key))
        try:
            self._socket.send_multipart([identity, *frames], flags=zmq.DONTWAIT)
        except zmq.ZMQError as error:  # the kernel is gone, or its queue is full
            self._log.warning("%r to %s dropped: %s", type, kernel_id, error)
            return None
        finally:
            if self._socket.get(zmq.EVENTS) & zmq.POLLIN:
                self._receive_soon()  # the send took in the signal of a message that arrived
        return msg.msg_id


@dataclass
class _Parked:
    error: UnknownKernel
    identity: bytes
    frames: list[bytes]
    peer: PeerCredentials | None
    at: float

    @property
    def size(self) -> int:
        return len(self.identity) + sum(map(len, self.frames))


class ParkedMessages:
    """Messages of kernels not registered yet, oldest first, PARK_BYTES at most."""

    def __init__(self, limit: int = PARK_BYTES) -> None:
        self.limit = limit
        self._queue: deque[_Parked] = deque()
        self._bytes = 0

    def add(self, parked: _Parked) -> list[_Parked]:
        """Keep ``parked``; the oldest ones pushed out to make room."""
        self._queue.append(parked)
        self._bytes += parked.size
        pushed_out = []
        while self._bytes > self.limit:
            pushed_out.append(self._pop())
        return pushed_out

    def take(self, kernel_id: str) -> list[_Parked]:
        """The messages of ``kernel_id``, no longer kept."""
        taken = [p for p in self._queue if p.error.kernel_id == kernel_id]
        if taken:
            self._queue = deque(p for p in self._queue if p.error.kernel_id != kernel_id)
            self._bytes -= sum(p.size for p in taken)
        return taken

    def expire(self, horizon: float) -> list[_Parked]:
        """The messages kept since before ``horizon``, no longer kept."""
        expired = []
        while self._queue and self._queue[0].at <= horizon:
            expired.append(self._pop())
        return expired

    def oldest(self) -> float | None:
        return self._queue[0].at if self._queue else None

    def clear(self) -> None:
        self._queue.clear()
        self._bytes = 0

    def _pop(self) -> _Parked:
        parked = self._queue.popleft()
        self._bytes -= parked.size
        return parked
