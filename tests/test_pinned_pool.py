"""The tensor tier's host pool: a refused pin, a lowered allowance, and the allocator queries that
run before an offload, on torch CPU tensors (simulated devices) and a stand-in for torch.cuda.

The pool is pinned on CUDA; here the engine is told to want pinned memory, and ``_allocate_host``
plays the CUDA host allocator: it refuses large pinned requests the way a failed cudaHostAlloc
does, with a RuntimeError.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from test_offload import MIB, MIN_BYTES, raw  # noqa: E402

from jupyter_singularity.kernel import cuda_probes, offload  # noqa: E402
from jupyter_singularity.kernel.offload import TensorEngine  # noqa: E402

#: The most the stand-in host allocator pins at a time.
PIN_AT_MOST = [4 * MIB]
GIB = 1 << 30


@pytest.fixture
def pinning_engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TensorEngine, list]]:
    """An engine that wants its pool pinned, over a host allocator that pins at most
    PIN_AT_MOST at a time; and the allocations it was asked for, (bytes, pinned)."""
    calls: list[tuple[int, bool]] = []
    real = offload._allocate_host
    PIN_AT_MOST[0] = 4 * MIB

    def allocate(nbytes: int, pinned: bool) -> torch.Tensor:
        calls.append((nbytes, pinned))
        if pinned and nbytes > PIN_AT_MOST[0]:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        return real(nbytes, False)

    monkeypatch.setattr(offload, "_allocate_host", allocate)
    engine = TensorEngine(simulated=True, pinned_limit=64 * MIB, min_bytes=MIN_BYTES)
    engine._pin = True
    yield engine, calls
    if engine.offloaded:
        engine.restore()
    engine.discard()


def test_a_refused_pin_falls_back_to_pageable_memory_for_the_rest(
    pinning_engine: tuple[TensorEngine, list],
) -> None:
    engine, calls = pinning_engine
    tensors = [torch.randn(1024, 1024) for _ in range(3)]
    before = [raw(t) for t in tensors]

    # 12 MiB or more (tensors other tests left alive are offloaded too): the first chunk, larger
    # than the allocator pins, is refused, so pageable memory takes all of it.
    engine.offload()

    assert engine.offloaded and all(t.untyped_storage().nbytes() == 0 for t in tensors)
    refused, pinned = calls[0]
    assert pinned and refused >= 8 * MIB
    assert [pinned for _, pinned in calls[1:]] == [False] and calls[1][0] >= 12 * MIB
    expected = f"pinning {refused / MIB:.1f} MiB failed: CUDA error: out of memory"
    assert engine.pin_refused.startswith(expected)
    engine.restore()
    assert [raw(t) for t in tensors] == before
    # The refusal is remembered: later offloads do not try to pin again.
    calls.clear()
    engine.offload()
    engine.restore()
    assert calls and not any(pinned for _, pinned in calls)
    assert engine.pool_bytes == 0
    assert [raw(t) for t in tensors] == before


def test_preparing_a_pool_the_system_will_not_pin_keeps_what_it_got(
    pinning_engine: tuple[TensorEngine, list],
) -> None:
    engine, calls = pinning_engine
    engine.pinned_limit = 6 * MIB
    assert engine.prepare(6 * MIB) == 6 * MIB
    assert calls == [(4 * MIB, True), (2 * MIB, True)]  # both granted (at most 4 MiB each)
    assert engine.pin_refused == ""
    engine.pinned_limit = 64 * MIB
    assert engine.prepare(48 * MIB) == 6 * MIB  # the 32 MiB chunk is refused: no exception
    assert calls[2] == (32 * MIB, True) and len(calls) == 3
    assert engine.pin_refused.startswith("pinning 32.0 MiB failed")


def test_preparing_the_pool_pins_at_most_a_gib_at_a_time_and_stops_when_a_cell_starts(
    pinning_engine: tuple[TensorEngine, list],
) -> None:
    """Pinning slows the CUDA calls of a cell running meanwhile: the pool grows in chunks of at
    most POOL_CHUNK_MAX and stops at the first one a cell is running for (the cell's end starts
    it again)."""
    engine, calls = pinning_engine
    PIN_AT_MOST[0] = offload.POOL_CHUNK_MAX
    engine.pinned_limit = 4 * GIB
    cell_started = iter([True, True, False])  # idle for two chunks, then a cell runs
    assert engine.prepare(3 * GIB + 2 * MIB, idle=lambda: next(cell_started)) == 2 * GIB
    assert calls == [(GIB, True), (GIB, True)]
    assert engine.prepare(3 * GIB + 2 * MIB) == 3 * GIB + 2 * MIB  # (after the cell)
    assert calls[2:] == [(GIB, True), (2 * MIB, True)]


def test_a_pool_chunk_the_system_will_not_pin_again_comes_back_pageable(
    pinning_engine: tuple[TensorEngine, list], tmp_path
) -> None:
    """Spilled with the copies, the pool comes back from disk; where it cannot be pinned again,
    its bytes come back in pageable memory, which does not rejoin the pool."""
    engine, _ = pinning_engine
    gc.collect()
    tensor = torch.randn(768, 1024)  # 3 MiB
    before = raw(tensor)
    engine.offload()
    assert engine.pool_bytes >= 4 * MIB
    engine.spill(tmp_path)
    PIN_AT_MOST[0] = 0  # meanwhile the system stopped pinning
    engine.restore()
    assert raw(tensor) == before
    assert engine.pool_bytes == 0 and engine.pin_refused.startswith("pinning 4.0 MiB failed")


def test_a_lower_allowance_gives_the_pool_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunks a lower allowance drops are gone when the host cache is emptied (one still
    referred to, by a loop variable say, stays pinned: seen on an H200)."""
    dropped: list[weakref.ref] = []
    alive_at_release: list[int] = []
    engine = TensorEngine(simulated=True, pinned_limit=12 * MIB, min_bytes=MIN_BYTES)
    monkeypatch.setattr(
        engine,
        "_release_pinned",
        lambda: alive_at_release.append(sum(ref() is not None for ref in dropped)),
    )
    tensors = [torch.randn(1024, 1024) for _ in range(3)]
    before = [raw(t) for t in tensors]

    def drops(nbytes: int) -> None:
        dropped[:] = [weakref.ref(c) for c in engine._pool if c.numel() == nbytes]

    try:
        engine.offload()
        engine.restore()
        assert engine.pool_bytes == 12 * MIB  # 8 + 4 MiB chunks
        drops(8 * MIB)
        engine.pinned_limit = 5 * MIB  # a later grant allows less: the 4 MiB chunk stays
        assert engine.pool_bytes == 4 * MIB and alive_at_release == [0]
        # While offloaded the pool holds the state: it shrinks once that is restored.
        engine.offload()
        drops(4 * MIB)
        engine.pinned_limit = 0
        assert engine.pool_bytes == 4 * MIB
        engine.restore()
        assert engine.pool_bytes == 0 and alive_at_release == [0, 0]
        assert [raw(t) for t in tensors] == before
    finally:
        engine.discard()


# --- what an offload asks torch.cuda before it moves anything ---------------------------------


def test_the_allocator_snapshot_leaves_the_stack_traces_out() -> None:
    """With memory history recorded, a snapshot with its traces costs far more than an offload."""
    asked: list[dict] = []

    def memory_snapshot(mempool_id: object = None, include_traces: bool = True) -> list[dict]:
        asked.append({"include_traces": include_traces})
        return [{"address": 4096, "total_size": 2048}, {"address": 0, "total_size": 1024}]

    cuda = SimpleNamespace(get_allocator_backend=lambda: "native", memory_snapshot=memory_snapshot)
    assert cuda_probes.allocator_segments(SimpleNamespace(cuda=cuda)) == [(0, 1024), (4096, 6144)]
    assert asked == [{"include_traces": False}]

    def older_snapshot(mempool_id: object = None) -> list[dict]:  # torch before include_traces
        return [{"address": 0, "total_size": 1024}]

    cuda.memory_snapshot = older_snapshot
    assert cuda_probes.allocator_segments(SimpleNamespace(cuda=cuda)) == [(0, 1024)]
    cuda.get_allocator_backend = lambda: "cudaMallocAsync"
    assert cuda_probes.allocator_segments(SimpleNamespace(cuda=cuda)) is None


class FakeCuda:
    """torch.cuda's current stream (per thread) and stream captures, as torch keeps them."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.capturing: set[object] = set()

    def current(self) -> object:
        return getattr(self.local, "stream", "default")

    @contextmanager
    def stream(self, stream: object) -> Iterator[None]:
        before = self.current()
        self.local.stream = stream
        try:
            yield
        finally:
            self.local.stream = before

    def is_current_stream_capturing(self) -> bool:
        return self.current() in self.capturing


def test_a_capture_on_another_threads_stream_is_found() -> None:
    """Offloads run on the runtime's thread; the cell's thread may be capturing on its stream."""
    cuda = FakeCuda()
    fake_torch = SimpleNamespace(cuda=cuda)
    side, other = object(), object()
    found: dict[str, bool] = {}

    with cuda.stream(side):  # the main thread began a capture on its current (side) stream
        cuda.capturing.add(side)

        def offload_thread() -> None:
            found["own stream only"] = cuda.is_current_stream_capturing()
            found["every live stream"] = cuda_probes.capture_in_progress(fake_torch, [other, side])
            found["without that stream"] = cuda_probes.capture_in_progress(fake_torch, [other])
            found["left current"] = cuda.current() == "default"

        thread = threading.Thread(target=offload_thread)
        thread.start()
        thread.join()

    assert found == {
        "own stream only": False,  # what asking this thread's current stream alone sees
        "every live stream": True,
        "without that stream": False,
        "left current": True,
    }
