"""Kernel ids and the spill directories named after them.

A kernel id comes from whoever starts the kernel (``POST /api/kernels`` accepts one), and the broker
makes it a directory name under ``spill_dir`` that it later deletes with everything in it. So an id is
accepted only in the shape kernel managers give (letters, digits, ``-`` and ``_``: no dots, slashes or
NUL bytes), and every path is resolved and checked to stay a direct child of the spill root before it
is used: ``.`` or ``..`` once deleted every kernel's spill files, or the spill root's parent.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

MAX_KERNEL_ID = 128
_KERNEL_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_-]{{0,{MAX_KERNEL_ID - 1}}}")
#: The pid of the kernel process that wrote a spill file, from the file's name (see
#: ``kernel/offload.py``: ``tensors-<pid>-<tag>-<n>.spill``; in-progress files start with a dot).
_WRITER_PID = re.compile(r"\.?tensors-(\d+)-")


class KernelIdError(ValueError):
    """A kernel id that cannot be used (it could name a path outside the kernel's own)."""


def check_kernel_id(kernel_id: object) -> str:
    """``kernel_id`` if it is well formed; else KernelIdError saying what is accepted."""
    if isinstance(kernel_id, str) and _KERNEL_ID.fullmatch(kernel_id):
        return kernel_id
    shown = repr(kernel_id)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise KernelIdError(
        f"invalid kernel id {shown}: use 1 to {MAX_KERNEL_ID} letters, digits, '-' or '_' "
        "(such as a UUID), starting with a letter or digit"
    )


class SpillDirs:
    """The per-kernel directories under one spill root."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def of(self, kernel_id: str) -> Path:
        """The spill directory of ``kernel_id``, guaranteed to be a child of the root."""
        path = self.root / check_kernel_id(kernel_id)
        # The name is checked already; this also holds if the checks above are ever loosened. The
        # folder itself is not resolved: a link there is removed, never followed (see remove).
        if Path(os.path.normpath(path)).parent != Path(os.path.normpath(self.root)):
            raise KernelIdError(f"spill directory of kernel {kernel_id!r} leaves {self.root}")
        return path

    def make_for(self, kernel_id: str, uid: int) -> Path:
        """The spill folder of ``kernel_id``, owned by ``uid`` (mode 0700): a node broker's root
        is shared by every user's kernels, each writes only in its own folder.

        A folder already there and owned by ``uid`` is kept as it is: it holds the spilled state
        of a kernel rejoining a restarted broker. One of another user is never touched: raises
        KernelIdError (somebody registering a kernel id that is not theirs); OSError where the
        folder cannot be made."""
        path = self.of(kernel_id)
        if path.is_symlink():
            path.unlink()  # never follow a link into somebody else's files
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            if path.lstat().st_uid != uid:
                raise KernelIdError(
                    f"kernel id {kernel_id}: its spill folder belongs to another user"
                ) from None
            path.chmod(0o700)
            return path
        if os.stat(path).st_uid != uid:
            os.chown(path, uid, -1)
        return path

    def remove(self, kernel_id: str) -> None:
        """Delete a kernel's spill directory (if any) and its files; raises OSError."""
        path = self.of(kernel_id)
        if path.is_symlink():
            path.unlink()  # never follow a link into somebody else's files
        elif path.exists():
            shutil.rmtree(path)

    def sweep(
        self, keep: Iterable[str], alive: Callable[[int], bool], min_age: float = 0.0
    ) -> list[str]:
        """Remove the directories of kernels that no longer exist; returns their ids.

        A directory is kept when its kernel is in ``keep`` (registered now), when a process that
        wrote one of its files is still ``alive`` (a kernel whose broker restarted, about to
        register again), or when it changed less than ``min_age`` seconds ago. Entries that are
        not kernel directories are left alone.
        """
        kept = set(keep)
        removed = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        for entry in entries:
            try:
                check_kernel_id(entry.name)
            except KernelIdError:
                continue
            if entry.name in kept:
                continue
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                if time.time() - entry.stat(follow_symlinks=False).st_mtime < min_age:
                    continue
                if any(alive(pid) for pid in _writers(Path(entry.path))):
                    continue
            except OSError:
                continue  # gone meanwhile, or unreadable: not ours to judge now
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
        return removed


def _writers(directory: Path) -> set[int]:
    pids = set()
    for name in os.listdir(directory):
        match = _WRITER_PID.match(name)
        if match is not None:
            pids.add(int(match.group(1)))
    return pids
