"""The pool as the server extension sees it: one interface, wherever the broker runs.

The REST handlers, the kernel provisioner and the event stream call :meth:`Pool.call` with an
operation of :data:`~..broker.frontend.OPERATIONS` and do not know whether the broker lives in this
server (:class:`EmbeddedPool`, one user's pool) or is the node's broker that every user's server
joins (:class:`~.node_pool.NodePool`, over its socket). The broker decides what a request may do,
from who asks: here the server's owner; there whoever the OS or JupyterHub says the server runs as.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

from ..broker.frontend import call
from ..broker.identity import Identity, server_owner
from ..broker.settings import OpenPool

EventListener = Callable[[str, dict], None]
"""``listener(name, data)`` for each state change of the pool (see broker.service.Emit)."""

#: In a single-user server, jupyter_server's authorizer names the pool's admins.
EMBEDDED_ADMIN_HINT = "permission 'write' on 'singularity-admin'"


class Requester(NamedTuple):
    """What a REST handler knows of who asks: whether jupyter_server's authorizer makes them an
    admin, and their name for the pool's history. Only a pool inside this server trusts it: a node
    broker knows who the server runs as, and that is all it believes."""

    admin: bool
    actor: str


class Pool:
    """A pool the server extension uses (see the module docstring)."""

    owner: Identity
    """Whose kernels this server starts."""
    description: str
    """Where the broker is, for log lines."""

    def __init__(self) -> None:
        self.listeners: list[EventListener] = []

    async def start(self) -> None:
        """Begin serving (or connect to the node's broker)."""

    async def stop(self) -> None:
        """End this server's part in the pool."""

    def close(self) -> None:
        """Release what the pool holds when it was never started."""

    async def call(self, op: str, requester: Requester | None = None, **args: Any) -> Any:
        """Run ``op`` with ``args``; raises broker.frontend.PoolError when the pool refuses."""
        raise NotImplementedError

    def emit(self, name: str, data: dict) -> None:
        for listener in list(self.listeners):
            listener(name, data)


class EmbeddedPool(Pool):
    """The broker inside this server: the pool of one user, the server's owner."""

    def __init__(self, opened: OpenPool, owner: Identity | None = None) -> None:
        super().__init__()
        self.opened = opened
        self.owner = owner or server_owner()
        self.description = f"inside this server (kernel channel {opened.service.endpoint or '-'})"
        opened.frontend.admin_hint = EMBEDDED_ADMIN_HINT
        opened.service.emit = self.emit

    async def start(self) -> None:
        await self.opened.service.start()
        self.opened.quotas.start()
        self.description = f"inside this server (kernel channel {self.opened.service.endpoint})"

    async def stop(self) -> None:
        """Empty the pool (recorded in the ledger), stop the broker, release devices and database."""
        await self.opened.quotas.stop()
        service = self.opened.service
        for kernel_id in list(service.core.kernels):
            service.unregister_kernel(kernel_id, "server stopped")
        await service.stop()
        self.opened.close()

    def close(self) -> None:
        self.opened.close()

    async def call(self, op: str, requester: Requester | None = None, **args: Any) -> Any:
        who = self.owner
        if requester is not None:
            who = dataclasses.replace(who, admin=requester.admin)
            if op == "act":
                args.setdefault("by", requester.actor)
        return await call(self.opened.frontend, who, op, args)
