"""The admin's quota file: loaded at start, watched while the server runs, written by PUT.

The file holds the same mapping as ``SingularityApp.quotas`` (keys ``default``, ``user:NAME``,
``group:NAME``) in YAML. When ``quota_file`` is set it replaces ``quotas`` entirely.

Watching is a stat() poll every two seconds rather than inotify (watchfiles): admins edit such
files with editors that write a new file and rename it over the old one, configuration managers and
Kubernetes ConfigMaps swap symlinks, and home or config directories are often on NFS, where inotify
sees nothing. A poll of one stat() call notices all of these the same way, and a two-second delay
is nothing for a quota change.

A file that turns invalid (a typo, a half-written save) keeps the previous quotas in force; the
error is logged once and shown in ``GET /singularity/api/quotas`` until the file is fixed.

Every look at the file (stat included), and the write, runs in a thread of its own, waited for at
most ``READ_TIMEOUT`` seconds: a hung NFS mount must not freeze the server's event loop, and a
thread stuck there must not keep the server from exiting (daemon) nor pile up (one at a time).
Only a regular file is read: opening a FIFO would wait for a writer forever, a device could be
endless.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ..broker.quotas import QuotaError, Quotas

POLL_INTERVAL = 2.0
READ_TIMEOUT = 10.0

_Stamp = tuple[int, int, int] | None
_UNSEEN: _Stamp = (-1, -1, -1)  # equal to no file's stamp
_T = TypeVar("_T")

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def load_quota_file(path: Path) -> Quotas:
    """Read and validate a quota file; raises QuotaError with a message naming the file.

    Blocking (it may wait on the file system): call it off the event loop.
    """
    try:
        # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer; the kind of
        # file is then checked on what was opened, so a swap after a stat() cannot slip through.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise QuotaError(f"quota file {str(path)!r} does not exist") from None
    except OSError as err:
        raise QuotaError(f"cannot read quota file {str(path)!r}: {err}") from None
    with os.fdopen(fd, "rb") as stream:
        mode = os.fstat(stream.fileno()).st_mode
        if not stat.S_ISREG(mode):
            kind = _KINDS.get(stat.S_IFMT(mode), "an unknown kind of file")
            raise QuotaError(
                f"quota file {str(path)!r} is {kind}, not a regular file: nothing is read from it"
            )
        try:
            text = stream.read().decode("utf-8")
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


def _look(path: Path, last: _Stamp) -> tuple[_Stamp, Quotas | QuotaError | None]:
    """The file's stamp, and its quotas (or why not) when the stamp is not ``last``; blocking."""
    stamp = _stamp(path)
    if stamp == last:
        return stamp, None
    try:
        return stamp, load_quota_file(path)
    except QuotaError as err:
        return stamp, err


def _in_thread(function: Callable[..., _T], *args: Any) -> concurrent.futures.Future[_T]:
    """``function(*args)`` in a daemon thread of its own: a call stuck on a hung file system
    neither holds the server's exit (an executor's threads would) nor takes a shared worker."""
    future: concurrent.futures.Future[_T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function(*args))
        except BaseException as err:
            future.set_exception(err)

    threading.Thread(target=run, name="singularity-quota-file", daemon=True).start()
    return future


class QuotaFile:
    """A quota file kept in force: the last valid quotas, the current error, a poll loop.

    Constructing it loads the file and raises :class:`QuotaError` if it is missing, invalid or
    does not answer within ``read_timeout``, because a server must not start with quotas other
    than the ones the admin wrote.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        on_change: Callable[[Quotas], None],
        log: logging.Logger,
        interval: float = POLL_INTERVAL,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.path = Path(path).expanduser()
        self.on_change = on_change
        self.log = log
        self.interval = interval
        self.read_timeout = read_timeout
        self._file_error: str | None = None
        self._stuck: str | None = None
        self._looking: concurrent.futures.Future | None = None
        self._task: asyncio.Task[None] | None = None
        try:
            self._stamp, loaded = _in_thread(_look, self.path, _UNSEEN).result(read_timeout)
        except concurrent.futures.TimeoutError:
            raise QuotaError(self._no_answer("reading")) from None
        if isinstance(loaded, QuotaError):
            raise loaded
        assert loaded is not None
        self.quotas = loaded

    @property
    def source(self) -> str:
        return f"file:{self.path}"

    @property
    def error(self) -> str | None:
        """Why the quotas in force may not be the file's: it is invalid, or does not answer."""
        return self._stuck or self._file_error

    def _no_answer(self, doing: str) -> str:
        return (
            f"{doing} quota file {str(self.path)!r} did not finish within {self.read_timeout:g} s "
            "(a hung file system?)"
        )

    def _report(self, error: str) -> None:
        if error != self.error:
            self.log.error("jupyter-singularity: %s; the previous quotas stay in force", error)

    async def check(self) -> bool:
        """Reload the file if it changed since the last look; True when new quotas took effect.

        The look runs off the event loop; while an earlier one is still stuck, none is started.
        """
        if self._looking is None or self._looking.done():
            self._looking = _in_thread(_look, self.path, self._stamp)
        try:
            stamp, loaded = await self._wait(self._looking)
        except TimeoutError:
            message = self._no_answer("reading")
            self._report(message)
            self._stuck = message
            return False
        self._stuck = None
        self._stamp = stamp
        if isinstance(loaded, QuotaError):
            self._report(str(loaded))
            self._file_error = str(loaded)
            return False
        if loaded is None:
            return False
        self._apply(loaded)
        self.log.info("jupyter-singularity: quotas reloaded from %s", self.path)
        return True

    async def write(self, config: Mapping[str, Any]) -> Quotas:
        """Validate ``config`` and replace the file with it (atomically); it takes effect at once.

        Raises QuotaError for an invalid config (the file is left alone) and OSError when the file
        cannot be written, or the write does not finish within ``read_timeout``. The admin's
        comments and layout in the file are not kept.
        """
        quotas = Quotas.parse(config)
        header = (
            "# jupyter-singularity quotas, written by PUT /singularity/api/quotas at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
        )
        text = header + yaml.safe_dump(dict(config), sort_keys=True, default_flow_style=False)
        try:
            self._stamp = await self._wait(_in_thread(_replace, self.path, text))
        except TimeoutError:
            raise OSError(self._no_answer("writing")) from None
        self._apply(quotas)
        self.log.info("jupyter-singularity: quotas written to %s", self.path)
        return quotas

    async def _wait(self, future: concurrent.futures.Future[_T]) -> _T:
        """The thread's result; TimeoutError after ``read_timeout`` (the thread goes on alone).

        Not asyncio.wait_for: before Python 3.12 it swallows a cancellation that comes as the
        result does, and the poll task then never stops.
        """
        waiter = asyncio.wrap_future(future)
        try:
            done, _ = await asyncio.wait({waiter}, timeout=self.read_timeout)
        finally:
            if not waiter.done():
                waiter.cancel()  # nothing left waiting for a result the loop may outlive
        if not done:
            raise TimeoutError
        return waiter.result()

    def _apply(self, quotas: Quotas) -> None:
        self.quotas = quotas
        self._file_error = None
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
                await self.check()
            except Exception:
                self.log.exception("jupyter-singularity: checking the quota file failed")


def _replace(path: Path, text: str) -> _Stamp:
    """Write ``text`` to a new file beside ``path``'s target and rename it over; blocking. A
    symlink at ``path`` is written through, not replaced. Returns the new stamp."""
    target = path.resolve()
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
    return _stamp(path)
