"""Where the pool's quotas come from: the admin's quota file, or the quotas setting.

With a quota file, it is watched (a change takes effect within seconds) and ``PUT /quotas``
rewrites it; without one, ``PUT /quotas`` replaces the quotas in memory until the next start.
Either way the new quotas apply to every user of the pool at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .quota_file import QuotaFile
from .quotas import Quotas


class QuotaSource:
    """The quotas in force, their source and the quota file's error (see the module docstring)."""

    def __init__(self, quotas: Quotas, file: QuotaFile | None = None) -> None:
        self.quotas = quotas
        self.file = file
        self.on_change: Callable[[Quotas], None] = lambda quotas: None
        """Called with the new quotas whenever they change (the broker service's set_quotas)."""
        if file is not None:
            file.on_change = self._changed

    @property
    def source(self) -> str:
        return "config" if self.file is None else self.file.source

    @property
    def error(self) -> str | None:
        return None if self.file is None else self.file.error

    async def replace(self, config: dict[str, Any]) -> None:
        """Validate, then write the quota file if there is one, else keep them in memory.

        Raises QuotaError (invalid: nothing changed) or OSError (the file cannot be written)."""
        if self.file is not None:
            await self.file.write(config)
        else:
            self._changed(Quotas.parse(config))

    def start(self) -> None:
        if self.file is not None:
            self.file.start()

    async def stop(self) -> None:
        if self.file is not None:
            await self.file.stop()

    def _changed(self, quotas: Quotas) -> None:
        self.quotas = quotas
        self.on_change(quotas)
