"""``%singularity``: the kernel's view of the pool, in the notebook."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from IPython.core.magic import Magics, line_magic, magics_class

from ..units import format_size

if TYPE_CHECKING:
    from .runtime import Runtime


def format_status(status: dict) -> str:
    """Plain-text status of this kernel, its quota and the queue."""
    kernel, quota = status["kernel"], status["quota"]
    device = "no device" if kernel["device"] is None else f"GPU {kernel['device']}"
    lines = [
        f"kernel {kernel['kernel_id']}: {kernel['state']} ({device})",
        f"  GPU {format_size(kernel['gpu_bytes'])} · host {format_size(kernel['host_bytes'])}"
        f" · disk {format_size(kernel['disk_bytes'])}" + (" · pinned" if kernel["pinned"] else ""),
    ]
    limits, usage = quota["limits"], quota["usage"]
    hours = usage["gpu_seconds_today"] / 3600
    limit = limits["gpu_seconds_per_day"]
    lines.append(
        f"  quota ({quota['user']}): {hours:.2f}"
        + (f" of {limit / 3600:.2f}" if limit is not None else "")
        + " GPU-hours today"
    )
    lines.append(f"  queue: {len(status['queue'])} waiting")
    return "\n".join(lines)


@magics_class
class SingularityMagics(Magics):
    def __init__(self, shell: Any, runtime: Runtime) -> None:
        super().__init__(shell)
        self.runtime = runtime

    @line_magic
    def singularity(self, line: str) -> None:
        """%singularity [status] — where this kernel stands in the GPU pool."""
        command = line.strip() or "status"
        if command != "status":
            print(f"%singularity {command}: unknown subcommand (available: status)")
            return
        print(format_status(self.runtime.status()))
