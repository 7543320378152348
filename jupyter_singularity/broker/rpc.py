"""The broker's end of the kernel channel: one ROUTER socket serving every kernel.

Kernels connect with DEALER sockets. Every frame that arrives is untrusted until it
decodes, verifies and passes the replay guard; anything else is logged and dropped so
that no peer can take the server down or block other kernels.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable

import zmq
import zmq.asyncio

from ..protocol import (
    ORIGIN_BROKER,
    ORIGIN_KERNEL,
    Message,
    ProtocolError,
    ReplayGuard,
    Sequencer,
    Signer,
    decode,
    encode,
)

Handler = Callable[[Message], dict | Awaitable[dict | None] | None]
"""Answers a kernel's message: at once (a dict, or None for a notification), or with an
awaitable when the answer must wait."""

#: Control messages are small; a peer sending more is cut off by ZeroMQ before the
#: payload is buffered in the server's memory.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class RPCServer:
    """Signed request/reply and broker-initiated pushes over a ZeroMQ ROUTER socket."""

    def __init__(
        self,
        key_for: Callable[[str], bytes | None],
        handler: Handler,
        log: logging.Logger,
    ) -> None:
        self._key_for = key_for
        self._handler = handler
        self._log = log
        self._guard = ReplayGuard(ORIGIN_KERNEL)
        self._socket: zmq.asyncio.Socket | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        # kernel id -> ROUTER identity frame of its latest valid message
        self._routes: dict[str, bytes] = {}
        # broker->kernel sequences, one per kernel, so each kernel's own guard works
        self._sequencers: dict[str, Sequencer] = {}
        # msg_id of a request() -> (kernel id it was sent to, future for the reply body)
        self._pending: dict[str, tuple[str, asyncio.Future[dict]]] = {}

    async def start(self, address: str = "tcp://127.0.0.1:*") -> str:
        """Bind and start serving; returns the concrete endpoint for the kernels."""
        if self._socket is not None:
            raise RuntimeError("RPCServer already started")
        socket = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        socket.linger = 0
        # Sending to a vanished peer raises (handled in _send) instead of vanishing silently.
        socket.router_mandatory = True
        socket.maxmsgsize = MAX_MESSAGE_BYTES
        socket.bind(address)
        self._socket = socket
        self._receiver = asyncio.create_task(self._receive_loop(), name="singularity-rpc-recv")
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
        if self._receiver is not None:
            tasks.append(self._receiver)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("RPC server stopped"))
        self._pending.clear()
        self._routes.clear()
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._receiver = None

    async def _receive_loop(self) -> None:
        assert self._socket is not None
        while True:
            identity, *frames = await self._socket.recv_multipart()
            try:
                msg = decode(frames, self._key_for)
                self._guard.check(msg)
            except ProtocolError as exc:
                self._log.warning("dropped message on kernel channel: %s", exc.reason)
                continue
            self._routes[msg.kernel_id] = identity
            if msg.reply_to is not None:
                self._resolve(msg)
                continue
            try:
                result = self._handler(msg)
            except Exception as exc:
                self._log.exception("handler for %r from %s failed", msg.type, msg.kernel_id)
                result = {"error": str(exc) or type(exc).__name__}
            if inspect.isawaitable(result):
                # It waits (a lease, say) as its own task, so other kernels are served meanwhile.
                task = asyncio.create_task(self._serve(identity, msg, result))
                self._handlers.add(task)
                task.add_done_callback(self._handlers.discard)
            else:
                self._reply(identity, msg, result)

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
            body = {"error": str(exc) or type(exc).__name__}
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
        # DONTWAIT sends complete (or fail) at once, so the returned future is already
        # done; ZeroMQ errors end up in it rather than being raised here.
        sent = self._socket.send_multipart([identity, *frames], flags=zmq.DONTWAIT)
        error = sent.exception()
        if error is not None:
            self._log.warning("%r to %s dropped: %s", type, kernel_id, error)
            return None
        return msg.msg_id
