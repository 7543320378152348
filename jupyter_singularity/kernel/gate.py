"""Cell gating: no cell of a kernel that uses the GPU runs without a lease.

IPython offers ``pre_run_cell`` callbacks, but an exception raised there is printed and **the cell still
runs**. The gate is therefore part of the cell itself: an AST transformer inserts a call to
``__singularity_gate__()`` as the cell's first statement. When the gate raises (quota denied, the user
interrupted the wait, a restore failed), the cell stops before any of its own code ran.

The first GPU use of a kernel that never used it is gated too, because no cell-level gate ran for it:

* on a real GPU, torch's lazy CUDA initialisation (``torch.cuda._lazy_init``) is wrapped as soon as
  torch is imported (an import hook covers a later ``import torch``), so the first CUDA call of a
  kernel waits for a lease, and the lease is held until the cell ends;
* on simulated devices there is no CUDA, and the kernel's "device" state is its large CPU tensors:
  the first ``import torch`` of the kernel plays the part of CUDA initialisation. From then on every
  cell of the kernel holds a lease.

This module holds the pieces that touch IPython and the interpreter; the bookkeeping lives in
:mod:`.runtime`.
"""

from __future__ import annotations

import ast
import builtins
import importlib.abc
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any

from ..units import format_size, parse_size

if TYPE_CHECKING:
    from .runtime import Waiting

#: The name the inserted call uses; it lives in ``builtins`` so ``%reset`` cannot remove it and
#: ``%who`` does not list it.
GATE_NAME = "__singularity_gate__"

#: A waiting cell shows its line only after this long, so an immediate grant prints nothing.
LINE_DELAY = 0.3
#: How often the live line is refreshed at most (its elapsed time ticks).
LINE_REFRESH = 0.5


# ------------------------------------------------------------------------------------- errors


class _OneParagraph:
    """Mixin: IPython shows ``_render_traceback_()`` instead of a traceback into our own code."""

    headline = "GPU lease"

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[0;31m{self.headline}:\x1b[0m {self}"]


class LeaseDenied(_OneParagraph, Exception):
    """The broker refused the cell a lease (quota, no device large enough); the cell did not run."""

    headline = "This cell did not run: no GPU lease"


class LeaseCancelled(_OneParagraph, KeyboardInterrupt):
    """The user interrupted a cell that waited for a lease; its request left the queue."""

    headline = "Interrupted"


class RestoreFailed(_OneParagraph, Exception):
    """The kernel's GPU state could not be brought back and the cell did not run; the message says
    whether a retry may work or, when part of the state was lost, what and how to go on."""

    headline = "This cell did not run: restoring the kernel's GPU state failed"


class GateUsageError(_OneParagraph, Exception):
    """``%%singularity`` was given options it does not understand."""

    headline = "%%singularity"


# ------------------------------------------------------------------------ cell magic options


def parse_cell_options(line: str) -> int | None:
    """The reservation asked for by ``%%singularity [--memory SIZE]``, in bytes (None: the broker's
    prediction)."""
    try:
        words = shlex.split(line)
    except ValueError as err:
        raise GateUsageError(f"cannot parse {line!r}: {err}") from None
    memory: int | None = None
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("--memory", "-m"):
            if i + 1 >= len(words):
                raise GateUsageError("--memory needs a size, e.g. --memory 6GiB")
            value, i = words[i + 1], i + 2
        elif word.startswith("--memory="):
            value, i = word.split("=", 1)[1], i + 1
        else:
            raise GateUsageError(
                f"unknown option {word!r}; usage: %%singularity [--memory SIZE] (e.g. 6GiB)"
            )
        try:
            memory = parse_size(value)
        except (TypeError, ValueError) as err:
            raise GateUsageError(str(err)) from None
    return memory


# -------------------------------------------------------------------------- the AST transformer


def _magic_call(node: ast.stmt, method: str) -> ast.Call | None:
    """``get_ipython().<method>('singularity', ...)`` as IPython writes ``%singularity`` magics."""
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
        return None
    call = node.value
    func = call.func
    if not (
        isinstance(func, ast.Attribute)
        and func.attr == method
        and isinstance(func.value, ast.Call)
        and isinstance(func.value.func, ast.Name)
        and func.value.func.id == "get_ipython"
        and call.args
        and isinstance(call.args[0], ast.Constant)
        and call.args[0].value == "singularity"
    ):
        return None
    return call


class GateInserter(ast.NodeTransformer):
    """Puts ``__singularity_gate__()`` first in every cell (after ``from __future__`` imports).

    * ``%%singularity --memory 6GiB`` cells get ``__singularity_gate__('--memory 6GiB')``: the
      reservation is known before anything runs;
    * cells made only of ``%singularity ...`` line magics are not gated: asking where the kernel
      stands, or to offload it, must not first restore it onto a GPU.

    IPython drops an AST transformer that raises, so this one never does.
    """

    def visit_Module(self, node: ast.Module) -> ast.Module:
        try:
            return self._insert(node)
        except Exception:  # pragma: no cover - defensive: never lose the gate for good
            return node

    def _insert(self, node: ast.Module) -> ast.Module:
        body = node.body
        if not body:
            return node
        if all(_magic_call(stmt, "run_line_magic") is not None for stmt in body):
            return node
        index = 0
        if _is_docstring(body[0]) and len(body) > 1 and _is_future(body[1]):
            index = 1
        while index < len(body) and _is_future(body[index]):
            index += 1
        args: list[ast.expr] = []
        if len(body) > index:
            magic = _magic_call(body[index], "run_cell_magic")
            if magic is not None and len(magic.args) >= 2:
                args = [magic.args[1]]
        call = ast.Expr(
            ast.Call(func=ast.Name(id=GATE_NAME, ctx=ast.Load()), args=args, keywords=[])
        )
        anchor = body[min(index, len(body) - 1)]
        ast.copy_location(call, anchor)
        ast.fix_missing_locations(call)
        body.insert(index, call)
        return node


def _is_future(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__"


def _is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def install_gate(shell: Any, gate: Callable[[str | None], None]) -> GateInserter:
    """Register the transformer; ``gate(line)`` is what the inserted call runs (a bound method of
    the runtime, so the call costs next to nothing when no lease is needed or one is held)."""
    builtins.__dict__[GATE_NAME] = gate
    inserter = GateInserter()
    shell.ast_transformers.append(inserter)
    return inserter


def uninstall_gate(shell: Any, inserter: GateInserter | None) -> None:
    if inserter is not None and inserter in shell.ast_transformers:
        shell.ast_transformers.remove(inserter)
    builtins.__dict__.pop(GATE_NAME, None)


# ------------------------------------------------------------------------ interrupts while waiting


class InterruptTrap:
    """Turns SIGINT into a flag while the main thread waits, so the wait ends cleanly.

    A ``KeyboardInterrupt`` raised at an arbitrary bytecode could leave a granted lease unknown to
    the kernel; instead the waiting loop polls :attr:`fired` and cancels its request itself. It also
    covers cells run as coroutines (top-level ``await``), where ipykernel's own SIGINT handler only
    cancels the coroutine at its next ``await``, which a blocking wait never reaches. Off the main
    thread (signals cannot be handled there) it does nothing.
    """

    def __init__(self) -> None:
        self.fired = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.fired = True

    def __enter__(self) -> InterruptTrap:
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handler)
                self._installed = True
            except (ValueError, OSError):  # pragma: no cover - e.g. embedded interpreters
                self._installed = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False


# ------------------------------------------------------------------------------ the live line


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class WaitLine:
    """The line a waiting cell shows in its output: queue position, reason, restore progress.

    It is displayed only once the wait lasts (:data:`LINE_DELAY`) or the broker queued the request,
    updated in place (``display_id``), and cleared when the cell starts to run: with
    ``clear_output`` at the top of a cell (nothing else was printed yet), by an update with an empty
    bundle when the wait happened mid-cell (the first ``import torch``), so earlier output stays and
    no blank line is left (JupyterLab renders an output without a MIME type as nothing).
    """

    def __init__(self, top_of_cell: bool, what: str = "this cell") -> None:
        self.top_of_cell = top_of_cell
        self.what = what
        self.started = time.monotonic()
        self._handle: Any = None
        self._last_text = ""
        self._last_shown = 0.0
        self._restore: tuple[int, str] | None = None
        self._progress = 0.0
        self._away: float | None = None

    @property
    def shown(self) -> bool:
        return self._handle is not None

    def away(self, seconds: float | None) -> None:
        """For how long the pool's broker has not answered (a node broker restarting, which the
        cell waits for), or None while it answers."""
        self._away = seconds

    def text(self, waiting: Waiting | None) -> str:
        if self._restore is not None:
            total, source = self._restore
            percent = f" {self._progress:.0%}" if self._progress else ""
            return f"⏳ restoring {format_size(total)} from {source}…{percent}"
        if self._away is not None:
            return (
                f"⏳ the GPU pool's broker is not answering ({self._away:.0f} s); {self.what} "
                "waits for it (interrupt the kernel to stop waiting)"
            )
        elapsed = time.monotonic() - self.started
        if waiting is not None and waiting.position:
            where = f"{ordinal(waiting.position)} in the GPU queue"
            why = f": {waiting.reason}" if waiting.reason else ""
            return (
                f"⏳ {self.what} waits for a GPU lease, {where}{why} ({elapsed:.0f} s; "
                "interrupt the kernel to leave the queue)"
            )
        return f"⏳ {self.what} waits for a GPU lease ({elapsed:.0f} s)"

    def tick(self, waiting: Waiting | None, force: bool = False) -> None:
        """Show or refresh the line if it is due; cheap when nothing changed."""
        now = time.monotonic()
        queued = (waiting is not None and bool(waiting.position)) or self._away is not None
        if self._handle is None and not force and not queued and now - self.started < LINE_DELAY:
            return
        if self._handle is not None and not force and now - self._last_shown < LINE_REFRESH:
            return
        self._show(self.text(waiting))

    def restoring(self, total: int, source: str) -> None:
        """The restore starts: a line already shown says so at once; otherwise the line appears
        at the restore's progress once the wait lasts (a restore over within ``LINE_DELAY``
        shows nothing, and costs its cell no output messages)."""
        self._restore = (total, source)
        self._progress = 0.0
        if self._handle is not None:
            self._show(self.text(None))

    def progress(self, done: int, total: int) -> None:
        if total <= 0:
            return
        self._progress = min(1.0, done / total)
        now = time.monotonic()
        if self._handle is None:
            due = done < total and now - self.started >= LINE_DELAY
        else:
            due = done >= total or now - self._last_shown >= 0.25
        if due:
            self._show(self.text(None))

    def _show(self, text: str) -> None:
        self._last_shown = time.monotonic()
        if text == self._last_text:
            return
        self._last_text = text
        try:
            from IPython.display import display

            if self._handle is None:
                self._handle = display({"text/plain": text}, raw=True, display_id=True)
            else:
                self._handle.update({"text/plain": text}, raw=True)
        except Exception:  # pragma: no cover - no display machinery (plain interpreter)
            self._handle = None

    def close(self) -> None:
        if self._handle is None:
            return
        try:
            if self.top_of_cell:
                from IPython.display import clear_output

                clear_output()
            else:
                self._handle.update({}, raw=True)
        except Exception:  # pragma: no cover
            pass
        self._handle = None


# -------------------------------------------------------------------- first GPU use: torch hooks


class TorchImportHook(importlib.abc.MetaPathFinder):
    """Runs ``before_exec()`` just before the first ``import torch`` executes torch's package, and
    ``on_import(torch)`` right after.

    It finds torch's spec with the other finders and wraps that one loader's ``exec_module``; every
    other import is untouched, and so is ``importlib.util.find_spec("torch")`` (libraries probe for
    torch that way without importing it). If ``before_exec`` raises, torch has not started to load
    and a later import tries again. If torch is already imported, install() calls back at once.
    """

    def __init__(
        self, before_exec: Callable[[], None], on_import: Callable[[ModuleType], None]
    ) -> None:
        self.before_exec = before_exec
        self.on_import = on_import

    def install(self) -> None:
        torch = sys.modules.get("torch")
        if torch is not None:
            self.on_import(torch)
            return
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def uninstall(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "torch":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module") or not hasattr(loader, "__dict__"):
            return spec
        original = loader.exec_module
        hook = self

        def exec_module(module: ModuleType) -> None:
            hook.before_exec()
            original(module)
            # The package executed: later imports of torch need no hook, whatever happens next.
            loader.__dict__.pop("exec_module", None)
            hook.uninstall()
            hook.on_import(module)

        # An attribute of this one loader instance: other modules' loaders are not affected.
        loader.exec_module = exec_module
        return spec


class CudaInitGate:
    """Wraps ``torch.cuda._lazy_init`` so the kernel's first CUDA initialisation waits for a lease.

    torch calls ``torch.cuda._lazy_init`` (looked up on the module each time) before any CUDA work;
    some torch modules imported the function by name, so every module of torch holding the original
    gets the wrapper too.
    """

    def __init__(self, before_init: Callable[[], Any], after_init: Callable[[Any], None]) -> None:
        self.before_init = before_init
        self.after_init = after_init
        self.original: Callable[[], None] | None = None
        self._patched: list[ModuleType] = []

    def install(self, torch: ModuleType) -> None:
        cuda = getattr(torch, "cuda", None)
        original = getattr(cuda, "_lazy_init", None)
        if cuda is None or original is None or self.original is not None:
            return
        self.original = original
        gate = self

        def _lazy_init() -> None:
            if cuda.is_initialized():
                return original()
            token = gate.before_init()
            try:
                original()
            finally:
                gate.after_init(token)

        _lazy_init.__wrapped__ = original  # type: ignore[attr-defined]
        for name, module in list(sys.modules.items()):
            if (
                (name == "torch.cuda" or name.startswith("torch."))
                and module is not None
                and getattr(module, "_lazy_init", None) is original
            ):
                module._lazy_init = _lazy_init  # type: ignore[attr-defined]
                self._patched.append(module)

    def uninstall(self) -> None:
        for module in self._patched:
            if getattr(module, "_lazy_init", None) is not self.original:
                module._lazy_init = self.original  # type: ignore[attr-defined]
        self._patched.clear()
        self.original = None
