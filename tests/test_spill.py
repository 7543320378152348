"""Spill files on a real filesystem, alone and under the engine (simulated devices, real torch).

A full disk is produced for real with RLIMIT_FSIZE: writes past the limit fail with EFBIG, the
same failure path as ENOSPC, without mounting anything.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import json
import os
import resource
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cells import cell_messages, cell_text, record_of

from jupyter_singularity.kernel.spill import (
    CHUNK,
    SpillDamaged,
    SpillError,
    SpillFile,
    read_spill,
    write_spill,
)

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

    with pytest.raises(SpillDamaged, match=r"checksum mismatch in spill file .*c\.spill"):
        read_spill(spill, memoryview(bytearray(MIB)))


def test_truncation_is_detected(tmp_path: Path) -> None:
    spill = write_spill(tmp_path, "t.spill", memoryview(pattern(MIB)))
    os.truncate(spill.path, MIB - 10)

    with pytest.raises(SpillDamaged, match=r"t\.spill has 1048566 bytes, expected 1048576"):
        read_spill(spill, memoryview(bytearray(MIB)))


def test_a_flipped_byte_costs_its_piece_only(tmp_path: Path) -> None:
    data = pattern(2 * CHUNK + 5)
    spill = write_spill(tmp_path, "p.spill", memoryview(data))
    assert len(spill.digests) == 3
    flip = CHUNK + 12_345
    with open(spill.path, "r+b") as file:
        file.seek(flip)
        file.write(bytes([data[flip] ^ 0x01]))
    into = bytearray(len(data))

    with pytest.raises(SpillDamaged, match=r"p\.spill \(8388608 of its 16777221 bytes\)") as raised:
        read_spill(spill, memoryview(into))

    assert raised.value.ranges == ((CHUNK, 2 * CHUNK),)
    # Every other piece was read and verified all the same.
    assert into[:CHUNK] == data[:CHUNK] and into[2 * CHUNK :] == data[2 * CHUNK :]
    # Once its data is given up, the damaged piece is no longer checked.
    read_spill(spill.dropping(raised.value.ranges), memoryview(into))
    assert into[:CHUNK] == data[:CHUNK] and into[2 * CHUNK :] == data[2 * CHUNK :]


def test_missing_file_is_damage(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path / "gone.spill", 4, (b"",))
    with pytest.raises(SpillDamaged, match=r"spill file .*gone\.spill is missing"):
        read_spill(spill, memoryview(bytearray(4)))


@contextmanager
def no_new_file_descriptors() -> Iterator[None]:
    """Every open() of this process fails with EMFILE meanwhile: a real failure (root included)
    that passes."""
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)  # the lowest free descriptor: the limit makes it unusable
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_read_that_may_pass_is_not_damage(tmp_path: Path) -> None:
    data = pattern(MIB)
    spill = write_spill(tmp_path, "r.spill", memoryview(data))
    into = bytearray(MIB)

    with no_new_file_descriptors(), pytest.raises(SpillError) as raised:
        read_spill(spill, memoryview(into))

    assert not isinstance(raised.value, SpillDamaged)
    assert raised.value.errno == errno.EMFILE and "cannot read spill file" in str(raised.value)
    read_spill(spill, memoryview(into))  # the cause passed: the same file reads back intact
    assert into == data


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
from jupyter_singularity.kernel.lost import is_lost  # noqa: E402
from jupyter_singularity.kernel.offload import (  # noqa: E402
    HostFullError,
    OffloadError,
    StateDamaged,
    TensorEngine,
)


def raw(tensor: torch.Tensor) -> bytes:
    assert tensor.untyped_storage().nbytes() > 0, "reading a tensor whose memory is gone"
    return ctypes.string_at(tensor.data_ptr(), tensor.numel() * tensor.element_size())


@pytest.fixture
def engine() -> Iterator[TensorEngine]:
    gc.collect()  # tensors of earlier tests that only garbage cycles still hold would move too
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
    engine.offload()
    engine.spill(tmp_path)
    victim = sorted(tmp_path.iterdir())[0]
    original = victim.read_bytes()
    victim.write_bytes(b"\xff" + original[1:])

    with pytest.raises(StateDamaged, match=r"checksum mismatch in spill file .*\.spill"):
        engine.restore()

    assert engine.offloaded and engine.host_bytes == 0 and engine.disk_bytes > 0
    assert all(t.untyped_storage().nbytes() == 0 for t in tensors)
    victim.write_bytes(original)
    # Damage found is damage kept: no later restore reads the files again, discard drops it.
    with pytest.raises(StateDamaged):
        engine.restore()
    damage = engine.discard_damaged()
    engine.restore()
    lost = {storage._cdata for storage, _ in damage.storages}
    assert lost and lost == {t.untyped_storage()._cdata for t in tensors if is_lost(t)}


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


# -- what a damaged spill file lost, in the notebook's names ------------------------------

from jupyter_singularity.kernel.damage import (  # noqa: E402
    describe_lost,
    discarded,
    lost_names,
    restore_failure,
)


class Shell:
    """What the damage report reads of IPython's shell: the user namespace, its hidden names."""

    def __init__(self, **names: object) -> None:
        self.user_ns = dict(names)
        self.user_ns_hidden = {name: names[name] for name in ("In", "Out") if name in names}


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(1024, 1024)  # a 4 MiB weight; the 4 KiB bias never moves

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def flip_byte(path: Path, at: int = 1000) -> None:
    with open(path, "r+b") as file:
        file.seek(at)
        byte = file.read(1)
        file.seek(at)
        file.write(bytes([byte[0] ^ 0xFF]))


def test_the_report_names_what_was_lost_and_what_to_do(tmp_path: Path) -> None:
    gc.collect()
    engine = TensorEngine(simulated=True, pinned_limit=0, min_bytes=MIB)  # one file: all is lost
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 1024)).sum().backward()
    opt.step()
    w = torch.randn(512, 1024)  # 2 MiB
    batch = {"x": torch.randn(256, 1024), "n": 3}
    many = [torch.randn(256, 1024) for _ in range(12)]

    def closure() -> Callable[[], torch.Tensor]:
        hidden = torch.randn(256, 1024)
        return lambda: hidden

    shell = Shell(
        model=model,
        opt=opt,
        w=w,
        top=w[:100],
        batch=batch,
        many=many,
        held=closure(),
        _=w,  # IPython's own names are not the user's
        Out={1: w},
    )
    engine.offload()
    engine.spill(tmp_path)
    [file] = tmp_path.iterdir()
    os.truncate(file, 1000)  # the whole file is lost
    with pytest.raises(StateDamaged) as raised:
        engine.restore()
    damage = raised.value.damage

    named, unnamed = lost_names(damage, shell)

    assert named[:4] == [
        ("model.fc.weight", 4 * MIB),
        ("model.fc.weight.grad", 4 * MIB),
        ("w", 2 * MIB),
        ("top", 2 * MIB),  # a view: the same storage under another name
    ]
    assert named[4:17] == [("batch['x']", MIB)] + [(f"many[{i}]", MIB) for i in range(12)]
    assert named[17:] == [
        ("opt.state[model.fc.weight]['exp_avg']", 4 * MIB),
        ("opt.state[model.fc.weight]['exp_avg_sq']", 4 * MIB),
    ]
    assert unnamed == [MIB]  # held by the closure only

    text = describe_lost(damage, shell)
    assert text.startswith("32.0 MiB: model.fc.weight (4.0 MiB), model.fc.weight.grad (4.0 MiB)")
    assert "many[4] (1.0 MiB), and 9 more, 1 storage(s) of 1.0 MiB that no name" in text

    message = restore_failure(raised.value, engine, shell)
    assert message.startswith("spill file ") and "it was truncated or replaced. Lost" in message
    assert "Lost for good: 32.0 MiB: model.fc.weight (4.0 MiB)" in message
    assert "Intact: 0 B, on disk." in message
    assert "run %singularity discard in a cell of its own" in message
    assert "never reads as zeros" in message and "Restarting the kernel drops everything" in message
    assert "run the cell again" not in message and "disk memory" not in message

    dropped = engine.discard_damaged()
    assert dropped is damage
    text = discarded(dropped, engine, shell)
    assert text.startswith("discarded what the damaged spill file(s) lost: 32.0 MiB: model.fc")
    assert (
        "never reads as zeros" in text
        and "Nothing else of the kernel's state was offloaded" in text
    )
    engine.discard()


def test_the_report_of_a_failure_that_may_pass_says_to_retry(
    engine: TensorEngine, tensors: list[torch.Tensor], tmp_path: Path
) -> None:
    before = [raw(t) for t in tensors]
    engine.offload()
    engine.spill(tmp_path)
    with no_new_file_descriptors(), pytest.raises(OffloadError) as raised:
        engine.restore()

    message = restore_failure(raised.value, engine, Shell())

    assert "Too many open files" in message
    assert "Nothing was lost: the kernel's state is kept on disk" in message
    assert "may pass" in message and "running the cell again retries the restore" in message
    assert "discard" not in message and "disk memory" not in message
    engine.restore()
    assert [raw(t) for t in tensors] == before


# -- a damaged spill file in a real kernel, through the server ----------------------------

# Four plain tensors and a model with Adam state: 48 MiB in 4 MiB storages (the biases and Adam's
# step counts are too small to move). ``digests()`` covers each of them, and says which one
# refuses to be read.
STATE = """
import ctypes, hashlib, json, os, torch
torch.manual_seed(0)

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(1024, 1024)
        self.fc2 = torch.nn.Linear(1024, 1024)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

model = Net()
opt = torch.optim.Adam(model.parameters())
model(torch.randn(8, 1024)).sum().backward()
opt.step()
a, b, c, d = (torch.randn(1024, 1024) for _ in range(4))

NAMES = ["a", "b", "c", "d"] + [
    f"{where}{name}"
    for layer in ("fc1", "fc2")
    for where, name in [
        ("", f"model.{layer}.weight"),
        ("", f"model.{layer}.weight.grad"),
        ("opt.state[", f"model.{layer}.weight]['exp_avg']"),
        ("opt.state[", f"model.{layer}.weight]['exp_avg_sq']"),
    ]
]

def digests():
    out = {}
    for name in NAMES:
        try:
            t = eval(name).detach().contiguous()
            raw = ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())
            out[name] = hashlib.sha256(raw).hexdigest()
        except Exception as err:
            out[name] = type(err).__name__
    return out

print("digests", json.dumps(digests()))
print("pid", os.getpid())
"""

SPILL_CONFIG = {"host_memory_limit": "32MiB"}  # the kernel's 48 MiB host copy goes to disk


def value(text: str, key: str) -> str:
    for line in text.splitlines():
        if line.startswith(key + " "):
            return line[len(key) + 1 :].strip()
    raise AssertionError(f"no {key!r} line in {text!r}")


@pytest.fixture
def singularity_devices() -> str:
    """One device that holds one kernel's state at a time."""
    return "simulated:1x256MiB"


@pytest.fixture
async def spilled_kernel(start_kernel, wait_in_pool, run, state, singularity_app):
    """A kernel whose state another kernel's cell pushed to disk: ``(kernel_id, digests, pid,
    its spill file)``."""
    k1, k2 = await start_kernel(), await start_kernel()
    await wait_in_pool([k1, k2])
    status, out, _ = await run(k1, STATE)
    assert status == "ok", out
    status, out2, _ = await run(k2, "import torch\ny = torch.ones(50 * 2**20 // 4)")
    assert status == "ok", out2
    pool = await state(k1, "spilled")
    assert record_of(pool, k1)["disk_bytes"] >= 48 * MIB
    files = sorted(
        (Path(singularity_app.spill_dir) / k1).glob("*.spill"),
        key=lambda f: int(f.stem.rsplit("-", 1)[1]),
    )
    assert len(files) == 1, files  # simulated devices: no pinned pool, one buffer, one file
    return k1, json.loads(value(out, "digests")), int(value(out, "pid")), files[0]


@pytest.mark.parametrize("singularity_config", [SPILL_CONFIG], indirect=True)
async def test_a_corrupt_spill_file_says_what_was_lost_and_discard_goes_on(
    spilled_kernel, run, get_pool, state
):
    kernel, before, _, file = spilled_kernel
    flip_byte(file, at=20 * MIB)  # in its third 8 MiB piece: two or three storages are lost

    status, out, _ = await run(kernel, "print('ran')")

    assert status == "error" and "ran" not in out
    assert "This cell did not run: restoring the kernel's GPU state failed" in out
    assert "checksum mismatch in spill file" in out and "Lost for good: " in out
    lost = {name for name in before if f"{name} (4.0 MiB)" in out}
    assert lost and lost != set(before), out
    assert "%singularity discard" in out and "never reads as zeros" in out
    assert "Restarting the kernel drops everything" in out
    assert "run the cell again" not in out and "disk memory" not in out
    assert record_of(await get_pool(), kernel)["state"] == "error"
    # Until the damage is dropped, every cell says the same; the magics still answer.
    status, again, _ = await run(kernel, "print('ran')")
    assert status == "error" and "Lost for good" in again
    status, out, _ = await run(kernel, "%singularity status")
    assert status == "ok" and f"kernel {kernel}: error" in out, out

    status, out, _ = await run(kernel, "%singularity discard")

    assert status == "ok", out
    assert out.startswith("discarded what the damaged spill file(s) lost: ")
    assert all(f"{name} (4.0 MiB)" in out for name in lost), out
    assert "never reads as zeros" in out and "comes back with the next cell" in out
    assert f"The rest of the kernel's state ({48 - 4 * len(lost)}.0 MiB, on disk)" in out
    record = record_of(await get_pool(), kernel)
    assert record["state"] in ("offloaded", "spilled"), record
    assert f"This kernel is {record['state']} now." in out
    assert record["disk_bytes"] == 48 * MIB and record["host_bytes"] == 0  # the file stays

    status, out, _ = await run(kernel, "print('digests', json.dumps(digests()))")

    assert status == "ok", out
    after = json.loads(value(out, "digests"))
    for name, digest in before.items():
        assert after[name] == ("LostTensorError" if name in lost else digest), name
    victim = sorted(lost)[0]
    status, out, _ = await run(kernel, f"{victim}.sum()")
    assert status == "error" and "LostTensorError" in out and "data was lost" in out, out
    pool = await state(kernel, "resident", "running")
    assert record_of(pool, kernel)["disk_bytes"] == 0
    assert not file.exists()  # the restore needs it no more


@pytest.mark.parametrize("singularity_config", [SPILL_CONFIG], indirect=True)
async def test_a_read_failure_that_passes_says_a_retry_may_work(
    spilled_kernel, jp_ws_fetch, run, get_pool, state
):
    kernel, before, pid, _ = spilled_kernel
    ws = await jp_ws_fetch("api", "kernels", kernel, "channels")
    try:
        # A cell of magics takes no lease: it proves this websocket's channels are connected.
        status, messages = await cell_messages(ws, "%singularity status")
        assert status == "ok", cell_text(messages)
        # The kernel cannot open any more files (EMFILE): reading its spill files fails for real.
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        open_fds = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        lowest_free = min(set(range(len(open_fds) + 1)) - open_fds)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            status, messages = await cell_messages(ws, "print('ran')")
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    finally:
        ws.close()
    out = cell_text(messages)

    assert status == "error" and "ran" not in out
    assert "This cell did not run: restoring the kernel's GPU state failed" in out
    assert "Too many open files" in out
    assert "Nothing was lost: the kernel's state is kept on disk" in out
    assert "may pass" in out and "running the cell again retries the restore" in out
    assert "discard" not in out and "disk memory" not in out
    assert record_of(await get_pool(), kernel)["state"] == "error"

    status, out, _ = await run(kernel, "print('digests', json.dumps(digests()))")

    assert status == "ok", out
    assert json.loads(value(out, "digests")) == before
    await state(kernel, "resident", "running")
