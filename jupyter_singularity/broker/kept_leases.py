"""Leases that kernels keep between cells, and asking for them back.

A grant lets its kernel keep the lease after the cell, for its next cell, for
``Policy.lease_keep`` seconds (see :mod:`jupyter_singularity.kernel.kept_lease`): back-to-back
cells then skip a round trip and two decisions each. Never at another kernel's expense: a grant
made while a request waits allows no keeping, and as soon as a request has to wait the broker asks
every lease it let be kept back (``lease_wanted``), as it asks a kernel's when an offload of that
kernel is asked for. The kernel gives it back at once when no cell holds it, else when its cell
ends. The core sees a kept lease as a lease still running (its kernel cannot be evicted while it
is held) and charges it up to the end of its last cell: the release says how long it sat idle
(``idle_seconds``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .core import BrokerCore
from .model import Grant
from .rpc import RPCServer


class KeptLeases:
    """A mixin of :class:`~.service.BrokerService`: the leases granted with leave to be kept
    whose kernels were not yet asked for them back, by kernel."""

    core: BrokerCore
    _rpc: RPCServer
    _spawn: Callable[[Any], asyncio.Future]
    _keepable: dict[str, str]

    def _keep_seconds(self, grant: Grant) -> float:
        """How long the kernel of ``grant`` may keep the lease between cells (0: not at all)."""
        keep = self.core.policy.lease_keep
        if keep <= 0 or not grant.hold or self.core.waiting():
            return 0.0
        self._keepable[grant.kernel_id] = grant.request_id
        return keep

    def _want_all_back(self) -> None:
        """A request waits: every kept lease is asked back."""
        keepable, self._keepable = self._keepable, {}
        for kernel_id, request_id in keepable.items():
            self._spawn(self._rpc.push(kernel_id, "lease_wanted", {"request_id": request_id}))

    def _want_back(self, kernel_id: str) -> None:
        request_id = self._keepable.pop(kernel_id, None)
        if request_id is not None:
            self._spawn(self._rpc.push(kernel_id, "lease_wanted", {"request_id": request_id}))

    def _kept_lease_ended(self, kernel_id: str) -> None:
        self._keepable.pop(kernel_id, None)
