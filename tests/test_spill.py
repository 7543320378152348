"""Spill files on a real filesystem, alone and under the engine (simulated devices, real torch).

A full disk is produced for real with RLIMIT_FSIZE: writes past the limit fail with EFBIG, the
same failure path as ENOSPC, without mounting anything.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from jupyter_singularity.kernel.spill import SpillError, SpillFile, read_spill, write_spill

MIB = 1 << 20


@contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """Files of this process may not grow past ``nbytes`` (EFBIG instead of SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def pattern(n: int) -> bytes:
    return bytes((i * 7 + i // 251) % 256 for i in range(n))


def test_round_trip(tmp_path: Path) -> None:
    data = pattern(3 * MIB + 5)  # several write chunks and a ragged end
    spill = write_spill(tmp_path / "spill", "state-0.spill", memoryview(data))

    assert spill.path == tmp_path / "spill" / "state-0.spill"
    assert spill.nbytes == len(data) and spill.path.stat().st_size == len(data)
    into = bytearray(len(data))
    read_spill(spill, memoryview(into))
    assert into == data
    assert os.listdir(tmp_path / "spill") == ["state-0.spill"]  # no temporary file left


def test_files_are_private(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        spill = write_spill(tmp_path / "new", "a.spill", memoryview(b"secret"))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(spill.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700


def test_corruption_is_detected(tmp_path: Path) -> None:
    data = pattern(MIB)
    spill = write_spill(tmp_path, "c.spill", memoryview(data))
    with open(spill.path, "r+b") as file:
        file.seek(123_456)
        file.write(bytes([data[123_456] ^ 0x01]))

    with pytest.raises(SpillError, match=r"checksum mismatch in spill file .*c\.spill"):
        read_spill(spill, memoryview(bytearray(MIB)))


def test_truncation_is_detected(tmp_path: Path) -> None:
    spill = write_spill(tmp_path, "t.spill", memoryview(pattern(MIB)))
    os.truncate(spill.path, MIB - 10)

    with pytest.raises(SpillError, match=r"t\.spill has 1048566 bytes, expected 1048576"):
        read_spill(spill, memoryview(bytearray(MIB)))


def test_missing_file_is_a_spill_error(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path / "gone.spill", 4, "0" * 128)
    with pytest.raises(SpillError, match=r"cannot read spill file .*gone\.spill"):
        read_spill(spill, memoryview(bytearray(4)))


def test_full_disk_leaves_no_partial_file(tmp_path: Path) -> None:
    with file_size_limit(MIB), pytest.raises(SpillError) as raised:
        write_spill(tmp_path, "big.spill", memoryview(pattern(3 * MIB)))

    message = str(raised.value)
    assert "cannot write spill file" in message and "big.spill" in message
    assert "file size limit" in message and "(1048576 bytes written)" in message
    assert os.listdir(tmp_path) == []


# -- the engine's spill tier ---------------------------------------------------------------

torch = pytest.importorskip("torch")

from jupyter_singularity.kernel import offload  # noqa: E402
from jupyter_singularity.kernel.offload import (  # noqa: E402
    HostFullError,
    OffloadError,
    TensorEngine,
)


def raw(tensor: torch.Tensor) -> bytes:
    assert tensor.untyped_storage().nbytes() > 0, "reading a tensor whose memory is gone"
    return ctypes.string_at(tensor.data_ptr(), tensor.numel() * tensor.element_size())


@pytest.fixture
def engine() -> Iterator[TensorEngine]:
    engine = TensorEngine(simulated=True, pinned_limit=4 * MIB, min_bytes=64 << 10)
    yield engine
    if engine.offloaded:  # a failed test must not leave this process's tensors empty
        engine.restore()
    engine.discard()


@pytest.fixture
def tensors() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(n, 1024, generator=generator) for n in (1024, 512, 256)]


def test_engine_spills_and_restores(
    engine: TensorEngine, tensors: list[torch.Tensor], tmp_path: Path
) -> None:
    before = [raw(t) for t in tensors]
    engine.offload()
    host = engine.host_bytes

    written = engine.spill(tmp_path)

    assert written == host == engine.disk_bytes and engine.host_bytes == 0
    assert engine.pool_bytes == 0  # the pool is host memory too: it goes with the copies
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2  # the 4 MiB pool buffer and the pageable rest
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert engine.spill(tmp_path) == 0  # already on disk
    seen: list[tuple[int, int]] = []

    restored = engine.restore(lambda done, total: seen.append((done, total)))

    assert [raw(t) for t in tensors] == before
    assert restored.nbytes >= 7 * MIB
    assert seen[-1] == (restored.nbytes + written, restored.nbytes + written)
    assert list(tmp_path.iterdir()) == []
    assert (engine.disk_bytes, engine.host_bytes, engine.pool_bytes) == (0, 0, 4 * MIB)


def test_a_frozen_process_spills_all_but_its_pool(
    engine: TensorEngine, tensors: list[torch.Tensor], tmp_path: Path
) -> None:
    before = [raw(t) for t in tensors]
    engine.offload()
    host = engine.host_bytes

    # The driver holds the process checkpointed: its pinned pool cannot be freed now.
    written = engine.spill(tmp_path, keep_pool=True)

    assert written == host - 4 * MIB == engine.disk_bytes
    assert (engine.host_bytes, engine.pool_bytes) == (4 * MIB, 4 * MIB)
    assert len(list(tmp_path.iterdir())) == 1
    assert engine.spill(tmp_path, keep_pool=True) == 0  # nothing more can move
    engine.restore()
    assert [raw(t) for t in tensors] == before
    assert list(tmp_path.iterdir()) == [] and engine.pool_bytes == 4 * MIB


def test_a_partly_used_pool_chunk_comes_back_whole(engine: TensorEngine, tmp_path: Path) -> None:
    tensor = torch.randn(768, 1024)  # 3 MiB: part of the 4 MiB pool chunk
    before = raw(tensor)
    assert engine.prepare(4 * MIB) == 4 * MIB
    engine.offload()
    assert engine.spill(tmp_path) == 3 * MIB  # only the used part is written

    engine.restore()

    assert raw(tensor) == before
    assert engine.pool_bytes == 4 * MIB  # the whole chunk, ready for the next offload


def test_engine_spill_failure_keeps_the_host_copy(
    engine: TensorEngine, tensors: list[torch.Tensor], tmp_path: Path
) -> None:
    before = [raw(t) for t in tensors]
    engine.offload()
    host = engine.host_bytes

    with file_size_limit(2 * MIB), pytest.raises(OffloadError, match="host copy is kept"):
        engine.spill(tmp_path)

    assert engine.host_bytes == host and engine.disk_bytes == 0
    assert list(tmp_path.iterdir()) == []
    engine.restore()
    assert [raw(t) for t in tensors] == before


def test_engine_restore_from_a_corrupted_spill_fails_clearly(
    engine: TensorEngine, tensors: list[torch.Tensor], tmp_path: Path
) -> None:
    before = [raw(t) for t in tensors]
    engine.offload()
    engine.spill(tmp_path)
    victim = sorted(tmp_path.iterdir())[0]
    original = victim.read_bytes()
    victim.write_bytes(b"\xff" + original[1:])

    with pytest.raises(OffloadError, match=r"checksum mismatch in spill file .*\.spill"):
        engine.restore()

    assert engine.offloaded and engine.host_bytes == 0 and engine.disk_bytes > 0
    assert all(t.untyped_storage().nbytes() == 0 for t in tensors)
    victim.write_bytes(original)  # the disk is repaired: the state comes back after all
    engine.restore()
    assert [raw(t) for t in tensors] == before


# -- offloads bounded by the host budget ----------------------------------------------------


def host_allocations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every host buffer the engine allocates from now on."""
    sizes: list[int] = []
    real = offload._allocate_host

    def allocate(nbytes: int, pinned: bool) -> torch.Tensor:
        sizes.append(nbytes)
        return real(nbytes, pinned)

    monkeypatch.setattr(offload, "_allocate_host", allocate)
    return sizes


def test_an_offload_keeps_its_host_limit_and_writes_the_rest_straight_to_disk(
    engine: TensorEngine,
    tensors: list[torch.Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = [raw(t) for t in tensors]
    limit = 5 * MIB + 12_345  # within a storage: it is split between memory and disk
    allocated = host_allocations(monkeypatch)

    engine.offload(host_limit=limit, directory=tmp_path)

    assert 0 < engine.host_bytes <= limit and engine.disk_bytes > 0
    assert engine.host_bytes + engine.disk_bytes >= 7 * MIB
    assert sum(allocated) <= limit  # the disk part never passed through host memory
    assert all(t.untyped_storage().nbytes() == 0 for t in tensors)
    (file,) = tmp_path.iterdir()
    assert file.stat().st_size == engine.disk_bytes and stat.S_IMODE(file.stat().st_mode) == 0o600
    engine.restore()
    assert [raw(t) for t in tensors] == before
    assert list(tmp_path.iterdir()) == []


def test_a_partly_spilled_offload_can_spill_the_rest_and_come_back(
    engine: TensorEngine, tensors: list[torch.Tensor], tmp_path: Path
) -> None:
    before = [raw(t) for t in tensors]
    engine.offload(host_limit=3 * MIB, directory=tmp_path / "k")
    disk = engine.disk_bytes

    assert engine.spill(tmp_path / "k") == engine.disk_bytes - disk > 0  # the broker asks later
    assert engine.host_bytes == 0 and len(list((tmp_path / "k").iterdir())) >= 2
    engine.restore()
    assert [raw(t) for t in tensors] == before
    assert list((tmp_path / "k").iterdir()) == []


def test_an_offload_without_host_room_goes_to_disk_whole(
    engine: TensorEngine, tensors: list[torch.Tensor], tmp_path: Path
) -> None:
    before = [raw(t) for t in tensors]
    engine.offload(host_limit=0, directory=tmp_path)
    assert engine.host_bytes == 0 and engine.disk_bytes >= 7 * MIB
    engine.restore()
    assert [raw(t) for t in tensors] == before


@pytest.mark.parametrize("host_limit", [0, 150_001])
def test_storages_of_odd_sizes_go_to_disk_and_come_back(
    engine: TensorEngine, tmp_path: Path, host_limit: int
) -> None:
    """Storages start at aligned places on the tape: the gaps between them are written too."""
    generator = torch.Generator().manual_seed(5)
    odd = [
        torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator)
        for n in (100_003, 70_001, 250_007)
    ]
    before = [raw(t) for t in odd]
    engine.offload(host_limit=host_limit, directory=tmp_path)
    assert engine.host_bytes <= host_limit and engine.disk_bytes > 0
    engine.restore()
    assert [raw(t) for t in odd] == before


@pytest.mark.parametrize("where", ["full disk", "not a directory", "no directory"])
def test_an_offload_the_disk_cannot_take_changes_nothing(
    engine: TensorEngine, tensors: list[torch.Tensor], tmp_path: Path, where: str
) -> None:
    before = [raw(t) for t in tensors]
    (tmp_path / "file").write_bytes(b"")
    directory = {
        "full disk": tmp_path / "spill",
        "not a directory": tmp_path / "file" / "spill",
        "no directory": None,
    }[where]
    expected = {
        "full disk": r"cannot write spill file .*\.spill \(\d+ bytes written\): the file size limit",
        "not a directory": r"cannot write spill file .*file/spill/",
        "no directory": r"^no spill directory is configured \(spill_dir\)$",
    }[where]

    with file_size_limit(2 * MIB), pytest.raises(HostFullError, match=expected):
        engine.offload(host_limit=MIB, directory=directory)

    assert not engine.offloaded and engine.host_bytes == engine.disk_bytes == 0
    assert [raw(t) for t in tensors] == before  # still on the device, intact
    assert sorted(p.name for p in tmp_path.rglob("*")) in (["file"], ["file", "spill"])
    assert not any((tmp_path / "spill").iterdir()) if (tmp_path / "spill").exists() else True
    engine.offload(host_limit=None)  # the next offload, with room, works
    engine.restore()
    assert [raw(t) for t in tensors] == before


BOUNDED_SCRIPT = """
import resource, sys
from pathlib import Path
import torch
from jupyter_singularity.kernel.offload import TensorEngine
state = [torch.full((64 << 20,), i, dtype=torch.uint8) for i in range(4)]  # 256 MiB
engine = TensorEngine(simulated=True, pinned_limit=0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
engine.offload(host_limit=int(sys.argv[2]), directory=Path(sys.argv[1]))
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
disk = engine.disk_bytes
engine.restore()
print(disk, grown * 1024, all(bool((t == i).all()) for i, t in enumerate(state)))
"""


@pytest.mark.parametrize("host_limit", [0, 64 * MIB])
def test_the_memory_an_offload_uses_beyond_its_host_limit_stays_small(
    tmp_path: Path, host_limit: int
) -> None:
    """In a process of its own, so that its peak resident memory is the offload's."""
    result = subprocess.run(
        [sys.executable, "-c", BOUNDED_SCRIPT, str(tmp_path), str(host_limit)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    disk, grown, intact = result.stdout.split()
    assert intact == "True" and int(disk) >= 256 * MIB - host_limit
    # A host copy of the 256 MiB state would grow it by 256 MiB; the spill file's write buffers
    # and checksum take a few MiB.
    assert int(grown) <= host_limit + 16 * MIB, result.stdout


DISCARD_SCRIPT = """
import sys
from pathlib import Path
import torch
from jupyter_singularity.kernel.offload import TensorEngine
kept = [torch.randn(1024, 1024) for _ in range(3)]
engine = TensorEngine(simulated=True, pinned_limit=4 << 20)
engine.offload()
engine.spill(Path(sys.argv[1]))
print(len(list(Path(sys.argv[1]).iterdir())))
engine.discard()
print(engine.offloaded, engine.disk_bytes, engine.host_bytes, engine.pool_bytes)
"""


def test_discard_deletes_spill_files(tmp_path: Path) -> None:
    """In a process of its own: a kernel that ends offloaded leaves its tensors empty."""
    spill_dir = tmp_path / "spill"
    result = subprocess.run(
        [sys.executable, "-c", DISCARD_SCRIPT, str(spill_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert result.stdout.split("\n")[:2] == ["2", "False 0 0 0"]
    assert list(spill_dir.iterdir()) == []
