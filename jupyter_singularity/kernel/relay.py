"""Widget updates from background threads, run on the kernel's main thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class MainThreadRelay:
    """Runs callables on the kernel's main thread: widget updates must not come from other threads.

    Updates posted from background threads are coalesced by key and run by the kernel's event loop
    when it is idle, or by a waiting cell (whose loop polls :meth:`run_pending`) while it waits.
    Outside ipykernel (no event loop) they run at once.
    """

    def __init__(self, shell: Any) -> None:
        self._shell = shell
        self._lock = threading.Lock()
        self._pending: dict[str, Callable[[], None]] = {}
        self._scheduled = False

    def post(self, key: str, fn: Callable[[], None]) -> None:
        if threading.current_thread() is threading.main_thread():
            self._run(fn)
            return
        loop = getattr(getattr(self._shell, "kernel", None), "io_loop", None)
        if loop is None:
            self._run(fn)
            return
        with self._lock:
            self._pending[key] = fn
            schedule, self._scheduled = not self._scheduled, True
        if schedule:
            loop.add_callback(self.run_pending)

    def run_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._scheduled = False
        for fn in pending.values():
            self._run(fn)

    @staticmethod
    def _run(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("jupyter-singularity: UI update failed")
