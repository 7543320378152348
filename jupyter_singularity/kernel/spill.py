"""Spill files: durable, verifiable copies of an offloaded kernel's host buffers on disk.

The spill tier frees host memory, so the host copy may only go once its file is complete: each
file is written under a temporary name, fsynced, renamed into place and its directory fsynced.
Files are private to the kernel's user (0600).

A blake2b digest of each 8 MiB piece, taken while writing, is checked on the way back, so a
corrupted or truncated file is a clear error rather than silently wrong tensors, and a flipped
byte costs the data of its piece, not of the whole file. Reading back fails in two kinds of ways,
told apart by type:

- :class:`SpillDamaged`: the file no longer holds what was written (a checksum mismatch, truncated
  or replaced, missing). Its ``ranges`` are the bytes lost for good; the other pieces were read
  and verified. :meth:`SpillFile.dropping` stops checking pieces whose data is no longer needed.
- a plain :class:`SpillError`: reading failed in a way that may pass (an I/O error, no file
  descriptor or memory left, a permission). The file may be intact; a retry may work.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: Bytes per write/read call and per digest: large enough for full disk bandwidth, small enough to
#: hash in cache and to lose little when one byte goes bad.
CHUNK = 8 << 20

_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file size limit was reached",
}

Ranges = tuple[tuple[int, int], ...]


class SpillError(OSError):
    """A spill file could not be written or read back; its message says which file and why.

    Raised as such, the failure may pass (the file may be intact): retrying may work."""


class SpillDamaged(SpillError):
    """The spill file no longer holds what was written: the bytes in ``ranges`` (start, end) are
    lost, retrying cannot help."""

    def __init__(self, message: str, ranges: Ranges) -> None:
        super().__init__(message)
        self.ranges = ranges


@dataclass(frozen=True)
class SpillFile:
    """One complete spill file and what it must contain."""

    path: Path
    nbytes: int
    digests: tuple[bytes, ...]
    """blake2b digest of each CHUNK of the contents, in order."""
    dropped: frozenset[int] = frozenset()
    """Pieces whose data nothing needs any more (lost to damage): read, not verified."""

    def dropping(self, ranges: Ranges) -> SpillFile:
        """This file, no longer verified where ``ranges`` lie (their data was given up)."""
        pieces = {i for start, end in ranges for i in range(start // CHUNK, -(-end // CHUNK))}
        return dataclasses.replace(self, dropped=self.dropped | pieces)


#: Bytes of each piece's blake2b digest: 128 bits tell corruption apart, no adversary is assumed.
DIGEST_SIZE = 16


def _digest(piece: memoryview) -> bytes:
    return hashlib.blake2b(piece, digest_size=DIGEST_SIZE).digest()


def write_spill(directory: Path, name: str, data: memoryview | Iterable[memoryview]) -> SpillFile:
    """Write ``data`` (one buffer, or the pieces of one in order, each consumed before the next
    is asked for) to ``directory/name`` durably; on any failure no file is left behind."""
    final = directory / name
    temp = directory / f".{name}.{uuid.uuid4().hex}.tmp"
    digests: list[bytes] = []
    hasher = hashlib.blake2b(digest_size=DIGEST_SIZE)
    filled = 0  # bytes of the current CHUNK hashed so far: pieces need not align with CHUNK
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
            offset = 0
            while offset < len(view):
                chunk = view[offset : offset + CHUNK - filled]
                hasher.update(chunk)
                filled += len(chunk)
                if filled == CHUNK:
                    digests.append(hasher.digest())
                    hasher, filled = hashlib.blake2b(digest_size=DIGEST_SIZE), 0
                done = 0
                while done < len(chunk):
                    sent = os.write(fd, chunk[done:])
                    done += sent
                    written += sent
                offset += len(chunk)
        if filled:
            digests.append(hasher.digest())
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
    return SpillFile(path=final, nbytes=written, digests=tuple(digests))


def read_spill(spill: SpillFile, into: memoryview) -> None:
    """Fill ``into`` from ``spill``, verifying its size and each piece's checksum.

    Raises SpillDamaged (with the lost ranges) when the file is missing or not what was written,
    after reading and verifying every other piece; SpillError for failures that may pass."""
    view = into.cast("B")
    if len(view) != spill.nbytes:
        raise SpillError(
            f"spill file {spill.path}: buffer of {len(view)} bytes, expected {spill.nbytes}"
        )
    whole = ((0, spill.nbytes),)
    bad: list[tuple[int, int]] = []
    try:
        with open(spill.path, "rb", buffering=0) as file:
            size = os.fstat(file.fileno()).st_size
            if size != spill.nbytes:
                raise SpillDamaged(
                    f"spill file {spill.path} has {size} bytes, expected {spill.nbytes}: "
                    "it was truncated or replaced",
                    whole,
                )
            for index, start in enumerate(range(0, spill.nbytes, CHUNK)):
                piece = view[start : start + CHUNK]
                _read_exactly(file, piece, spill, start)
                if index not in spill.dropped and _digest(piece) != spill.digests[index]:
                    if bad and bad[-1][1] == start:
                        bad[-1] = (bad[-1][0], start + len(piece))
                    else:
                        bad.append((start, start + len(piece)))
    except SpillError:
        raise
    except FileNotFoundError as exc:
        raise SpillDamaged(
            f"spill file {spill.path} is missing: it was deleted or moved", whole
        ) from exc
    except OSError as exc:
        raise SpillError(
            exc.errno, f"cannot read spill file {spill.path}: {exc.strerror or exc}"
        ) from exc
    if bad:
        lost = sum(end - start for start, end in bad)
        raise SpillDamaged(
            f"checksum mismatch in spill file {spill.path} ({lost} of its {spill.nbytes} bytes): "
            "its contents changed on disk since they were written (corruption); those bytes "
            "cannot be restored",
            tuple(bad),
        )


def _read_exactly(file: io.FileIO, piece: memoryview, spill: SpillFile, start: int) -> None:
    """Fill ``piece``, the bytes of the file from ``start`` on; a short file is damage."""
    done = 0
    while done < len(piece):
        got = file.readinto(piece[done:])
        if not got:
            raise SpillDamaged(
                f"spill file {spill.path} ended early at byte {start + done}", ((0, spill.nbytes),)
            )
        done += got


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
