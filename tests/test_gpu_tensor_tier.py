"""The tensor tier on a real GPU, in this process: what only CUDA itself can show about the pinned
pool and the queries an offload makes before it moves anything (the CPU side of each is in
test_pinned_pool.py). Run by ``bench/gpu_check.py``; skipped without a GPU (see gpu_gate.py).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")

from jupyter_singularity.kernel.offload import TensorEngine, UnsafeStateError  # noqa: E402

pytestmark = pytest.mark.gpu
MIB = 1 << 20


@pytest.fixture
def engine() -> Iterator[TensorEngine]:
    engine = TensorEngine(simulated=False, pinned_limit=256 * MIB, min_bytes=0)
    yield engine
    if engine.offloaded:
        engine.restore()
    engine.discard()


def test_a_capture_on_another_thread_is_refused_before_any_cuda_call(
    engine: TensorEngine,
) -> None:
    """A cell's thread captures a CUDA graph (global capture mode: any unsafe CUDA call from
    another thread breaks it) while the runtime's thread is asked to offload: the offload is
    refused without a CUDA call, and the capture ends and replays as if nothing happened."""
    static = torch.zeros(MIB, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        static.add_(1)  # warm-up outside the capture, as torch.cuda.graph requires
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graphs = [torch.cuda.CUDAGraph()]
    capturing, finish = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def capture() -> None:
        try:
            with torch.cuda.graph(graphs[0]):
                static.add_(1)
                capturing.set()
                finish.wait(60)
        except BaseException as exc:
            errors.append(exc)
            capturing.set()

    thread = threading.Thread(target=capture)
    thread.start()
    assert capturing.wait(60)
    try:
        with pytest.raises(UnsafeStateError, match=r"capture is in progress|live CUDA graph"):
            engine.offload()
    finally:
        finish.set()
        thread.join(60)
    assert errors == []  # the capture was not broken
    graphs[0].replay()
    torch.cuda.synchronize()
    assert float(static[0]) == 2.0  # warm-up, then one replay of the captured add
    graphs.clear()  # no live graph: the offload may go on
    engine.offload()
    engine.restore()
    assert float(static[0]) == 2.0


def test_the_allocator_snapshot_leaves_recorded_history_out(
    engine: TensorEngine, monkeypatch: pytest.MonkeyPatch, record_property
) -> None:
    """With memory history recorded (a user debugging memory), an offload asks for the
    allocator's segments without their stack traces, where torch can leave them out."""
    real = torch.cuda.memory_snapshot
    asked: list[dict] = []

    @functools.wraps(real)
    def snapshot(*args, **kwargs):
        asked.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "memory_snapshot", snapshot)
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    try:
        tensors = [torch.randn(MIB, device="cuda") for _ in range(64)]
        before = [float(t.sum()) for t in tensors]
        started = time.perf_counter()
        engine.offload()
        record_property("offload_seconds_with_history", time.perf_counter() - started)
        engine.restore()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    assert [float(t.sum()) for t in tensors] == before
    assert asked, "the offload did not ask for the allocator's segments"
    import inspect

    if "include_traces" in inspect.signature(real).parameters:
        assert asked == [{"include_traces": False}]
    else:
        record_property("include_traces", f"not in torch {torch.__version__}: plain snapshot")
        assert asked == [{}]


def test_a_lower_allowance_gives_pinned_memory_back(engine: TensorEngine) -> None:
    tensors = [torch.randn(16 * MIB, device="cuda") for _ in range(3)]  # 192 MiB
    before = [float(t.sum()) for t in tensors]
    engine.offload()
    engine.restore()
    assert engine.pool_bytes >= 192 * MIB
    stats = getattr(torch.cuda, "host_memory_stats", None)
    pinned = (lambda: stats().get("allocated_bytes.current")) if stats else (lambda: None)
    held = pinned()
    engine.pinned_limit = 0
    assert engine.pool_bytes == 0
    if held is not None:
        assert pinned() <= held - 192 * MIB  # freed, and the host cache emptied
    engine.offload()  # pageable memory now
    engine.restore()
    assert [float(t.sum()) for t in tensors] == before


class _ReportedAgainstTheGpu:
    """A swap victim's room reports, each beside what the GPU had free again at that moment."""

    def __init__(self) -> None:
        self.free_at_start = torch.cuda.mem_get_info()[0]
        self.reports: list[tuple[int, int]] = []

    def freed(self, nbytes: int, handed_back) -> None:
        room = handed_back(nbytes)  # every time: the broker's report is throttled, not this
        self.reports.append((room, torch.cuda.mem_get_info()[0] - self.free_at_start))

    def wait_room_back(self) -> None:
        raise AssertionError("the offload did not fail: no room to take back")


def test_a_swap_victim_reports_only_room_the_gpu_has_back(engine: TensorEngine) -> None:
    """A pipelined swap's victim frees its storages one by one and says how much room it made:
    the other kernel restores into that room at once, from another process, so it must be free
    on the GPU then, not held in this process's caching allocator until the offload ends.
    Small storages share the allocator's 20 MiB segments, so some reports lag their storages."""
    torch.cuda.empty_cache()  # the large storages get segments of their own
    tensors = [torch.randn(16 * MIB, device="cuda") for _ in range(8)]  # 64 MiB each
    tensors += [torch.randn(MIB // 2, device="cuda") for _ in range(12)]  # 2 MiB each
    before = [float(t.sum()) for t in tensors]
    torch.cuda.synchronize()
    report = _ReportedAgainstTheGpu()
    engine.offload(swap=report)
    assert len(report.reports) == len(tensors)
    rooms = [room for room, _ in report.reports]
    assert rooms == sorted(rooms) and rooms[-1] >= 8 * 64 * MIB
    assert any(rooms[:-1])  # room before the end: the swap is pipelined
    for room, free_again in report.reports:
        assert room <= free_again + 2 * MIB, report.reports  # (the driver's own granularity)
    engine.restore()
    assert [float(t.sum()) for t in tensors] == before
