"""``%singularity``: the kernel's view of the GPU pool, in the notebook.

* ``%singularity`` — the live status widget;
* ``%singularity status|offload|restore|discard|pin|unpin|devices|quota|log|help`` — text;
* ``%%singularity [--memory SIZE]`` — run the cell with that GPU memory reservation.

Cells made only of ``%singularity`` line magics are not gated (see :mod:`.gate`): asking where the
kernel stands, or to offload it, must not first bring it back onto a GPU.
"""

from __future__ import annotations

import ast
import datetime
import shlex
from typing import TYPE_CHECKING, Any

from IPython.core.magic import Magics, line_cell_magic, magics_class

from ..units import format_size
from .client import BrokerError
from .damage import discarded
from .gate import parse_cell_options

if TYPE_CHECKING:
    from .runtime import Runtime

#: How long ``%singularity offload|restore`` wait for the transfer before saying it continues.
TRANSFER_WAIT = 120.0

SUBCOMMANDS = {
    "status": "where this kernel stands: state, device, memory, lease, queue",
    "offload": "move this kernel's GPU state to host memory now (frees the GPU)",
    "restore": "bring this kernel's GPU state back onto a GPU now",
    "discard": "drop the part of this kernel's state a damaged spill file lost, keep the rest",
    "pin": "keep this kernel on its GPU: never offloaded to make room for others",
    "unpin": "allow this kernel to be offloaded again",
    "devices": "the GPUs of the pool and how much of each is booked",
    "quota": "your limits and today's usage",
    "log": "recent offloads, restores and spills of this kernel, and its state changes",
    "help": "this list",
}

HELP = (
    "%singularity            live status widget\n"
    + "".join(f"%singularity {name:<10} {text}\n" for name, text in SUBCOMMANDS.items())
    + "%%singularity --memory SIZE   run the cell with this GPU memory reservation (e.g. 6GiB)"
)


def _hours(seconds: float | None) -> str:
    return "unlimited" if seconds is None else f"{seconds / 3600:.2f} h"


def _size(value: int | None) -> str:
    return "unlimited" if value is None else format_size(value)


def _clock(timestamp: float | None) -> str:
    if not timestamp:
        return "--:--:--"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%H:%M:%S")


def format_device(device: Any) -> str:
    if device is None:
        return "no device"
    if isinstance(device, dict):
        return f"GPU {device.get('index')}"
    return f"GPU {device}"


def own_queue_entry(status: dict) -> dict | None:
    kernel_id = status.get("kernel", {}).get("kernel_id")
    return next((q for q in status.get("queue", []) if q.get("kernel_id") == kernel_id), None)


def format_status(status: dict, runtime: Runtime | None = None) -> str:
    """Plain-text status of this kernel, its quota and the queue."""
    kernel, quota = status["kernel"], status["quota"]
    device = format_device(kernel["device"])
    lines = [
        f"kernel {kernel['kernel_id']}: {kernel['state']} ({device})",
        f"  GPU {format_size(kernel['gpu_bytes'])} · host {format_size(kernel['host_bytes'])}"
        f" · disk {format_size(kernel['disk_bytes'])}" + (" · pinned" if kernel["pinned"] else ""),
    ]
    lease = kernel.get("lease")
    if lease:
        lines.append(
            f"  lease on GPU {lease['device']}, reservation {format_size(lease['reservation'])}"
        )
    if kernel.get("peak_bytes") is not None:
        lines.append(f"  largest recent cell peak {format_size(kernel['peak_bytes'])}")
    context = kernel.get("context") or {}
    if context.get("checkpointed"):
        lines.append("  CUDA context checkpointed off the GPU (driver tier)")
    elif kernel["state"] in ("offloaded", "spilled") and kernel["gpu_bytes"]:
        note = f": {context['note']}" if context.get("note") else ""
        lines.append(
            f"  {format_size(kernel['gpu_bytes'])} (the CUDA context) stayed on the GPU{note}"
        )
    if kernel.get("offload_refused"):
        lines.append(f"  not offloadable until its next cell: {kernel['offload_refused']}")
    limits, usage = quota["limits"], quota["usage"]
    hours = usage["gpu_seconds_today"] / 3600
    limit = limits["gpu_seconds_per_day"]
    lines.append(
        f"  quota ({quota['user']}): {hours:.2f}"
        + (f" of {limit / 3600:.2f}" if limit is not None else "")
        + " GPU-hours today"
    )
    mine = own_queue_entry(status)
    queue = f"  queue: {len(status['queue'])} waiting"
    if mine is not None:
        queue += f"; this kernel is {mine['position']}. ({mine['reason']})"
    lines.append(queue)
    transfers = [] if runtime is None else list(runtime.transfers)
    if transfers:
        lines.append(f"  last transfer: {transfers[-1].describe()}")
    return "\n".join(lines)


def format_devices(reply: dict, kernel: dict | None = None) -> str:
    inventory = reply.get("inventory") or {}
    devices = reply.get("devices") or []
    if not devices:
        return "no GPUs in the pool" + (
            f": {inventory['reason']}" if inventory.get("reason") else ""
        )
    here = None if kernel is None else kernel.get("device")
    lines = []
    for d in devices:
        total, booked = d["total_bytes"], d.get("booked_bytes", 0)
        share = f"{booked / total:.0%}" if total else "-"
        extra = []
        if "kernels" in d:
            extra.append(f"{d['kernels']} kernel{'' if d['kernels'] == 1 else 's'}")
        if d.get("running"):
            extra.append(f"{d['running']} running")
        if here == d["index"]:
            extra.append("this kernel")
        lines.append(
            f"GPU {d['index']}  {d.get('name', '')}  {format_size(total)}  booked "
            f"{format_size(booked)} ({share})" + (f"  · {', '.join(extra)}" if extra else "")
        )
    if inventory.get("simulated"):
        lines.append("(simulated devices)")
    return "\n".join(lines)


def format_quota(quota: dict) -> str:
    limits, usage = quota["limits"], quota["usage"]
    used = usage["gpu_seconds_today"]
    lines = [
        f"quota of {quota['user']}:",
        f"  GPU-time today   {used / 3600:.2f} h of {_hours(limits['gpu_seconds_per_day'])}",
        f"  GPU memory       {format_size(usage['gpu_bytes'])} of {_size(limits['gpu_memory'])}",
        f"  resident kernels {usage['resident_kernels']} of "
        + (
            "unlimited"
            if limits["max_resident_kernels"] is None
            else f"{limits['max_resident_kernels']}"
        ),
        f"  host memory      {format_size(usage['host_bytes'])} of {_size(limits['host_memory'])}",
        f"  priority         {limits['priority']:g}",
    ]
    return "\n".join(lines)


def format_log(runtime: Runtime, kernel: dict | None) -> str:
    lines = ["transfers (this kernel process):"]
    transfers = list(runtime.transfers)  # a snapshot: the push worker appends meanwhile
    if transfers:
        lines += [f"  {_clock(t.time)}  {t.describe()}" for t in reversed(transfers)]
    else:
        lines.append("  none yet")
    events = (kernel or {}).get("events") or []
    if events:
        lines.append("state changes (pool ledger):")
        for event in events:
            old, new = event.get("old_state"), event.get("new_state")
            lines.append(
                f"  {_clock(event.get('time'))}  {old or '-'} → {new}"
                + (f"  ({event['reason']})" if event.get("reason") else "")
            )
    return "\n".join(lines)


@magics_class
class SingularityMagics(Magics):
    def __init__(self, shell: Any, runtime: Runtime) -> None:
        super().__init__(shell)
        self.runtime = runtime

    @line_cell_magic
    def singularity(self, line: str, cell: str | None = None) -> Any:
        """%singularity [status|offload|restore|discard|pin|unpin|devices|quota|log|help]: the pool.

        Without a subcommand: a live status widget. As a cell magic,
        ``%%singularity --memory SIZE`` runs the cell with that GPU memory reservation.
        """
        if cell is not None:
            return self._run_cell(line, cell)
        words = shlex.split(line)
        command = words[0] if words else ""
        if not command:
            from .widget import show_widget

            show_widget(self.runtime)
            return None
        handler = getattr(self, f"_cmd_{command}", None)
        if handler is None or command not in SUBCOMMANDS:
            print(f"%singularity {command}: unknown subcommand\n\n{HELP}")
            return None
        try:
            handler(words[1:])
        except BrokerError as err:
            print(f"%singularity {command}: {err}")
        except TimeoutError as err:
            print(f"%singularity {command}: the GPU pool did not answer ({err})")
        return None

    # ------------------------------------------------------------------ subcommands

    def _cmd_help(self, args: list[str]) -> None:
        print(HELP)

    def _cmd_status(self, args: list[str]) -> None:
        print(format_status(self.runtime.status(), self.runtime))

    def _cmd_quota(self, args: list[str]) -> None:
        print(format_quota(self.runtime.status()["quota"]))

    def _cmd_devices(self, args: list[str]) -> None:
        reply = self.runtime.request("devices")
        print(format_devices(reply, reply.get("kernel")))

    def _cmd_log(self, args: list[str]) -> None:
        print(format_log(self.runtime, self.runtime.status().get("kernel")))

    def _cmd_pin(self, args: list[str]) -> None:
        kernel = self.runtime.request("pin", {"pinned": True})["kernel"]
        where = format_device(kernel["device"])
        print(
            f"kernel pinned ({kernel['state']}, {where}): it is never offloaded to make room for "
            "other kernels; %singularity unpin to undo"
        )

    def _cmd_unpin(self, args: list[str]) -> None:
        kernel = self.runtime.request("pin", {"pinned": False})["kernel"]
        print(f"kernel unpinned ({kernel['state']}): it may be offloaded when others need its GPU")

    def _cmd_offload(self, args: list[str]) -> None:
        before = self.runtime.transitions
        kernel = self.runtime.request("offload_me")["kernel"]
        if kernel["state"] != "offloading":
            print(f"nothing to offload: this kernel is {kernel['state']}")
            return
        self._report_transfer(before, "offload")

    def _cmd_restore(self, args: list[str]) -> None:
        before = self.runtime.transitions
        reply = self.runtime.request("restore_me")
        kernel = reply["kernel"]
        if kernel["state"] == "queued":
            entry = reply.get("queue") or {}
            print(
                "restore queued: it happens as soon as a GPU has room"
                + (f" ({entry.get('reason')})" if entry.get("reason") else "")
            )
            return
        self._report_transfer(before, "restore")

    def _report_transfer(self, before: int, kind: str) -> None:
        record = self.runtime.wait_for_transition(before, TRANSFER_WAIT)
        if record is None:
            print(f"{kind} requested; it is still in progress (see %singularity status)")
        elif record.error and kind == "offload":
            print(f"offload failed, the kernel keeps its state where it was: {record.error}")
        elif record.error:  # the message says where the state is and what to do
            print(f"restore failed: {record.error}")
        else:
            print(record.describe())

    def _cmd_discard(self, args: list[str]) -> None:
        """Drop what damaged spill files lost; the pool learns what is left, out of ``error``."""
        runtime = self.runtime
        engine = runtime.get_engine()
        with runtime.lock:
            damage = None if engine is None else engine.discard_damaged()
        if damage is None:
            print(
                "nothing to discard: no part of this kernel's state is known to be damaged "
                "(a restore that finds a damaged spill file says so)"
            )
            return
        body = {"host_bytes": int(engine.host_bytes), "disk_bytes": int(engine.disk_bytes)}
        kernel = runtime.request("discarded", body)["kernel"]
        runtime.state = kernel["state"]
        runtime.notify()
        print(f"{discarded(damage, engine, self.shell)} This kernel is {kernel['state']} now.")

    # ------------------------------------------------------------------ the cell magic

    def _run_cell(self, line: str, cell: str) -> Any:
        """Run the body of a ``%%singularity`` cell in the user namespace.

        The gate at the top of the cell already took the lease with the reservation of ``line``
        (the AST transformer passes it); when the magic is invoked some other way, take it here.
        Like ``%%time``, the value of a final expression is returned, so it is displayed.
        """
        parse_cell_options(line)
        self.runtime.gate_cell(line)
        shell = self.shell
        source = shell.transform_cell(cell)
        filename = shell.compile.cache(source)
        tree = shell.compile.ast_parse(source, filename=filename)
        tree = shell.transform_ast(tree)
        last: ast.Expr | None = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = tree.body.pop()
        glob, local = shell.user_global_ns, shell.user_ns
        exec(compile(tree, filename, "exec"), glob, local)
        if last is not None:
            expression = ast.Expression(last.value)
            return eval(compile(expression, filename, "eval"), glob, local)
        return None
