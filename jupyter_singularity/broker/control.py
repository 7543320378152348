"""The node broker's control socket: every user's Jupyter server (and the CLI) asks it for the
pool's operations, and hears the pool's state changes.

A ZeroMQ ROUTER on a Unix socket. Who asks is never read from a message: in *unix* mode the OS
reports each message's sending process (uid, gid, pid) and the user is that uid's; in *jupyterhub*
mode each request carries the server's own hub token, which the hub resolves. Messages are
``[MAGIC, header, body]`` JSON frames:

- request, server to broker: header ``{"id", "op"[, "token"]}``, body the operation's arguments;
- reply: header ``{"reply_to", "instance"}``, body ``{"result": ...}`` or ``{"error": {"status",
  "message"}}``; ``instance`` is this broker's run, so a server notices a restart and joins again;
- events, broker to the servers that asked for them (``subscribe``): header ``{"events": n}``,
  body a list of ``n`` ``[name, data]`` pairs in the order they happened. State changes are sent
  together, EVENT_DELAY after the first of them: a decision often makes several, the kernel
  waiting for its grant should not wait for them too, and a burst of leases (one a millisecond)
  should cost each server one wake-up, not one per lease.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import zmq
import zmq.asyncio

from ..protocol import error_text
from .frontend import PoolError, PoolFrontend, call
from .identity import Identity, PeerCredentials, peer_credentials

MAGIC = b"SNGC1"
#: Requests are small (the largest, a quota configuration); a peer sending more is cut off.
MAX_REQUEST_BYTES = 1 << 20
MAX_HEADER_BYTES = 8192
#: How long a state change waits for others before they go to the servers together.
EVENT_DELAY = 0.02

Resolve = Callable[[PeerCredentials | None, str | None], Awaitable[Identity]]
"""``await resolve(peer, token)``: who sends a request (raises PoolError when nobody may)."""


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=str).encode()


def request_frames(op: str, args: dict, token: str | None = None) -> tuple[str, list[bytes]]:
    """A request's id and frames (the client's side of the protocol)."""
    request_id = uuid.uuid4().hex
    header: dict[str, Any] = {"id": request_id, "op": op}
    if token:
        header["token"] = token
    return request_id, [MAGIC, _dumps(header), _dumps(args)]


def parse_frames(frames: list[bytes]) -> tuple[dict, Any] | None:
    """A reply's or event's header and body, or None for anything else."""
    if len(frames) != 3 or frames[0] != MAGIC:
        return None
    try:
        header, body = json.loads(frames[1]), json.loads(frames[2])
    except ValueError:
        return None
    return (header, body) if isinstance(header, dict) else None


def result_of(body: Any) -> Any:
    """A reply's result; PoolError with the broker's status and message for a refusal."""
    if isinstance(body, dict) and "error" in body:
        error = body["error"] if isinstance(body["error"], dict) else {"message": body["error"]}
        raise PoolError(int(error.get("status", 500)), str(error.get("message", error)))
    return body.get("result") if isinstance(body, dict) else None


def ask(socket_path: str, op: str, args: dict | None = None, timeout: float = 10.0) -> Any:
    """One request from a plain (not asyncio) program, such as the CLI."""
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.linger = 0
    try:
        dealer.connect(f"ipc://{socket_path}")
        request_id, frames = request_frames(op, args or {}, os.environ.get("JUPYTERHUB_API_TOKEN"))
        dealer.send_multipart(frames)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not dealer.poll(int(left * 1000)):
                break
            parsed = parse_frames(dealer.recv_multipart())
            if parsed is not None and parsed[0].get("reply_to") == request_id:
                return result_of(parsed[1])
        raise PoolError(503, f"the broker at {socket_path} did not answer within {timeout:g} s")
    finally:
        dealer.close()


class ControlServer:
    """Serves the pool's operations to servers on one socket (see the module docstring)."""

    def __init__(self, frontend: PoolFrontend, resolve: Resolve, log: logging.Logger) -> None:
        self.frontend = frontend
        self.resolve = resolve
        self.log = log
        self.instance = frontend.service.instance  # the run kernels hear of too
        self._socket: zmq.asyncio.Socket | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscribers: set[bytes] = set()
        self._events: list[tuple[str, dict]] = []
        self._events_due: asyncio.TimerHandle | None = None

    def start(self, address: str) -> None:
        socket = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        socket.linger = 0
        socket.router_mandatory = True
        socket.maxmsgsize = MAX_REQUEST_BYTES
        socket.bind(address)
        self._socket = socket
        self._receiver = asyncio.create_task(self._receive_loop(), name="singularity-control")

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._receiver] if self._receiver else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._events_due is not None:
            self._events_due.cancel()
            self._send_events()
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def emit(self, name: str, data: dict) -> None:
        """Send a state change to every server that subscribed (none of them may block it), with
        the others of the next EVENT_DELAY."""
        if not self._subscribers:
            return
        if self._events_due is None:
            self._events_due = asyncio.get_running_loop().call_later(EVENT_DELAY, self._send_events)
        self._events.append((name, data))

    def _send_events(self) -> None:
        self._events_due = None
        events, self._events = self._events, []
        for route in list(self._subscribers):
            if not self._send(route, {"events": len(events)}, events):
                self._subscribers.discard(route)

    async def _receive_loop(self) -> None:
        socket = self._socket
        assert socket is not None
        while True:
            route, *frames = await socket.recv_multipart(copy=False)
            try:
                peer = peer_credentials(route.get("Peer-Address"))
            except zmq.ZMQError:
                peer = None
            task = asyncio.create_task(self._serve(route.bytes, [f.bytes for f in frames], peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            if socket.get(zmq.EVENTS) & zmq.POLLIN:
                await asyncio.sleep(0)  # let other work in between the messages of a flood

    async def _serve(self, route: bytes, frames: list[bytes], peer: PeerCredentials | None) -> None:
        if len(frames) != 3 or frames[0] != MAGIC or len(frames[1]) > MAX_HEADER_BYTES:
            self.log.debug("jupyter-singularity: dropped a malformed control message")
            return
        try:
            header, args = json.loads(frames[1]), json.loads(frames[2])
        except ValueError:
            return
        if not (isinstance(header, dict) and isinstance(args, dict)):
            return
        request_id, op, token = header.get("id"), header.get("op"), header.get("token")
        if not isinstance(request_id, str) or not isinstance(op, str):
            return
        try:
            who = await self.resolve(peer, token if isinstance(token, str) else None)
            if op == "subscribe":
                self._subscribers.add(route)
                body: dict = {"result": True}
            else:
                body = {"result": await call(self.frontend, who, op, args)}
        except PoolError as err:
            body = {"error": {"status": err.status, "message": err.message}}
        except Exception as exc:
            self.log.exception("jupyter-singularity: control request %r failed", op)
            body = {"error": {"status": 500, "message": error_text(exc)}}
        self._send(route, {"reply_to": request_id, "instance": self.instance}, body)

    def _send(self, route: bytes, header: dict, body: Any) -> bool:
        if self._socket is None:
            return False
        # DONTWAIT completes (or fails) at once: the error, if any, is in the returned future.
        sent = self._socket.send_multipart(
            [route, MAGIC, _dumps(header), _dumps(body)], flags=zmq.DONTWAIT
        )
        error = sent.exception()
        if error is not None:  # the server went away (or its queue is full)
            self.log.debug("jupyter-singularity: control message dropped: %s", error)
            return False
        return True
