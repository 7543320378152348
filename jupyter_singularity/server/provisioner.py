"""Kernel provisioner: every kernel the server starts joins the pool.

It is the local provisioner plus three things: the kernel is registered with the broker before it
launches (and gets a home device), its environment carries the broker's endpoint, its id and its
signing key (and ``CUDA_VISIBLE_DEVICES`` naming the home GPU by UUID on real devices), and an
IPython kernel starts with the ``jupyter_singularity.kernel`` runtime loaded.
"""

from __future__ import annotations

from typing import Any, ClassVar

from jupyter_client.provisioning import LocalProvisioner
from tornado import web

from ..broker.service import BrokerService
from ..broker.spill_dirs import KernelIdError, check_kernel_id

RUNTIME_EXTENSION = "jupyter_singularity.kernel"


def _is_ipykernel(cmd: list[str]) -> bool:
    return any("ipykernel" in part for part in cmd)


class SingularityProvisioner(LocalProvisioner):
    """Starts local kernels inside the GPU pool of this server."""

    broker: ClassVar[BrokerService | None] = None
    """The pool of this server, set by the extension when it starts (the embedded broker)."""

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        try:
            # A client may choose the id (POST /api/kernels); it becomes file and folder names,
            # the connection file's first (written by the local provisioner): refuse it before.
            check_kernel_id(self.kernel_id)
        except KernelIdError as err:
            # Raised through the kernel manager to POST /api/kernels, which answers it as is.
            raise web.HTTPError(400, str(err)) from None
        kwargs = await super().pre_launch(**kwargs)
        broker = type(self).broker
        if broker is None:
            self.log.warning(
                "jupyter-singularity: kernel %s starts outside the GPU pool: the server "
                "extension is not running",
                self.kernel_id,
            )
            return kwargs
        env = kwargs["env"]
        launch = broker.register_kernel(self.kernel_id, notebook=env.get("JPY_SESSION_NAME", ""))
        env.update(launch.env)
        cmd = list(kwargs["cmd"])
        if _is_ipykernel(cmd):
            cmd.append(f"--IPKernelApp.extra_extensions={RUNTIME_EXTENSION}")
        kwargs["cmd"] = cmd
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any):  # type: ignore[override]
        info = await super().launch_kernel(cmd, **kwargs)
        if type(self).broker is not None:
            type(self).broker.kernel_started(self.kernel_id, self.pid)
        return info

    async def shutdown_requested(self, restart: bool = False) -> None:
        await super().shutdown_requested(restart=restart)
        broker = type(self).broker
        reason = "restarted" if restart else "shut down"
        if broker is not None and broker.kernel_stopping(self.kernel_id, reason):
            self.log.info(
                "jupyter-singularity: kernel %s is checkpointed by the CUDA driver and cannot "
                "exit cleanly; ending it now",
                self.kernel_id,
            )
            await self.kill(restart=restart)

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        if type(self).broker is not None:
            type(self).broker.unregister_kernel(
                self.kernel_id, "restarted" if restart else "shut down"
            )
