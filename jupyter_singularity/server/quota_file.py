"""The admin's quota file: loaded at start, watched while the server runs, written by PUT.

The file holds the same mapping as ``SingularityApp.quotas`` (keys ``default``, ``user:NAME``,
``group:NAME``) in YAML. When ``quota_file`` is set it replaces ``quotas`` entirely.

Watching is a stat() poll every two seconds rather than inotify (watchfiles): admins edit such
files with editors that write a new file and rename it over the old one, configuration managers and
Kubernetes ConfigMaps swap symlinks, and home or config directories are often on NFS, where inotify
sees nothing. A poll of one stat() call notices all of these the same way, needs no thread, and a
two-second delay is nothing for a quota change.

A file that turns invalid (a typo, a half-written save) keeps the previous quotas in force; the
error is logged once and shown in ``GET /singularity/api/quotas`` until the file is fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..broker.quotas import QuotaError, Quotas

POLL_INTERVAL = 2.0

_Stamp = tuple[int, int, int] | None


def load_quota_file(path: Path) -> Quotas:
    """Read and validate a quota file; raises QuotaError with a message naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QuotaError(f"quota file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise QuotaError(f"cannot read quota file {str(path)!r}: {err}") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise QuotaError(f"quota file {str(path)!r} is not valid YAML: {err}") from None
    if config is None:  # an empty file: no quotas
        config = {}
    try:
        return Quotas.parse(config)
    except QuotaError as err:
        raise QuotaError(f"quota file {str(path)!r}: {err}") from None


def _stamp(path: Path) -> _Stamp:
    """What changes when the file does: modification time, size and inode (renames)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class QuotaFile:
    """A quota file kept in force: the last valid quotas, the current error, a poll loop.

    Constructing it loads the file and raises :class:`QuotaError` if it is missing or invalid,
    because a server must not start with quotas other than the ones the admin wrote.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        on_change: Callable[[Quotas], None],
        log: logging.Logger,
        interval: float = POLL_INTERVAL,
    ) -> None:
        self.path = Path(path).expanduser()
        self.on_change = on_change
        self.log = log
        self.interval = interval
        self.error: str | None = None
        self._stamp = _stamp(self.path)
        self.quotas = load_quota_file(self.path)
        self._task: asyncio.Task[None] | None = None

    @property
    def source(self) -> str:
        return f"file:{self.path}"

    def check(self) -> bool:
        """Reload the file if it changed since the last look; True when new quotas took effect."""
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            quotas = load_quota_file(self.path)
        except QuotaError as err:
            if str(err) != self.error:
                self.log.error("jupyter-singularity: %s; the previous quotas stay in force", err)
            self.error = str(err)
            return False
        self._apply(quotas)
        self.log.info("jupyter-singularity: quotas reloaded from %s", self.path)
        return True

    def write(self, config: Mapping[str, Any]) -> Quotas:
        """Validate ``config`` and replace the file with it (atomically); it takes effect at once.

        Raises QuotaError for an invalid config (the file is left alone) and OSError when the file
        cannot be written. The admin's comments and layout in the file are not kept.
        """
        quotas = Quotas.parse(config)
        target = self.path.resolve()  # write through a symlink, do not replace it
        header = (
            "# jupyter-singularity quotas, written by PUT /singularity/api/quotas at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
        )
        text = header + yaml.safe_dump(dict(config), sort_keys=True, default_flow_style=False)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as stream:
                stream.write(text)
            with contextlib.suppress(OSError):
                os.chmod(tmp, os.stat(target).st_mode & 0o7777)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._stamp = _stamp(self.path)
        self._apply(quotas)
        self.log.info("jupyter-singularity: quotas written to %s", self.path)
        return quotas

    def _apply(self, quotas: Quotas) -> None:
        self.quotas = quotas
        self.error = None
        self.on_change(quotas)

    # ------------------------------------------------------------------------------ polling

    def start(self) -> None:
        """Poll the file every ``interval`` seconds on the running loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:
                self.log.exception("jupyter-singularity: checking the quota file failed")
