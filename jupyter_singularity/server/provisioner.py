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

from ..broker.frontend import PoolError
from ..broker.spill_dirs import KernelIdError, check_kernel_id
from .pool import Pool

RUNTIME_EXTENSION = "jupyter_singularity.kernel"


def _is_ipykernel(cmd: list[str]) -> bool:
    return any("ipykernel" in part for part in cmd)


class SingularityProvisioner(LocalProvisioner):
    """Starts local kernels inside the GPU pool of this server."""

    pool: ClassVar[Pool | None] = None
    """The pool this server's kernels join, set by the extension when it starts."""

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        try:
            # A client may choose the id (POST /api/kernels); it becomes file and folder names,
            # the connection file's first (written by the local provisioner): refuse it before.
            check_kernel_id(self.kernel_id)
        except KernelIdError as err:
            # Raised through the kernel manager to POST /api/kernels, which answers it as is.
            raise web.HTTPError(400, str(err)) from None
        kwargs = await super().pre_launch(**kwargs)
        pool = type(self).pool
        if pool is None:
            self.log.warning(
                "jupyter-singularity: kernel %s starts outside the GPU pool: the server "
                "extension is not running",
                self.kernel_id,
            )
            return kwargs
        env = kwargs["env"]
        try:
            launch = await pool.call(
                "register_kernel",
                kernel_id=self.kernel_id,
                notebook=env.get("JPY_SESSION_NAME", ""),
            )
        except PoolError as err:
            raise web.HTTPError(err.status, err.message) from None
        env.update(launch["env"])
        cmd = list(kwargs["cmd"])
        if _is_ipykernel(cmd):
            cmd.append(f"--IPKernelApp.extra_extensions={RUNTIME_EXTENSION}")
        kwargs["cmd"] = cmd
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any):  # type: ignore[override]
        info = await super().launch_kernel(cmd, **kwargs)
        await self._tell("kernel_started", pid=self.pid)
        return info

    async def shutdown_requested(self, restart: bool = False) -> None:
        await super().shutdown_requested(restart=restart)
        reason = "restarted" if restart else "shut down"
        if await self._tell("kernel_stopping", reason=reason):
            self.log.info(
                "jupyter-singularity: kernel %s is checkpointed by the CUDA driver and cannot "
                "exit cleanly; ending it now",
                self.kernel_id,
            )
            await self.kill(restart=restart)

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart=restart)
        await self._tell("unregister_kernel", reason="restarted" if restart else "shut down")

    async def _tell(self, op: str, **args: Any) -> Any:
        """Tell the pool about this kernel; a refusal is logged (the kernel's life goes on)."""
        pool = type(self).pool
        if pool is None:
            return None
        try:
            return await pool.call(op, kernel_id=self.kernel_id, **args)
        except PoolError as err:
            self.log.warning("jupyter-singularity: %s of kernel %s: %s", op, self.kernel_id, err)
            return None
