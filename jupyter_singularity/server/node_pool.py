"""A server's part in the node's pool: the node broker, reached over its control socket.

The broker owns the GPUs, quotas, ledger and spill directory of the machine and decides who may do
what; this server only asks (see broker.control). It keeps what it needs to join again:

- the broker may be unreachable when the server starts, or restart later. Kernels started
  meanwhile get their channel address and a key chosen here; with ``require_broker`` their GPU
  cells wait until the broker is back (else they run outside the pool). When a reply shows a new
  broker run (or the broker answers again), the server subscribes to its events again and
  registers every kernel it runs, with the key each kernel already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import zmq
import zmq.asyncio

from ..broker.control import parse_frames, request_frames, result_of
from ..broker.frontend import PoolError
from ..broker.identity import Identity, server_owner
from ..broker.settings import ConfigError
from ..protocol import ENV_BROKER_URL, ENV_KERNEL_ID, ENV_KERNEL_KEY, ENV_NODE_BROKER, generate_key
from .pool import Pool, Requester

#: The kernels' channel lies beside the broker's control socket (see broker.app).
KERNEL_SOCKET = "kernels.sock"
#: How long a request waits for the broker's answer.
REQUEST_TIMEOUT = 10.0
#: How often the server checks that the broker is there (and whether it restarted).
HEARTBEAT = 2.0


class NodePool(Pool):
    """The pool of the node's broker (see the module docstring)."""

    def __init__(self, socket: Path, log: logging.Logger, require_broker: bool = True) -> None:
        super().__init__()
        self.socket = socket
        self.log = log
        self.require_broker = require_broker
        self.owner = server_owner()
        self.description = f"as the node's broker, at {socket}"
        self.token = os.environ.get("JUPYTERHUB_API_TOKEN") or None
        """This server's hub token, how a broker in jupyterhub mode tells who the server is."""
        self.instance: str | None = None
        """The broker run this server joined (its events, its kernels registered there)."""
        self._heard: str | None = None
        """The broker run that sent the latest reply."""
        self.kernels: dict[str, dict[str, Any]] = {}
        """The kernels this server runs: what registers them again with a restarted broker."""
        self._dealer: zmq.asyncio.Socket | None = None
        self._pending: dict[str, asyncio.Future[dict]] = {}
        self._tasks: list[asyncio.Task] = []
        self._rejoining: asyncio.Task | None = None

    @classmethod
    def for_url(
        cls, url: str, setting: str, log: logging.Logger, require_broker: bool = True
    ) -> NodePool:
        """The pool at ``url`` ("unix:///path/to/broker.sock"); ConfigError naming ``setting``
        for anything else."""
        parsed = urlparse(url)
        if parsed.scheme != "unix" or parsed.netloc or not parsed.path.startswith("/"):
            raise ConfigError(
                f"{setting} = {url!r}: use the node broker's socket as unix:///path/to/broker.sock"
            )
        return cls(Path(parsed.path), log, require_broker)

    # ---------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        dealer.linger = 0
        dealer.connect(f"ipc://{self.socket}")
        self._dealer = dealer
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="singularity-node-receive"),
            asyncio.create_task(self._heartbeat(), name="singularity-node-heartbeat"),
            asyncio.create_task(self._reconnections(), name="singularity-node-reconnect"),
        ]
        self._rejoining = asyncio.create_task(self._join())
        try:
            await self._rejoining
        except PoolError as err:
            self.log.warning(
                "jupyter-singularity: the node's GPU pool broker at %s cannot be reached (%s); "
                "%s; this server joins it as soon as it answers",
                self.socket,
                err.message,
                "GPU cells wait for it"
                if self.require_broker
                else "until then kernels start outside the pool and use the GPU unaccounted",
            )

    async def stop(self) -> None:
        """Leave the pool: the kernels this server ran end with it."""
        for kernel_id in list(self.kernels):
            with contextlib.suppress(PoolError):
                await self.call("unregister_kernel", kernel_id=kernel_id, reason="server stopped")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(PoolError(503, "the server is stopping"))
        if self._dealer is not None:
            self._dealer.close()
            self._dealer = None

    # ------------------------------------------------------------------------------ requests

    async def call(self, op: str, requester: Requester | None = None, **args: Any) -> Any:
        """Ask the broker; the requester's claims are not sent: the broker knows who asks."""
        if op == "register_kernel":
            return await self._register(**args)
        # What this server knows of its kernels changes whether or not the broker hears of it
        # now: a broker that is away hears it when this server joins it again.
        if op == "kernel_started" and args["kernel_id"] in self.kernels:
            self.kernels[args["kernel_id"]]["pid"] = args.get("pid")
        elif op == "unregister_kernel":
            self.kernels.pop(args["kernel_id"], None)
        return await self._ask(op, args)

    async def _register(self, kernel_id: str, notebook: str = "") -> dict:
        """Register a kernel about to start, with a key chosen here (see the module docstring)."""
        key = generate_key().decode()
        self.kernels[kernel_id] = {"notebook": notebook, "key": key, "pid": None}
        try:
            return await self._ask(
                "register_kernel", {"kernel_id": kernel_id, "notebook": notebook, "key": key}
            )
        except PoolError as err:
            if err.status != 503:
                self.kernels.pop(kernel_id, None)
                raise
            if not self.require_broker:
                self.kernels.pop(kernel_id, None)
                self.log.warning(
                    "jupyter-singularity: kernel %s starts outside the GPU pool: %s",
                    kernel_id,
                    err.message,
                )
                return {"env": {}, "home": None}
        # The broker is away: the kernel starts with its channel, its GPU cells wait for it.
        return {"env": self._kernel_env(kernel_id, key), "home": None}

    def _kernel_env(self, kernel_id: str, key: str) -> dict[str, str]:
        return {
            ENV_BROKER_URL: f"ipc://{self.socket.parent / KERNEL_SOCKET}",
            ENV_KERNEL_ID: kernel_id,
            ENV_KERNEL_KEY: key,
            ENV_NODE_BROKER: "1",
        }

    async def _ask(self, op: str, args: dict, timeout: float = REQUEST_TIMEOUT) -> Any:
        if self._dealer is None:
            raise PoolError(503, "this server has not joined the node's GPU pool")
        request_id, frames = request_frames(op, args, self.token)
        future: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._dealer.send_multipart(frames)
            done, _ = await asyncio.wait({future}, timeout=timeout)
        finally:
            self._pending.pop(request_id, None)
        if not done:
            raise PoolError(
                503,
                f"the node's GPU pool broker at {self.socket} did not answer within {timeout:g} s",
            )
        return result_of(future.result())

    async def _receive_loop(self) -> None:
        assert self._dealer is not None
        while True:
            parsed = parse_frames(await self._dealer.recv_multipart())
            if parsed is None:
                continue
            header, body = parsed
            if "events" in header:
                for event in body if isinstance(body, list) else ():
                    if isinstance(event, list) and len(event) == 2:
                        self.emit(str(event[0]), event[1])
                continue
            self._heard = header.get("instance") or self._heard
            self._join_new_run()
            future = self._pending.get(header.get("reply_to", ""))
            if future is not None and not future.done():
                future.set_result(body)

    # ------------------------------------------------------------------------------ joining

    async def _join(self) -> None:
        """Who the broker says this server runs as; then its events, then its kernels."""
        me = await self._ask("me", {}, timeout=5.0)
        heard = self._heard
        self.owner = Identity(me["user"], tuple(me.get("groups", ())), bool(me.get("admin")))
        await self._ask("subscribe", {})
        # All at once: the kernels' own messages wait for their registration (broker.rpc).
        await asyncio.gather(*(self._register_again(*known) for known in self.kernels.items()))
        self.instance = heard

    async def _register_again(self, kernel_id: str, known: dict[str, Any]) -> None:
        await self._ask(
            "register_kernel",
            {"kernel_id": kernel_id, "notebook": known["notebook"], "key": known["key"]},
        )
        if known["pid"] is not None:
            await self._ask("kernel_started", {"kernel_id": kernel_id, "pid": known["pid"]})

    def _join_new_run(self) -> None:
        """A reply came from a broker run this server has not joined: join it (one join at a
        time; the first reply after it that still shows another run starts the next one)."""
        if self._heard != self.instance and (self._rejoining is None or self._rejoining.done()):
            self._rejoining = asyncio.create_task(self._rejoin())

    async def _heartbeat(self) -> None:
        """Notice the broker coming back, or restarted, while nothing else is asked."""
        while True:
            await asyncio.sleep(HEARTBEAT)
            await self._hear_from_broker()

    async def _reconnections(self) -> None:
        """Ask at once when the connection to the broker is made again (it restarted), instead
        of at the next heartbeat, maybe after a question lost with the old run."""
        assert self._dealer is not None
        monitor = self._dealer.get_monitor_socket(zmq.EVENT_CONNECTED)
        try:
            while True:
                await monitor.recv_multipart()
                await self._hear_from_broker()
        finally:
            monitor.close()

    async def _hear_from_broker(self) -> None:
        """Ask something, for its reply's run (see :meth:`_join_new_run`); no answer is no news."""
        with contextlib.suppress(PoolError):
            await self._ask("me", {}, timeout=HEARTBEAT)

    async def _rejoin(self) -> None:
        try:
            await self._join()
        except PoolError as err:
            self.log.warning("jupyter-singularity: joining the node's broker again failed: %s", err)
            return
        self.log.info(
            "jupyter-singularity: joined the node's GPU pool broker at %s (%d kernel(s) of this "
            "server registered)",
            self.socket,
            len(self.kernels),
        )
