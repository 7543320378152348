"""Spill files: durable, verifiable copies of an offloaded kernel's host buffers on disk.

The spill tier frees host memory, so the host copy may only go once its file is complete: each
file is written under a temporary name, fsynced, renamed into place and its directory fsynced. A
blake2b digest taken while writing is checked on the way back, so a corrupted or truncated file is
a clear error rather than silently wrong tensors. Files are private to the kernel's user (0600).
"""

from __future__ import annotations

import errno
import hashlib
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: Bytes per write/read call: large enough for full disk bandwidth, small enough to hash in cache.
CHUNK = 8 << 20

_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file size limit was reached",
}


class SpillError(OSError):
    """A spill file could not be written or read back intact; its message says which file and why."""


@dataclass(frozen=True)
class SpillFile:
    """One complete spill file and what it must contain."""

    path: Path
    nbytes: int
    digest: str  # blake2b hex digest of the contents


def write_spill(directory: Path, name: str, data: memoryview | Iterable[memoryview]) -> SpillFile:
    """Write ``data`` (one buffer, or the pieces of one in order, each consumed before the next
    is asked for) to ``directory/name`` durably; on any failure no file is left behind."""
    final = directory / name
    temp = directory / f".{name}.{uuid.uuid4().hex}.tmp"
    digest = hashlib.blake2b()
    fd = -1
    created = False
    written = 0
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        created = True
        os.fchmod(fd, 0o600)  # the umask may only narrow the mode; make it exact
        for piece in [data] if isinstance(data, memoryview) else data:
            view = piece.cast("B")
            for offset in range(0, len(view), CHUNK):
                chunk = view[offset : offset + CHUNK]
                digest.update(chunk)
                done = 0
                while done < len(chunk):
                    sent = os.write(fd, chunk[done:])
                    done += sent
                    written += sent
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temp, final)
        temp = final  # from here on, a failure removes the file under its final name
        _fsync_directory(directory)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        if created:
            temp.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise  # the data could not be produced (a failed device copy): the caller's error
        reason = _REASONS.get(exc.errno or 0, exc.strerror or str(exc))
        if exc.filename is not None and str(exc.filename) not in (str(temp), str(final)):
            reason += f": {exc.filename}"  # the directory, say
        raise SpillError(
            exc.errno, f"cannot write spill file {final} ({written} bytes written): {reason}"
        ) from exc
    return SpillFile(path=final, nbytes=written, digest=digest.hexdigest())


def read_spill(spill: SpillFile, into: memoryview) -> None:
    """Fill ``into`` from ``spill``, verifying its size and checksum."""
    view = into.cast("B")
    if len(view) != spill.nbytes:
        raise SpillError(
            f"spill file {spill.path}: buffer of {len(view)} bytes, expected {spill.nbytes}"
        )
    digest = hashlib.blake2b()
    try:
        with open(spill.path, "rb", buffering=0) as file:
            size = os.fstat(file.fileno()).st_size
            if size != spill.nbytes:
                raise SpillError(
                    f"spill file {spill.path} has {size} bytes, expected {spill.nbytes}: "
                    "it was truncated or replaced"
                )
            offset = 0
            while offset < spill.nbytes:
                got = file.readinto(view[offset : offset + CHUNK])
                if not got:
                    raise SpillError(f"spill file {spill.path} ended early at byte {offset}")
                digest.update(view[offset : offset + got])
                offset += got
    except SpillError:
        raise
    except OSError as exc:
        raise SpillError(
            exc.errno, f"cannot read spill file {spill.path}: {exc.strerror or exc}"
        ) from exc
    if digest.hexdigest() != spill.digest:
        raise SpillError(
            f"checksum mismatch in spill file {spill.path}: its contents changed on disk since they "
            "were written (corruption); the data cannot be restored from it"
        )


def remove_spill(spill: SpillFile) -> None:
    """Delete a spill file that is no longer needed; an already missing file is fine."""
    spill.path.unlink(missing_ok=True)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable: the directory entry must reach the disk too."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
