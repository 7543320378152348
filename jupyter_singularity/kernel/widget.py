"""The ``%singularity`` status widget: state, device, memory, quota, queue, recent transfers.

Threading (ipykernel 7). A widget update is a ``comm_msg`` that ipywidgets sends from whatever thread
sets a trait; ipykernel stamps it with the parent header of the *shell context* (from a thread that
has none, the last shell request's), and ipywidgets' own bookkeeping (``_property_lock``, held syncs)
is not thread-safe against the main thread handling the frontend's messages for the same widget. So:

* a background thread ("singularity-widget") asks the broker for ``status`` about once a second,
  while at least one widget is open, and immediately when the runtime reports a change;
* it never touches a widget: it hands the new state to :class:`~.relay.MainThreadRelay`, which runs
  the update on the kernel's main thread — from the kernel's event loop while the kernel is idle, or
  from the loop of a cell waiting for its lease (the event loop is blocked then) — coalescing updates
  that pile up while a cell runs.

No ``Output`` widget and no printing are involved: those route by parent header and would land in
whatever cell ran last.
"""

from __future__ import annotations

import html
import threading
import time
from typing import TYPE_CHECKING, Any

from ..units import format_size
from .client import BrokerError

if TYPE_CHECKING:
    from .runtime import Runtime

#: Seconds between two status polls while a widget is open.
POLL_INTERVAL = 1.0
#: Widgets kept live per kernel; displaying more closes the oldest (its view freezes).
MAX_WIDGETS = 4

_STATE_COLOURS = {
    "running": "#2e7d32",
    "resident": "#1565c0",
    "restoring": "#ef6c00",
    "offloading": "#ef6c00",
    "queued": "#f9a825",
    "offloaded": "#6a1b9a",
    "spilled": "#6a1b9a",
    "error": "#c62828",
    "cold": "#616161",
}


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _age(since: float) -> str:
    seconds = max(0, int(time.time() - since))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def render_summary(status: dict, runtime: Runtime | None = None) -> str:
    """HTML of the status table (pure: the tests and the widget share it)."""
    if "error" in status:
        return f"<b>GPU pool</b>: <i>{_esc(status['error'])}</i>"
    kernel = status["kernel"]
    state = kernel["state"]
    waiting = None if runtime is None else runtime.waiting
    if waiting is not None and waiting.restoring:
        state = "restoring"
    colour = _STATE_COLOURS.get(state, "#616161")
    device = "none" if kernel["device"] is None else f"GPU {kernel['device']}"
    rows = [
        (
            "state",
            f'<span style="color:{colour};font-weight:bold">{_esc(state)}</span>'
            + (" · pinned" if kernel.get("pinned") else ""),
        ),
        ("device", _esc(device)),
        (
            "memory",
            f"GPU {format_size(kernel['gpu_bytes'])} · host {format_size(kernel['host_bytes'])}"
            f" · disk {format_size(kernel['disk_bytes'])}",
        ),
    ]
    lease = kernel.get("lease")
    if lease:
        rows.append(
            (
                "lease",
                f"GPU {lease['device']}, reservation {format_size(lease['reservation'])}, "
                f"held {_age(lease['start'])}",
            )
        )
    elif kernel.get("last_activity"):
        # Ticks every poll: how long the kernel has been idle (what idle offloading goes by).
        since = _age(kernel["last_activity"])
        rows.append(
            ("idle", f"no GPU cell yet ({since} in the pool)" if state == "cold" else since)
        )
    queue = status.get("queue") or []
    mine = next((q for q in queue if q.get("kernel_id") == kernel["kernel_id"]), None)
    if waiting is not None and waiting.position:
        rows.append(("queue", f"{waiting.position}. in line: {_esc(waiting.reason)}"))
    elif mine is not None:
        rows.append(("queue", f"{mine['position']}. in line: {_esc(mine['reason'])}"))
    else:
        rows.append(("queue", f"{len(queue)} waiting, not this kernel"))
    quota = status.get("quota") or {}
    if quota:
        used = quota["usage"]["gpu_seconds_today"] / 3600
        limit = quota["limits"]["gpu_seconds_per_day"]
        rows.append(
            (
                "quota",
                f"{used:.2f} of {'unlimited' if limit is None else f'{limit / 3600:.2f}'} "
                f"GPU-hours today ({_esc(quota['user'])})",
            )
        )
    body = "".join(
        f'<tr><td style="padding-right:1em;color:#757575">{name}</td><td>{value}</td></tr>'
        for name, value in rows
    )
    return (
        f'<div class="jp-singularity-widget-summary"><b>GPU pool</b> · kernel '
        f"<code>{_esc(kernel['kernel_id'][:8])}</code><table>{body}</table></div>"
    )


def render_transfers(runtime: Runtime) -> str:
    transfers = list(runtime.transfers)  # a snapshot: the push worker appends meanwhile
    if not transfers:
        return "<i>no checkpoints or restores yet</i>"
    rows = []
    for t in reversed(transfers):
        when = time.strftime("%H:%M:%S", time.localtime(t.time))
        if t.error:
            detail = f'<span style="color:#c62828">failed: {_esc(t.error)}</span>'
            rows.append(f"<tr><td>{when}</td><td>{t.kind}</td><td colspan=3>{detail}</td></tr>")
            continue
        rows.append(
            f"<tr><td>{when}</td><td>{t.kind}</td><td>{format_size(t.nbytes)}</td>"
            f"<td>{t.seconds:.3f} s</td><td>{t.gbps:.1f} GB/s</td></tr>"
        )
    return (
        "<table><tr><th>time</th><th>what</th><th>bytes</th><th>took</th><th>speed</th></tr>"
        + "".join(rows)
        + "</table>"
    )


class StatusWidget:
    """One displayed status widget: summary, quota bar, transfers and three buttons."""

    def __init__(self, runtime: Runtime) -> None:
        import ipywidgets as w

        self.runtime = runtime
        self.summary = w.HTML(value="<i>asking the GPU pool…</i>")
        self.quota = w.FloatProgress(
            value=0.0, min=0.0, max=1.0, description="GPU-time", bar_style="info"
        )
        self.transfers = w.HTML(value=render_transfers(runtime))
        self.message = w.HTML(value="")
        self.offload_button = w.Button(description="Offload", tooltip="free the GPU now")
        self.restore_button = w.Button(description="Restore", tooltip="back onto a GPU now")
        self.pin_button = w.ToggleButton(description="Pin", tooltip="never offload this kernel")
        self.offload_button.on_click(lambda _: self._action("offload_me"))
        self.restore_button.on_click(lambda _: self._action("restore_me"))
        self.pin_button.observe(self._pin_changed, names="value")
        self._pinned_from_status = False
        self.box = w.VBox(
            [
                self.summary,
                self.quota,
                w.HTML(value="<b>recent checkpoints and restores</b>"),
                self.transfers,
                w.HBox([self.offload_button, self.restore_button, self.pin_button]),
                self.message,
            ]
        )
        self.updates = 0

    @property
    def open(self) -> bool:
        return getattr(self.box, "comm", None) is not None

    def close(self) -> None:
        self.box.close()
        for child in (self.summary, self.quota, self.transfers, self.message):
            child.close()

    def update(self, status: dict) -> None:
        """Apply a ``status`` reply; main thread only (see the module docstring)."""
        if not self.open:
            return
        self.updates += 1
        self.summary.value = render_summary(status, self.runtime)
        self.transfers.value = render_transfers(self.runtime)
        quota = status.get("quota") or {}
        if quota:
            used = quota["usage"]["gpu_seconds_today"]
            limit = quota["limits"]["gpu_seconds_per_day"]
            if limit:
                self.quota.max = float(limit) / 3600
                self.quota.value = min(float(used), float(limit)) / 3600
                self.quota.bar_style = "danger" if used >= limit else "info"
                self.quota.description = "GPU-h"
            else:
                self.quota.max = max(1.0, used / 3600)
                self.quota.value = used / 3600
                self.quota.description = "GPU-h (∞)"
        kernel = status.get("kernel")
        if kernel is not None:
            pinned = bool(kernel.get("pinned"))
            if pinned != self.pin_button.value:
                self._pinned_from_status = True
                try:
                    self.pin_button.value = pinned
                finally:
                    self._pinned_from_status = False

    def _pin_changed(self, change: dict) -> None:
        if self._pinned_from_status:
            return
        self._action("pin", {"pinned": bool(change["new"])})

    def _action(self, request: str, body: dict | None = None) -> None:
        """A button click (main thread): ask the broker; the poller shows the result."""
        try:
            self.runtime.request(request, body)
            self.message.value = ""
        except (BrokerError, TimeoutError) as err:
            self.message.value = f'<span style="color:#c62828">{_esc(err)}</span>'
        poller = self.runtime.widgets
        if poller is not None:
            poller.poke()


class WidgetPoller:
    """Polls the broker for the open widgets of one runtime, off the main thread."""

    def __init__(self, runtime: Runtime, interval: float = POLL_INTERVAL) -> None:
        self.runtime = runtime
        self.interval = interval
        self.widgets: list[StatusWidget] = []
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        runtime.add_listener(self.poke)

    def add(self, widget: StatusWidget) -> None:
        with self._lock:
            self.widgets.append(widget)
            stale, self.widgets = self.widgets[:-MAX_WIDGETS], self.widgets[-MAX_WIDGETS:]
            if self._thread is None:
                self._stop = False
                self._thread = threading.Thread(
                    target=self._loop, name="singularity-widget", daemon=True
                )
                self._thread.start()
        for widget in stale:
            widget.close()
        self.poke()

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self.runtime.remove_listener(self.poke)

    def _live(self) -> list[StatusWidget]:
        """The open widgets; with none left the thread ends (add() starts a new one)."""
        with self._lock:
            self.widgets = [w for w in self.widgets if w.open]
            if not self.widgets or self._stop:
                self._thread = None
            return list(self.widgets) if self._thread is not None else []

    def _loop(self) -> None:
        while True:
            live = self._live()
            if not live:
                return
            try:
                status = self.runtime.status(timeout=POLL_INTERVAL * 5)
            except (BrokerError, TimeoutError) as err:
                status = {"error": f"the GPU pool does not answer: {err}"}

            def apply(widgets: list[StatusWidget] = live, status: dict = status) -> None:
                for widget in widgets:
                    widget.update(status)

            self.runtime.relay.post("widgets", apply)
            self._wake.wait(self.interval)
            self._wake.clear()


def show_widget(runtime: Runtime) -> StatusWidget:
    """Display a new status widget in the running cell and keep it updated."""
    from IPython.display import display

    widget = StatusWidget(runtime)
    display(widget.box)
    if runtime.widgets is None:
        runtime.widgets = WidgetPoller(runtime)
    runtime.widgets.add(widget)
    return widget
