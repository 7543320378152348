"""A progress bar for long replays, on stderr and only where stderr is a terminal (a script that
reads the output, or a log file, gets none)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .replay import Progress

WIDTH = 30
INTERVAL = 0.1
"""Seconds between two redraws: drawing costs more than a replay step."""


class ProgressBar:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._shown = False

    def __call__(self, label: str, total: int) -> Progress | None:
        """The callback for one replay of ``total`` cells (None where nothing is drawn)."""
        if not self.enabled:
            return None
        last = 0.0

        def update(done: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < INTERVAL and done < total:
                return
            last = now
            filled = WIDTH * done // max(total, 1)
            bar = "#" * filled + "-" * (WIDTH - filled)
            self.stream.write(f"\r{label:<28.28} [{bar}] {done}/{total} cells")
            self.stream.flush()
            self._shown = True

        return update

    def close(self) -> None:
        """Clear the line, so that what is printed next starts clean."""
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
