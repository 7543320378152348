"""Pipelined swaps, the engine's part (simulated devices: CPU tensors are the device state).

A victim's offload frees each storage as its copy ends and reports the bytes freed; an early
restore fills no more than its allowance and, revoked, frees what it refilled. The end-to-end
swaps through a real pool are in test_swap_pool.py.
"""

# ruff: noqa: F811 (the engine fixture of test_offload, by name)
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from test_offload import MIB, engine, fail_on_call, raw, shrinking  # noqa: E402, F401

from jupyter_singularity.kernel import offload as offload_module  # noqa: E402
from jupyter_singularity.kernel import swap as swap_module  # noqa: E402
from jupyter_singularity.kernel.device_room import CudaReservation, device_room  # noqa: E402
from jupyter_singularity.kernel.offload import OffloadError, TensorEngine  # noqa: E402
from jupyter_singularity.kernel.swap import Allowance, RoomReport  # noqa: E402


def four() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(256, 1024, generator=generator) for _ in range(4)]  # 1 MiB each


def test_a_pipelined_offload_frees_each_storage_as_its_copy_ends(engine: TensorEngine) -> None:
    tensors = four()
    before = [raw(t) for t in tensors]
    room = RoomLog(tensors)

    engine.offload(swap=room)

    # Each report comes once that storage is gone from the device, not all at the end.
    assert room.reports == [(MIB, 3 * MIB), (2 * MIB, 2 * MIB), (3 * MIB, MIB), (4 * MIB, 0)]
    assert room.asked_back == []
    engine.restore()
    assert [raw(t) for t in tensors] == before


def test_each_side_of_a_swap_copies_on_a_thread_of_its_own(
    engine: TensorEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On simulated devices a swap's victim and its incoming kernel each copy with a memmove on
    the moving thread (one core each, as a GPU's copy engine serves one direction); a move
    outside a swap keeps torch's copy, on every core."""
    tensors = four()
    before = [raw(t) for t in tensors]
    moves: list[int] = []
    memmove = offload_module.ctypes.memmove
    monkeypatch.setattr(
        offload_module.ctypes, "memmove", lambda *args: moves.append(args[2]) or memmove(*args)
    )

    engine.offload(swap=RoomLog(tensors))
    assert moves == [MIB] * 4
    engine.restore()
    engine.offload()
    assert moves == [MIB] * 4
    allowance = Allowance()
    allowance.open()
    engine.restore(room=allowance.wait_for)
    assert moves == [MIB] * 8
    assert [raw(t) for t in tensors] == before


class RoomLog:
    """What a victim's offload tells its room report: bytes freed (with the bytes still on the
    device at that moment), and when it asks for the room back."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self.reports: list[tuple[int, int]] = []
        self.asked_back: list[int] = []

    def on_device(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.tensors)

    def freed(self, nbytes: int, handed_back) -> None:
        self.reports.append((handed_back(nbytes), self.on_device()))

    def wait_room_back(self) -> None:
        self.asked_back.append(self.on_device())


def test_a_victim_failing_midway_waits_for_its_room_before_refilling(
    engine: TensorEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = four()
    before = [raw(t) for t in tensors]
    room = RoomLog(tensors)
    fail_on_call(monkeypatch, "_resize", 3, shrinking)

    with pytest.raises(OffloadError, match="nothing was changed"):
        engine.offload(swap=room)

    # Two storages were freed (and reported) when the third failed; the room was asked back
    # while they were still freed, and only then were they refilled.
    assert room.reports == [(MIB, 3 * MIB), (2 * MIB, 2 * MIB)]
    assert room.asked_back == [2 * MIB]
    assert not engine.offloaded and engine.host_bytes == 0
    assert [raw(t) for t in tensors] == before


def test_a_victim_refused_before_freeing_anything_asks_no_room_back(
    engine: TensorEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = four()
    before = [raw(t) for t in tensors]
    room = RoomLog(tensors)
    fail_on_call(monkeypatch, "_copy", 1)

    with pytest.raises(OffloadError):
        engine.offload(swap=room)

    assert room.reports == [] and room.asked_back == []
    assert [raw(t) for t in tensors] == before


def test_a_pipelined_victim_that_spills_to_disk(tmp_path: Path) -> None:
    engine = TensorEngine(simulated=True, pinned_limit=0, min_bytes=MIB)
    tensors = four()
    before = [raw(t) for t in tensors]
    room = RoomLog(tensors)
    try:
        engine.offload(swap=room, host_limit=2 * MIB, directory=tmp_path)
        assert engine.disk_bytes == 2 * MIB and engine.host_bytes == 2 * MIB
        assert room.reports[-1] == (4 * MIB, 0) and len(room.reports) == 4
        engine.restore()
        assert [raw(t) for t in tensors] == before
    finally:
        if engine.offloaded:
            engine.restore()
        engine.discard()


def restore_in_thread(engine: TensorEngine, allowance: Allowance) -> dict:
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["transfer"] = engine.restore(room=allowance.wait_for)
        except Exception as err:
            outcome["error"] = err

    outcome["thread"] = threading.Thread(target=run)
    outcome["thread"].start()
    return outcome


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.005)


def test_an_early_restore_fills_no_more_than_its_allowance(engine: TensorEngine) -> None:
    tensors = four()
    before = [raw(t) for t in tensors]
    engine.offload()
    allowance = Allowance()
    allowance.grow(2 * MIB + MIB // 2)
    outcome = restore_in_thread(engine, allowance)

    def on_device() -> int:
        return sum(t.untyped_storage().nbytes() for t in tensors)

    wait_until(lambda: on_device() == 2 * MIB)
    time.sleep(0.1)  # it would have gone on by now: it waits for room
    assert on_device() == 2 * MIB and outcome["thread"].is_alive()
    allowance.grow(3 * MIB)
    wait_until(lambda: on_device() == 3 * MIB)
    allowance.open()  # the grant
    outcome["thread"].join(10)
    assert "error" not in outcome and not engine.offloaded
    assert [raw(t) for t in tensors] == before


def test_a_revoked_early_restore_frees_what_it_refilled(engine: TensorEngine) -> None:
    tensors = four()
    before = [raw(t) for t in tensors]
    engine.offload()
    host = engine.host_bytes
    allowance = Allowance()
    allowance.grow(2 * MIB)
    outcome = restore_in_thread(engine, allowance)
    wait_until(lambda: sum(t.untyped_storage().nbytes() for t in tensors) == 2 * MIB)

    allowance.revoke("the victim's offload failed")
    outcome["thread"].join(10)

    assert isinstance(outcome["error"], OffloadError)
    assert "the victim's offload failed" in str(outcome["error"])
    assert engine.offloaded and engine.host_bytes == host
    assert [t.untyped_storage().nbytes() for t in tensors] == [0] * 4
    engine.restore()
    assert [raw(t) for t in tensors] == before


def test_a_victim_reports_what_it_freed_a_few_times_per_swap_not_per_storage() -> None:
    sent: list[tuple[str, dict]] = []
    report = RoomReport(lambda kind, body: sent.append((kind, body)), lambda *a, **k: {})
    for done in range(1, 1001):
        report.freed(done * MIB, lambda n: n)  # 1,000 storages of 1 MiB, well under 5 ms each
    assert 1 <= len(sent) < 100
    assert all(kind == "freed" for kind, _ in sent)


def test_a_victim_reports_only_the_room_the_device_has_back() -> None:
    """On CUDA a freed storage's block stays in torch's cache until it is handed to the
    driver: a report says what the device has back, asked only when a report is due, and
    never goes down."""
    sent: list[int] = []
    asked: list[int] = []
    back = {"bytes": 0}

    def handed_back(freed: int) -> int:
        asked.append(freed)
        return back["bytes"]

    report = RoomReport(lambda kind, body: sent.append(body["bytes"]), lambda *a, **k: {})
    report.freed(64 * MIB, handed_back)  # due (a step's worth), but nothing is back yet
    back["bytes"] = 40 * MIB
    report.freed(65 * MIB, handed_back)  # not due: not asked
    time.sleep(swap_module.REPORT_INTERVAL)
    report.freed(66 * MIB, handed_back)
    back["bytes"] = 30 * MIB  # a smaller figure is never sent
    report.freed(130 * MIB, handed_back)
    assert asked == [64 * MIB, 66 * MIB, 130 * MIB]
    assert sent == [40 * MIB]


class _Restores(swap_module.CellRestores):
    """The mixin alone, over an engine that holds offloaded state; its early restore only waits
    for the grant or a revocation."""

    def __init__(self) -> None:
        self.lock, self.early_lock, self.lease = threading.RLock(), threading.Lock(), None
        self.engine = type("Offloaded", (), {"offloaded": True, "disk_bytes": 0, "damage": None})

    def get_engine(self):
        return self.engine

    def _restore_early(self, early: swap_module.EarlyRestore) -> None:
        early.allowance.settle()


def test_a_cell_granted_while_an_early_restore_starts_finds_it_started(monkeypatch) -> None:
    """The room push starts the early restore on the channel's thread while the granted cell
    ends it on the main thread: the cell must never find it published but not yet started."""

    class SlowToStart(threading.Thread):
        def start(self) -> None:
            time.sleep(0.3)
            super().start()

    restores = _Restores()
    pushing = threading.Thread(target=restores.on_room, args=({"bytes": 1},))
    monkeypatch.setattr(
        swap_module,
        "threading",
        type("Threading", (), {"Thread": SlowToStart, "Condition": threading.Condition}),
    )
    pushing.start()
    time.sleep(0.1)  # the push is starting its thread
    assert restores.finish_early_restore(give_back=True) is None
    pushing.join()
    assert restores._early_restore is None


class _Allocator:
    """torch.cuda's reservation as a caching allocator keeps it: freed blocks stay reserved
    until ``empty_cache``, and only whole free segments go back to the driver."""

    def __init__(self, reserved: int) -> None:
        self.reserved, self.releasable = reserved, 0

    def memory_reserved(self, device: object) -> int:
        return self.reserved

    def empty_cache(self) -> None:
        self.reserved -= self.releasable
        self.releasable = 0


def test_on_cuda_a_victim_hands_back_only_what_left_its_reservation() -> None:
    cuda = _Allocator(reserved=200 * MIB)
    room = CudaReservation(cuda, {"cuda:0"})
    cuda.releasable = 44 * MIB  # 64 MiB of storages freed; 20 MiB share a segment still in use
    assert room.handed_back(64 * MIB) == 44 * MIB
    assert cuda.reserved == 156 * MIB  # the cache went to the driver before the report
    cuda.releasable = 80 * MIB  # with blocks cached before the offload: never more than freed
    assert room.handed_back(100 * MIB) == 100 * MIB


def test_on_cuda_an_incoming_restore_asks_room_for_what_its_reservation_grew_by() -> None:
    cuda = _Allocator(reserved=10 * MIB)
    room = CudaReservation(cuda, {"cuda:0"})
    assert room.needed(2 * MIB, 2 * MIB) == 2 * MIB
    cuda.reserved += 20 * MIB  # that 2 MiB storage took a 20 MiB segment
    assert room.needed(4 * MIB, 2 * MIB) == 22 * MIB
    assert device_room(torch, [], simulated=True).needed(4 * MIB, 2 * MIB) == 4 * MIB
