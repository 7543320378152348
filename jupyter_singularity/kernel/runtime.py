"""The kernel's side of the pool: its broker connection and the answers to the broker's requests.

The broker may ask an idle kernel to offload its GPU state or bring it back. The tensor tier that
moves real state is not built yet, so this runtime reports honestly that it moved nothing and holds
nothing on the device.
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

from .client import BrokerClient
from .magics import SingularityMagics

log = logging.getLogger(__name__)

#: How long the kernel waits for the broker to acknowledge it at start-up.
HELLO_TIMEOUT = 10.0


class Runtime:
    """One per kernel process: the broker client plus the handlers of broker pushes."""

    current: ClassVar[Runtime | None] = None

    def __init__(self, client: BrokerClient) -> None:
        self.client = client
        self.simulated = False

    @classmethod
    def attach(cls, ipython: Any) -> Runtime | None:
        """Connect to the broker named in the environment; outside the pool, do nothing."""
        if cls.current is not None:
            return cls.current
        client = BrokerClient.from_env()
        if client is None:
            log.info("jupyter-singularity: not started by a pooled server; runtime inactive")
            return None
        runtime = cls(client)
        client.on("offload", runtime.on_offload)
        client.on("restore", runtime.on_restore)
        client.start()
        reply = client.request("hello", {"pid": os.getpid()}, timeout=HELLO_TIMEOUT)
        runtime.simulated = bool(reply.get("simulated"))
        cls.current = runtime
        ipython.register_magics(SingularityMagics(ipython, runtime=runtime))
        return runtime

    @classmethod
    def detach(cls, ipython: Any) -> None:
        if cls.current is not None:
            cls.current.client.close()
            cls.current = None

    def status(self) -> dict:
        return self.client.request("status", {}, timeout=HELLO_TIMEOUT)

    def on_offload(self, body: dict) -> dict:
        """Nothing of this kernel lives on a GPU yet, so there is nothing to move."""
        return {"host_bytes": 0, "disk_bytes": 0, "gpu_bytes": 0}

    def on_restore(self, body: dict) -> dict:
        return {"gpu_bytes": 0}
