"""Tensor tier on simulated devices: real torch CPU tensors are the device state.

Every CPU storage of at least ``min_bytes`` in this process is moved, so references are kept as
Python ``bytes`` (which the engine cannot touch), never as tensors.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import gc
import os
from collections.abc import Callable, Iterator
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from test_spill import no_new_file_descriptors  # noqa: E402

from jupyter_singularity.kernel import offload  # noqa: E402
from jupyter_singularity.kernel.lost import LostTensorError, is_lost  # noqa: E402
from jupyter_singularity.kernel.offload import (  # noqa: E402
    HostFullError,
    OffloadError,
    StateDamaged,
    TensorEngine,
    Transfer,
    UnsafeStateError,
)

MIB = 1 << 20
MIN_BYTES = 64 << 10


def raw(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes, bit for bit (NaN payloads, -0.0 and bfloat16 included)."""
    flat = tensor.detach().contiguous()
    nbytes = flat.numel() * flat.element_size()
    end = flat.storage_offset() * flat.element_size() + nbytes
    assert flat.untyped_storage().nbytes() >= end, "reading a tensor whose memory is gone"
    return ctypes.string_at(flat.data_ptr(), nbytes)


def random_bits(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Arbitrary bit patterns of ``dtype``: every value the type can hold, not only tame ones."""
    generator = torch.Generator().manual_seed(seed)
    size = torch.empty(0, dtype=dtype).element_size()
    return torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=generator).view(dtype)


def fail_on_call(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    nth: int,
    when: Callable[..., bool] = lambda *a: True,
) -> None:
    """Make offload.<name> raise on its nth call that matches ``when``; other calls are real."""
    real = getattr(offload, name)
    calls = 0

    def failing(*args: object) -> object:
        nonlocal calls
        if when(*args):
            calls += 1
            if calls == nth:
                raise RuntimeError(f"injected failure in {name}")
        return real(*args)

    monkeypatch.setattr(offload, name, failing)


def growing(_storage: object, nbytes: int) -> bool:
    return nbytes > 0


def shrinking(_storage: object, nbytes: int) -> bool:
    return nbytes == 0


@pytest.fixture
def engine() -> Iterator[TensorEngine]:
    engine = TensorEngine(simulated=True, pinned_limit=256 * MIB, min_bytes=MIN_BYTES)
    yield engine
    if engine.offloaded:  # a failed test must not leave this process's tensors empty
        engine.restore()
    engine.discard()


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(256, 512)  # 512 KiB weight; its 2 KiB bias is below MIN_BYTES
        self.second = torch.nn.Linear(512, 256)
        self.register_buffer("table", torch.randn(128, 512))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x))) + self.table.mean()


def test_same_objects_and_data_after_restore(engine: TensorEngine) -> None:
    torch.manual_seed(0)
    net = Net()
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.randn(64, 256)).square().mean().backward()
    optimizer.step()  # Adam state exists now
    optimizer.zero_grad(set_to_none=True)
    twin, batch = copy.deepcopy(net), torch.randn(64, 256)
    for model in (net, twin):  # net's fresh gradients are never seen by Python before the offload
        model(batch).square().mean().backward()
    state = optimizer.state[net.first.weight]
    base = torch.randn(512, 512)
    view = base[100:300, 7:]
    alias = base.detach()
    in_dict = {"key": torch.randn(300, 300)}
    in_list = [torch.randn(300, 300)]

    def closure() -> Callable[[], torch.Tensor]:
        hidden = torch.randn(300, 300)
        return lambda: hidden

    get_hidden = closure()
    objects = {
        "weight": net.first.weight,
        "table": net.table,
        "exp_avg": state["exp_avg"],
        "exp_avg_sq": state["exp_avg_sq"],
        "view": view,
        "alias": alias,
        "dict": in_dict["key"],
        "list": in_list[0],
        "closure": get_hidden(),
    }
    before = {name: raw(t) for name, t in objects.items()}
    grad_before = raw(twin.first.weight.grad)

    transfer = engine.offload()

    assert engine.offloaded
    for name, tensor in {**objects, "grad": net.first.weight.grad}.items():
        assert tensor.untyped_storage().nbytes() == 0, name
    assert net.first.bias.untyped_storage().nbytes() == 512 * 4  # below min_bytes: stays
    assert engine.device_bytes() == 0
    assert engine.host_bytes >= transfer.nbytes > 0

    restored = engine.restore()

    assert not engine.offloaded and engine.host_bytes == 0
    assert (restored.nbytes, restored.storages) == (transfer.nbytes, transfer.storages)
    assert net.first.weight is objects["weight"] and net.table is objects["table"]
    assert optimizer.state[net.first.weight]["exp_avg"] is objects["exp_avg"]
    assert in_dict["key"] is objects["dict"] and in_list[0] is objects["list"]
    assert get_hidden() is objects["closure"]
    assert {name: raw(t) for name, t in objects.items()} == before
    assert raw(net.first.weight.grad) == grad_before


def test_views_and_aliases_share_memory_after_restore(engine: TensorEngine) -> None:
    base = torch.zeros(1024, 1024)
    rows = base[10:20]
    transposed = base.t()
    alias = base.detach()
    storage_alone = torch.ones(512, 512).untyped_storage()  # only the storage object is alive

    engine.offload()
    assert storage_alone.nbytes() == 0
    engine.restore()

    rows[0, 5] = 7.0
    assert base[10, 5].item() == 7.0
    assert transposed[5, 10].item() == 7.0
    assert alias[10, 5].item() == 7.0
    alias[0, 0] = 3.0
    assert base[0, 0].item() == 3.0
    assert rows.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    assert storage_alone.nbytes() == 512 * 512 * 4
    assert torch.empty(0).set_(storage_alone).eq(1).all()


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.int64,
        torch.complex64,
    ],
)
def test_bit_identical(engine: TensorEngine, dtype: torch.dtype) -> None:
    tensors = [random_bits(300_000, dtype, seed) for seed in range(3)]
    flags = torch.rand(2 * MIB, generator=torch.Generator().manual_seed(9)) > 0.5
    before = [raw(t) for t in [*tensors, flags]]

    engine.offload()
    assert all(t.untyped_storage().nbytes() == 0 for t in [*tensors, flags])
    engine.restore()

    assert [raw(t) for t in [*tensors, flags]] == before
    assert flags.dtype == torch.bool and tensors[0].dtype == dtype


def test_sparse_tensor_moves_and_comes_back(engine: TensorEngine) -> None:
    dense = torch.randn(512, 512) * (torch.rand(512, 512) > 0.3)
    sparse = dense.to_sparse()
    before = raw(sparse.to_dense())
    del dense

    engine.offload()
    assert sparse._values().untyped_storage().nbytes() == 0
    engine.restore()

    assert raw(sparse.to_dense()) == before


def train(offload_engine: TensorEngine | None) -> list[bytes]:
    """Four Adam steps on a fixed seed, optionally offloading and restoring before each step."""
    torch.manual_seed(1234)
    net = Net()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    data = torch.randn(8, 64, 256, generator=torch.Generator().manual_seed(5))
    for step in range(4):
        if offload_engine is not None:
            offload_engine.offload()
            assert net.first.weight.untyped_storage().nbytes() == 0
            offload_engine.restore()
        optimizer.zero_grad()
        net(data[step]).square().mean().backward()
        optimizer.step()
    return [raw(p) for p in net.parameters()]


def test_training_after_restore_equals_training_without(engine: TensorEngine) -> None:
    assert train(engine) == train(None)


def test_a_simulated_offload_frees_each_storage_once_copied(
    engine: TensorEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated device memory is host memory: each storage goes as soon as its copy is done, so
    the next copy faults in the pages just freed and the state is never held twice."""
    tensors = [torch.randn(256, 1024) for _ in range(4)]
    before = [raw(t) for t in tensors]
    keys = {t.untyped_storage()._cdata: index for index, t in enumerate(tensors)}
    events: list[str] = []
    real_copy, real_resize = offload._copy, offload._resize

    def copy_(dst: torch.Tensor, src: torch.Tensor, *rest: bool) -> None:
        events.append(f"copy {keys.get(src.untyped_storage()._cdata)}")
        real_copy(dst, src, *rest)

    def resize(storage: torch.UntypedStorage, nbytes: int) -> None:
        events.append(f"free {keys.get(storage._cdata)}" if nbytes == 0 else "grow")
        real_resize(storage, nbytes)

    monkeypatch.setattr(offload, "_copy", copy_)
    monkeypatch.setattr(offload, "_resize", resize)
    engine.offload()

    order = sorted(keys.values(), key=lambda index: events.index(f"copy {index}"))
    assert events == [f"{step} {index}" for index in order for step in ("copy", "free")]
    engine.restore()
    assert [raw(t) for t in tensors] == before


def resident_bytes(address: int, nbytes: int) -> int:
    """Bytes of a mapping that sit in memory now (mincore)."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = address // page * page
    pages = -(-(address + nbytes - start) // page)
    vector = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(start, pages * page, vector) == 0, os.strerror(ctypes.get_errno())
    return sum(byte & 1 for byte in vector) * page


def test_a_simulated_restore_gives_each_host_copy_back_once_refilled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The host copy of each storage refilled leaves memory at once (whole large pages), so the
    next storage's device memory reuses its pages and the restore never holds the state twice."""
    engine = TensorEngine(simulated=True, pinned_limit=0, min_bytes=MIN_BYTES)
    tensors = [random_bits(MIB, torch.float32, seed) for seed in range(4)]  # 4 MiB each
    before = [raw(t) for t in tensors]
    engine.offload()
    try:
        (buffer,) = engine._tape.buffers
        address, nbytes = buffer.tensor.data_ptr(), buffer.used
        assert resident_bytes(address, nbytes) == nbytes
        resident: list[int] = []
        real_copy = offload._copy

        def copy_(dst: torch.Tensor, src: torch.Tensor, *rest: bool) -> None:
            resident.append(resident_bytes(address, nbytes))
            real_copy(dst, src, *rest)

        monkeypatch.setattr(offload, "_copy", copy_)
        engine.restore()
    finally:
        if engine.offloaded:
            monkeypatch.undo()
            engine.restore()
    assert resident[0] == nbytes
    assert resident[-1] <= nbytes - 3 * 4 * MIB + 2 * MIB  # three, in whole large pages
    assert [raw(t) for t in tensors] == before


@pytest.mark.parametrize("stop", ["device-allocation-fails", "room-revoked"])
def test_a_failed_simulated_restore_keeps_the_host_copy_it_gave_back(
    monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    engine = TensorEngine(simulated=True, pinned_limit=0, min_bytes=MIN_BYTES)
    tensors = [random_bits(MIB, torch.float32, seed) for seed in range(4)]  # 4 MiB each
    before = [raw(t) for t in tensors]
    engine.offload()

    def room(nbytes: int) -> None:
        if nbytes > 3 * 4 * MIB:
            raise RuntimeError("room revoked")

    if stop == "device-allocation-fails":
        fail_on_call(monkeypatch, "_resize", 4, growing)
    with pytest.raises(OffloadError, match="stays offloaded with its host copy"):
        engine.restore(room=room if stop == "room-revoked" else None)

    assert engine.offloaded
    assert [t.untyped_storage().nbytes() for t in tensors] == [0] * 4
    monkeypatch.undo()
    engine.restore()
    assert [raw(t) for t in tensors] == before


def test_failed_copy_during_offload_changes_nothing(
    engine: TensorEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = [torch.randn(256, 1024) for _ in range(4)]
    before = [raw(t) for t in tensors]
    fail_on_call(monkeypatch, "_copy", 3)

    with pytest.raises(OffloadError, match="injected failure in _copy"):
        engine.offload()

    assert not engine.offloaded
    assert (engine.host_bytes, engine.pool_bytes) == (0, 0)
    assert [t.untyped_storage().nbytes() for t in tensors] == [MIB] * 4
    assert [raw(t) for t in tensors] == before
    monkeypatch.undo()
    engine.offload()
    engine.restore()
    assert [raw(t) for t in tensors] == before


def test_failed_host_allocation_changes_nothing(
    engine: TensorEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensor = torch.randn(1024, 1024)
    before = raw(tensor)
    fail_on_call(monkeypatch, "_allocate_host", 1)

    with pytest.raises(OffloadError, match=r"cannot allocate .* nothing was changed"):
        engine.offload()

    assert not engine.offloaded and engine.host_bytes == 0
    assert tensor.untyped_storage().nbytes() == 4 * MIB and raw(tensor) == before


def test_failed_free_during_offload_is_undone(
    engine: TensorEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = [torch.randn(256, 1024) for _ in range(4)]
    before = [raw(t) for t in tensors]
    fail_on_call(monkeypatch, "_resize", 3, shrinking)

    with pytest.raises(OffloadError, match="freeing device memory, nothing was changed"):
        engine.offload()

    assert not engine.offloaded and engine.host_bytes == 0
    assert [t.untyped_storage().nbytes() for t in tensors] == [MIB] * 4
    assert [raw(t) for t in tensors] == before


def test_failed_free_that_cannot_be_undone_stays_offloaded(
    engine: TensorEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = [torch.randn(256, 1024) for _ in range(4)]
    before = [raw(t) for t in tensors]
    fail_on_call(monkeypatch, "_resize", 3, shrinking)
    fail_on_call(monkeypatch, "_resize", 1, growing)  # wraps the shrink failure above

    with pytest.raises(OffloadError, match="2 storages stay offloaded"):
        engine.offload()

    assert engine.offloaded
    assert sorted(t.untyped_storage().nbytes() for t in tensors) == [0, 0, MIB, MIB]
    monkeypatch.undo()
    assert engine.restore().storages == 2
    assert [raw(t) for t in tensors] == before


@pytest.mark.parametrize(
    ("name", "nth", "when"),
    [("_resize", 3, growing), ("_copy", 2, lambda *a: True)],
    ids=["device-allocation-fails", "copy-fails"],
)
def test_failed_restore_rolls_back_and_keeps_host_copy(
    engine: TensorEngine,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    nth: int,
    when: Callable[..., bool],
) -> None:
    tensors = [torch.randn(256, 1024) for _ in range(4)]
    before = [raw(t) for t in tensors]
    engine.offload()
    host = engine.host_bytes
    fail_on_call(monkeypatch, name, nth, when)

    with pytest.raises(OffloadError, match="stays offloaded with its host copy"):
        engine.restore()

    assert engine.offloaded and engine.host_bytes == host
    assert [t.untyped_storage().nbytes() for t in tensors] == [0] * 4
    monkeypatch.undo()
    engine.restore()
    assert [raw(t) for t in tensors] == before


def count_allocations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    calls: list[tuple[int, bool]] = []
    real = offload._allocate_host

    def counting(nbytes: int, pinned: bool) -> torch.Tensor:
        calls.append((nbytes, pinned))
        return real(nbytes, pinned)

    monkeypatch.setattr(offload, "_allocate_host", counting)
    return calls


def test_host_pool_is_reused(engine: TensorEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = [torch.randn(1024, 1024) for _ in range(3)]
    calls = count_allocations(monkeypatch)

    engine.offload()
    engine.restore()
    assert engine.pool_bytes == sum(n for n, _ in calls) >= 12 * MIB
    # Powers of two: torch's pinned allocator rounds any other size up, pinning up to twice as much.
    assert all(n & (n - 1) == 0 for n, _ in calls), calls
    assert not any(pinned for _, pinned in calls)  # simulated: ordinary memory, never pinned
    allocated = len(calls)
    engine.offload()
    engine.restore()
    assert len(calls) == allocated
    assert all(t.untyped_storage().nbytes() == 4 * MIB for t in tensors)


def test_a_prepared_pool_makes_the_first_offload_allocate_nothing(
    engine: TensorEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = [torch.randn(1024, 1024) for _ in range(3)]
    before = [raw(t) for t in tensors]
    assert engine.prepare(engine.device_bytes() + MIB) >= 13 * MIB
    calls = count_allocations(monkeypatch)
    engine.offload()
    engine.restore()
    assert calls == []
    assert [raw(t) for t in tensors] == before


def test_state_beyond_the_pool_goes_to_other_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = TensorEngine(simulated=True, pinned_limit=7 * MIB, min_bytes=MIN_BYTES)
    tensors = [torch.randn(1024, 1024) for _ in range(3)]
    before = [raw(t) for t in tensors]
    calls = count_allocations(monkeypatch)
    try:
        engine.offload()
        # The pool: powers of two within the limit; the rest of the 12 MiB: one other buffer.
        assert calls[:2] == [(4 * MIB, False), (2 * MIB, False)] and len(calls) == 3
        assert engine.host_bytes >= 12 * MIB
        engine.restore()
        engine.offload()
        assert len(calls) == 4  # the pool is reused; only the overflow is new
        assert engine.pool_bytes == 6 * MIB
        engine.restore()
    finally:
        engine.discard()
    assert [raw(t) for t in tensors] == before
    assert engine.pool_bytes == 0


def test_min_bytes_threshold(engine: TensorEngine) -> None:
    small = torch.randn(MIN_BYTES // 4 - 1)
    large = torch.randn(MIN_BYTES // 4)

    engine.offload()
    assert small.untyped_storage().nbytes() == MIN_BYTES - 4
    assert large.untyped_storage().nbytes() == 0
    engine.restore()
    assert large.untyped_storage().nbytes() == MIN_BYTES


def test_tensors_created_and_deleted_between_cycles(engine: TensorEngine) -> None:
    kept = torch.randn(1024, 1024)
    dropped = torch.randn(1024, 1024)
    engine.offload()
    engine.restore()
    del dropped
    created = torch.randn(512, 1024)
    before = (raw(kept), raw(created))

    engine.offload()
    assert created.untyped_storage().nbytes() == 0
    late = torch.randn(256, 1024)  # made while offloaded: not part of this offload
    engine.restore()

    assert (raw(kept), raw(created)) == before
    assert late.untyped_storage().nbytes() == MIB


def test_offload_and_restore_twice_are_no_ops(engine: TensorEngine) -> None:
    tensor = torch.randn(1024, 1024)
    assert engine.restore() == Transfer(0, 0.0, 0)
    assert engine.offload().nbytes >= 4 * MIB
    assert engine.offload() == Transfer(0, 0.0, 0)
    assert engine.restore().nbytes >= 4 * MIB
    assert engine.restore() == Transfer(0, 0.0, 0)
    assert tensor.untyped_storage().nbytes() == 4 * MIB


def test_progress_reaches_the_total(engine: TensorEngine) -> None:
    tensors = [torch.randn(256, 1024) for _ in range(3)]
    seen: list[tuple[int, int]] = []

    transfer = engine.offload(lambda done, total: seen.append((done, total)))
    assert seen[-1] == (transfer.nbytes, transfer.nbytes)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    seen.clear()
    engine.restore(lambda done, total: seen.append((done, total)))
    assert seen[-1] == (transfer.nbytes, transfer.nbytes)
    assert len(tensors) == 3


def test_device_bytes_counts_each_storage_once(engine: TensorEngine) -> None:
    baseline = engine.device_bytes()
    base = torch.randn(1024, 1024)
    views = [base[1:], base.t(), base.detach(), base.view(-1)]

    assert engine.device_bytes() - baseline == 4 * MIB
    assert len(views) == 4


def test_memory_shared_with_another_process_is_refused(engine: TensorEngine) -> None:
    private = torch.randn(1024, 1024)
    shared = torch.randn(512, 1024)
    ForkingPickler.dumps(shared)  # what putting it on a torch.multiprocessing queue does

    with pytest.raises(UnsafeStateError, match=r"shared with another process .*2\.0 MiB"):
        engine.offload()

    assert not engine.offloaded and engine.host_bytes == 0
    assert private.untyped_storage().nbytes() == 4 * MIB
    del shared
    gc.collect()


def test_memory_torch_does_not_own_is_not_simulated_device_state(engine: TensorEngine) -> None:
    backing = bytearray(4 * MIB)
    foreign = torch.frombuffer(backing, dtype=torch.uint8)
    foreign[:3] = torch.tensor([1, 2, 3], dtype=torch.uint8)

    engine.offload()
    assert foreign.untyped_storage().nbytes() == 4 * MIB
    assert backing[:3] == b"\x01\x02\x03"
    engine.restore()


def test_discard_frees_host_memory(engine: TensorEngine) -> None:
    tensor = torch.randn(1024, 1024)
    engine.offload()
    engine.restore()
    assert engine.pool_bytes > 0
    engine.discard()
    assert (engine.pool_bytes, engine.host_bytes, engine.disk_bytes) == (0, 0, 0)
    assert tensor.untyped_storage().nbytes() == 4 * MIB


# -- damaged spill files --------------------------------------------------------------------


@pytest.fixture
def spilling_engine() -> Iterator[TensorEngine]:
    """A 4 MiB pool: three 3 MiB storages then lie over two spill files, the pool chunk (the first
    storage and a third of the second) and a pageable buffer (the rest of the second, the third).
    Only storages of 1 MiB or more move, so that nothing of pytest's own is in the files."""
    gc.collect()  # tensors of earlier tests that only garbage cycles still hold would move too
    engine = TensorEngine(simulated=True, pinned_limit=4 * MIB, min_bytes=MIB)
    engine.prepare(4 * MIB)
    yield engine
    if engine.offloaded:  # a failed test must not leave this process's tensors empty
        engine.discard_damaged()
        engine.restore()
    engine.discard()


def three_tensors() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(768, 1024, generator=generator) for _ in range(3)]  # 3 MiB each


def spill_files(directory: Path) -> list[Path]:
    """The engine's spill files in tape order (their names end in ``-<buffer index>.spill``)."""
    return sorted(directory.iterdir(), key=lambda f: int(f.stem.rsplit("-", 1)[1]))


def flip_byte(path: Path, at: int = 1000) -> None:
    with open(path, "r+b") as file:
        file.seek(at)
        byte = file.read(1)
        file.seek(at)
        file.write(bytes([byte[0] ^ 0xFF]))


def storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


@pytest.mark.parametrize("damaged", [[0], [1], [0, 1]], ids=["pool-file", "other-file", "both"])
def test_damage_maps_each_damaged_file_to_the_storages_with_bytes_in_it(
    spilling_engine: TensorEngine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    damaged: list[int],
) -> None:
    engine = spilling_engine
    tensors = three_tensors()
    before = [raw(t) for t in tensors]
    keys = [storage_key(t) for t in tensors]
    engine.offload()
    engine.spill(tmp_path)
    files = spill_files(tmp_path)
    assert [f.stat().st_size for f in files] == [4 * MIB, 5 * MIB]
    for index in damaged:
        flip_byte(files[index])

    with pytest.raises(StateDamaged) as raised:
        engine.restore()

    damage = raised.value.damage
    assert engine.damage is damage
    # Every damaged file is named, not only the first one read.
    assert len(damage.reasons) == len(damaged)
    assert all("checksum mismatch in spill file" in reason for reason in damage.reasons)
    lost = {storage._cdata for storage, _ in damage.storages}
    assert lost <= set(keys)  # nothing but these tensors was offloaded
    # The storage laid over both files is lost with either; the others with their own file only.
    assert len(lost) == (3 if len(damaged) == 2 else 2)
    assert damage.nbytes == len(lost) * 3 * MIB
    assert damage.nbytes + damage.intact_bytes == 9 * MIB
    assert f"{damage.nbytes / MIB:.1f} MiB had bytes there" in str(raised.value)
    # Nothing changed: still spilled, no host memory kept, every storage still freed.
    assert engine.offloaded and engine.host_bytes == 0 and engine.disk_bytes == 9 * MIB
    assert all(t.untyped_storage().nbytes() == 0 for t in tensors)

    # Known lost: a later restore says so again without reading anything.
    reads: list[object] = []
    monkeypatch.setattr(offload, "read_spill", lambda *args: reads.append(args))
    with pytest.raises(StateDamaged):
        engine.restore()
    assert reads == []
    monkeypatch.undo()

    assert engine.discard_damaged() is damage
    assert engine.damage is None and engine.discard_damaged() is None
    engine.restore()

    for tensor, key, data in zip(tensors, keys, before, strict=True):
        if key in lost:
            assert is_lost(tensor) and tensor.untyped_storage().nbytes() == 0
            with pytest.raises(LostTensorError, match="data was lost"):
                tensor.sum()
        else:
            assert not is_lost(tensor) and raw(tensor) == data
    assert not engine.offloaded and list(tmp_path.iterdir()) == []


def test_a_flipped_byte_loses_the_storages_of_its_piece_only(tmp_path: Path) -> None:
    gc.collect()
    engine = TensorEngine(simulated=True, pinned_limit=0, min_bytes=MIB)  # one 24 MiB file
    generator = torch.Generator().manual_seed(6)
    tensors = [torch.randn(1024, 1024, generator=generator) for _ in range(6)]  # 4 MiB each
    before = [raw(t) for t in tensors]
    engine.offload()
    engine.spill(tmp_path)
    [file] = tmp_path.iterdir()
    flip_byte(file, at=9 * MIB)  # in the second 8 MiB piece: the storages at 8 and 12 MiB

    with pytest.raises(StateDamaged, match=r"8388608 of its 25165824 bytes"):
        engine.restore()

    damage = engine.discard_damaged()
    assert damage is not None and damage.nbytes == 8 * MIB and damage.intact_bytes == 16 * MIB
    assert engine.disk_bytes == 24 * MIB  # the file stays: it holds the intact storages too
    engine.restore()  # reads the file again, without checking the piece given up
    assert [is_lost(t) for t in tensors].count(True) == 2
    for tensor, data in zip(tensors, before, strict=True):
        assert is_lost(tensor) or raw(tensor) == data
    assert list(tmp_path.iterdir()) == []
    engine.discard()


@pytest.mark.parametrize("how", ["missing", "truncated", "replaced"])
def test_a_missing_truncated_or_replaced_file_is_damage(
    spilling_engine: TensorEngine, tmp_path: Path, how: str
) -> None:
    engine = spilling_engine
    tensors = three_tensors()
    engine.offload()
    engine.spill(tmp_path)
    victim = spill_files(tmp_path)[1]
    if how == "missing":
        victim.unlink()
    elif how == "truncated":
        os.truncate(victim, 1000)
    else:
        victim.write_bytes(b"\0" * (5 * MIB))

    with pytest.raises(
        StateDamaged,
        match={"missing": "is missing", "truncated": "truncated"}.get(how, "checksum mismatch"),
    ):
        engine.restore()

    assert len(engine.discard_damaged().storages) == 2
    engine.restore()
    assert sum(is_lost(t) for t in tensors) == 2


def test_a_read_failure_that_may_pass_is_not_damage(
    spilling_engine: TensorEngine, tmp_path: Path
) -> None:
    engine = spilling_engine
    tensors = three_tensors()
    before = [raw(t) for t in tensors]
    engine.offload()
    engine.spill(tmp_path)

    with no_new_file_descriptors(), pytest.raises(OffloadError) as raised:
        engine.restore()

    assert not isinstance(raised.value, StateDamaged)
    assert "Too many open files" in str(raised.value)
    cause = raised.value.__cause__
    assert cause is not None and cause.errno == errno.EMFILE
    assert engine.damage is None and engine.discard_damaged() is None
    assert engine.offloaded and engine.host_bytes == 0 and engine.disk_bytes == 9 * MIB
    engine.restore()  # the cause passed: the retry brings everything back
    assert [raw(t) for t in tensors] == before


def test_lost_parameters_stay_parameters_and_refuse_every_use(tmp_path: Path) -> None:
    gc.collect()
    engine = TensorEngine(simulated=True, pinned_limit=0, min_bytes=MIB)  # one file
    model = torch.nn.Linear(1024, 1024)  # a 4 MiB weight; the 4 KiB bias never moves
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(2, 1024)).sum().backward()
    keys = {storage_key(model.weight), storage_key(model.weight.grad)}
    engine.offload()
    engine.spill(tmp_path)
    [file] = tmp_path.iterdir()
    flip_byte(file)
    with pytest.raises(StateDamaged):
        engine.restore()

    damage = engine.discard_damaged()

    assert {storage._cdata for storage, _ in damage.storages} == keys
    assert damage.intact_bytes == 0 and not engine.offloaded  # nothing left to bring back
    assert list(tmp_path.iterdir()) == []
    weight = model.weight
    assert isinstance(weight, torch.nn.Parameter) and is_lost(weight) and is_lost(weight.grad)
    assert weight.shape == (1024, 1024) and weight.dtype == torch.float32  # metadata answers
    uses: list[Callable[[], object]] = [
        lambda: model(torch.ones(2, 1024)),
        optimizer.step,
        weight.sum,
        lambda: repr(weight),
        lambda: weight.grad + 1,
        lambda: weight.tolist(),
    ]
    for use in uses:
        with pytest.raises(LostTensorError):
            use()
    assert not is_lost(model.bias) and model.bias.untyped_storage().nbytes() == 4096
    # A later offload passes the lost storages by (0 bytes); a new parameter replaces one.
    engine.offload()
    engine.restore()
    model.weight = torch.nn.Parameter(torch.zeros(1024, 1024))
    assert model(torch.ones(2, 1024)).shape == (2, 1024)
    engine.discard()


# -- the real device path: skipped without a CUDA GPU, run by the GPU check ---------------------

needs_cuda = pytest.mark.gpu  # skipped without a GPU, failed where one is required (gpu_gate)


@pytest.fixture
def cuda_engine() -> Iterator[TensorEngine]:
    # The scan finds every CUDA storage of this process, also what earlier tests left alive: the
    # pool's limit leaves room for them.
    engine = TensorEngine(simulated=False, pinned_limit=1024 * MIB, min_bytes=0)
    yield engine
    if engine.offloaded:
        engine.restore()
    engine.discard()


@needs_cuda
def test_cuda_offload_frees_the_gpu_and_restores(
    cuda_engine: TensorEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    net = Net().cuda()
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.randn(64, 256, device="cuda")).square().mean().backward()
    optimizer.step()
    big = torch.randn(64 * MIB // 4, device="cuda")
    view = big[1000:]
    objects = [*net.parameters(), *net.buffers(), big, view]
    objects += [t for s in optimizer.state.values() for t in s.values() if t.is_cuda]
    before = [raw(t.cpu()) for t in objects]
    calls = count_allocations(monkeypatch)
    allocated = torch.cuda.memory_allocated()
    pinned_before = _pinned_bytes()

    transfer = cuda_engine.offload()

    assert transfer.nbytes >= 64 * MIB and calls and all(pinned for _, pinned in calls)
    assert sum(n for n, _ in calls) == cuda_engine.pool_bytes <= cuda_engine.pinned_limit
    if pinned_before is not None:  # what torch really pinned: its power-of-two rounding wasted none
        assert _pinned_bytes() - pinned_before == cuda_engine.pool_bytes
    assert all(t.untyped_storage().nbytes() == 0 for t in objects)
    assert torch.cuda.memory_allocated() == transfer.left_bytes < allocated - 64 * MIB
    assert cuda_engine.device_bytes() == 0
    cuda_engine.restore()
    assert [raw(t.cpu()) for t in objects] == before
    view[0] = 5.0
    assert big[1000].item() == 5.0
    allocations = len(calls)
    cuda_engine.offload()
    cuda_engine.restore()
    assert len(calls) == allocations  # the pinned pool is reused


@needs_cuda
def test_cuda_offload_beyond_its_host_limit_goes_to_disk_through_a_bounded_buffer(
    cuda_engine: TensorEngine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    generator = torch.Generator(device="cuda").manual_seed(1)
    state = [torch.randn(n * MIB // 4, device="cuda", generator=generator) for n in (96, 48, 13)]
    state.append(torch.randint(0, 256, (100_003,), dtype=torch.uint8, device="cuda"))  # odd size
    before = [raw(t.cpu()) for t in state]
    calls = count_allocations(monkeypatch)
    limit = 40 * MIB + 12_345  # inside a storage: it is split between pinned memory and disk

    cuda_engine.offload(host_limit=limit, directory=tmp_path)

    assert 0 < cuda_engine.host_bytes <= limit and cuda_engine.disk_bytes >= 117 * MIB
    assert all(t.untyped_storage().nbytes() == 0 for t in state)
    # The pool for the host part, and one staging buffer for the rest: never the whole state.
    assert sum(n for n, _ in calls) <= cuda_engine.pool_bytes + offload.STAGING
    assert all(pinned for _, pinned in calls)
    cuda_engine.restore()
    assert [raw(t.cpu()) for t in state] == before and list(tmp_path.iterdir()) == []

    # Without room the pool, unused now, is the staging buffer: nothing more is allocated.
    calls.clear()
    cuda_engine.offload(host_limit=0, directory=tmp_path)
    assert cuda_engine.host_bytes == 0 and calls == []
    cuda_engine.restore()
    assert [raw(t.cpu()) for t in state] == before

    # The disk cannot take the rest: nothing changes on the device.
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(HostFullError, match="cannot write spill file"):
        cuda_engine.offload(host_limit=MIB, directory=tmp_path / "file" / "spill")
    assert not cuda_engine.offloaded
    assert [raw(t.cpu()) for t in state] == before


def _pinned_bytes() -> int | None:
    """Bytes torch's pinned host allocator holds, where this torch reports them."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    return None if stats is None else int(stats().get("allocated_bytes.current", 0))


@needs_cuda
def test_cuda_graph_is_refused(cuda_engine: TensorEngine) -> None:
    static = torch.zeros(MIB, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        static.add_(1)  # warm-up outside the capture, as torch.cuda.graph requires
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = static * 2

    with pytest.raises(UnsafeStateError, match="1 live CUDA graph"):
        cuda_engine.offload()
    assert not cuda_engine.offloaded and static.untyped_storage().nbytes() == 4 * MIB

    del graph, output
    gc.collect()
    cuda_engine.offload()
    cuda_engine.restore()


@needs_cuda
def test_cuda_memory_torch_does_not_own_is_refused(cuda_engine: TensorEngine) -> None:
    owner = torch.randn(MIB, device="cuda")
    borrowed = torch.from_dlpack(owner)  # what a tensor handed over from CuPy or JAX looks like

    with pytest.raises(UnsafeStateError, match="torch does not own"):
        cuda_engine.offload()
    assert owner.untyped_storage().nbytes() == 4 * MIB
    del borrowed
