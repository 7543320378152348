"""The pool on a real GPU, end to end: a ``jupyter server`` with ``devices=auto``, real kernels run
over websockets, offloads asked through REST, the driver tier in the broker.

One run (the module's ``pool_run`` fixture) builds a model with Adam state in kernel A, offloads and
restores it twice, then starts kernel B, whose first cell makes the broker evict A; B trains the
same model without interruption, for comparison. Each test judges one goal of that run, and the
figures (GB/s, seconds, MiB) are recorded for ``bench/gpu_check.py``. A goal that has no value
fails: in GPU mode nothing counts as passed without having been measured.

With ``JUPYTER_SINGULARITY_GPU=simulate`` the same run uses a simulated device and CPU tensors
(plumbing only); the goals that need a GPU are then not applicable.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpu_gate import facts, mode
from gpu_server import PoolServer, pool_server
from gpu_state import (
    BUILD_CELL,
    CONTINUE_CELL,
    DIGEST_CELL,
    HOLDER_CODE,
    LOOP_CELL,
    PROBE_CELL,
    StateSize,
    code,
    nvml_gpu_of,
    nvml_process_mib,
    result_line,
)
from servers import run_in_kernel

pytestmark = pytest.mark.gpu(simulate=True)

GiB = 1 << 30
#: Matrix products of the timed loop (about 2 ms each on an H100), long enough to overlap the
#: preparation of a 12 GiB pinned pool (about 5 s).
LOOP_STEPS = 2000


def _simulated() -> bool:
    return mode() == "simulate"


async def _cell(server: PoolServer, kernel_id: str, source: str, timeout: float = 600) -> dict:
    """Run a cell that prints a RESULT line; its JSON, with the cell's wall time."""
    started = time.perf_counter()
    status, text = await run_in_kernel(server.url, kernel_id, source, timeout)
    seconds = time.perf_counter() - started
    assert status == "ok", f"cell ended {status}:\n{text[-4000:]}"
    result = result_line(text) if "RESULT" in source or "report(" in source else {}
    return {**result, "cell_seconds": seconds}


def _since(record: dict, since: float) -> list[dict]:
    return [e for e in record.get("events") or [] if float(e.get("time") or 0) >= since - 0.05]


def _idle(server: PoolServer, kernel_id: str) -> dict:
    """Only an idle resident kernel can be offloaded: its cell's lease ends just after the cell."""
    return server.wait_record(kernel_id, lambda r: r["state"] == "resident" and not r["lease"])


def _eviction(server: PoolServer, kernel_id: str, pid: int, since: float) -> dict:
    """What the eviction that ended after ``since`` did: the tensor tier's bytes and seconds (the
    ledger), the driver tier's seconds and the context (the record), NVML's view of the pid."""
    record = server.record(kernel_id)
    moved = next(
        (e for e in _since(record, since) if e["new_state"] in ("offloaded", "spilled")), None
    )
    return {
        "state": record["state"],
        "nbytes": None if moved is None else moved["nbytes"],
        "seconds": None if moved is None else moved["duration"],
        "host_bytes": record["host_bytes"],
        "gpu_bytes": record["gpu_bytes"],
        "context": record["context"],
        "driver_seconds": record["context"]["seconds"].get("checkpoint")
        if record["context"]["checkpointed"]
        else None,
        "nvml_mib": None if _simulated() else nvml_process_mib(pid),
    }


def _offload(server: PoolServer, kernel_id: str, pid: int) -> dict:
    _idle(server, kernel_id)
    before = None if _simulated() else nvml_process_mib(pid)
    since = time.time()
    server.api(f"singularity/api/kernels/{kernel_id}/offload", "POST", {})
    server.wait_record(kernel_id, lambda r: r["state"] in ("offloaded", "spilled", "error"))
    return {**_eviction(server, kernel_id, pid, since), "nvml_mib_before": before}


async def _restore(server: PoolServer, kernel_id: str) -> dict:
    """The kernel's next cell restores its state: the cell's time is what the user waits."""
    since = time.time()
    cell = await _cell(server, kernel_id, PROBE_CELL)
    moved = next(
        (e for e in _since(server.record(kernel_id), since) if e["new_state"] == "running"), None
    )
    return {
        "cell_seconds": cell["cell_seconds"],
        "nbytes": None if moved is None else moved["nbytes"],
        "seconds": None if moved is None else moved["duration"],
    }


async def _run(server: PoolServer, size: StateSize, run: dict) -> None:
    device = "cpu" if _simulated() else "cuda"
    a = server.start_kernel()
    built = await _cell(server, a, code(BUILD_CELL, device=device, size=size, steps=2))
    run["a"] = {"pid": built["pid"], "state_bytes": built["state_bytes"], "build": built}
    pid = built["pid"]
    run["a"]["nvml_mib_resident"] = None if _simulated() else nvml_process_mib(pid)
    digests, losses = [built["digest"]], built["losses"]
    if not _simulated():
        # The host pool is prepared after a cell, while the kernel idles: a cell at once, and one
        # once that is done, say what the preparation costs the next cell.
        loop = code(LOOP_CELL, device=device, size=size, steps=LOOP_STEPS)
        during = await _cell(server, a, loop)
        await asyncio.sleep(10)
        after = await _cell(server, a, loop)
        run["prepare_overlap"] = {"during": during, "after": after}
    run["offloads"] = [_offload(server, a, pid)]
    run["restores"] = [await _restore(server, a)]
    went_on = await _cell(server, a, code(CONTINUE_CELL, device=device, size=size, steps=2))
    run["identical"] = [went_on["digest_before"] == digests[-1]]
    digests.append(went_on["digest"])
    run["offloads"].append(_offload(server, a, pid))
    run["restores"].append(await _restore(server, a))
    again = await _cell(server, a, DIGEST_CELL)
    run["identical"].append(again["digest"] == digests[-1])
    losses = again["losses"]
    _idle(server, a)
    # B's first cell reserves the whole GPU (its footprint is unknown): the broker evicts A.
    since = time.time()
    b = server.start_kernel()
    reference = await _cell(server, b, code(BUILD_CELL, device=device, size=size, steps=4))
    run["evicted_for_b"] = _eviction(server, a, pid, since)
    run["b"] = {"losses": reference["losses"], "digest": reference["digest"]}
    run["a"]["losses"], run["a"]["digest"] = losses, digests[-1]
    # A's next cell, then B's, reserves room that only the other's eviction makes: each is a
    # pipelined swap, the victim's offload and the incoming kernel's restore at once.
    run["swaps"] = [
        await _swap(server, a, b, digests[-1]),
        await _swap(server, b, a, reference["digest"]),
    ]


async def _swap(server: PoolServer, incoming: str, victim: str, digest: str) -> dict:
    """``incoming`` (offloaded, its state in host memory) runs a cell reserving the whole device
    but half the idle ``victim``'s booking (its CUDA context stays within that half): the broker
    evicts the victim while the incoming kernel restores, into the room free beside the victim
    and what the victim frees. A kernel whose context the driver tier checkpointed is brought
    back by the driver first (docs/admin.md, "Swaps overlap"): whether it was is recorded."""
    booked = _idle(server, victim)["gpu_bytes"]
    total = server.api("singularity/api/pool")["devices"][0]["total_bytes"]
    reserve = (total - booked // 2) >> 20
    checkpointed = server.record(incoming)["context"]["checkpointed"]
    since = time.time()
    cell = await _cell(server, incoming, f"%%singularity --memory {reserve}MiB\n{DIGEST_CELL}")
    offloaded = _since(server.record(victim), since)
    restored = _since(server.record(incoming), since)
    out = next((e for e in offloaded if e["new_state"] in ("offloaded", "spilled")), None)
    back = next((e for e in restored if e["new_state"] == "running"), None)
    return {
        "cell_seconds": cell["cell_seconds"],
        "offload_bytes": None if out is None else out["nbytes"],
        "offload_seconds": None if out is None else out["duration"],
        "restore_bytes": None if back is None else back["nbytes"],
        "incoming_checkpointed": bool(checkpointed),
        "identical": cell["digest"] == digest,
    }


@pytest.fixture(scope="module")
def pool_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The run; what it measured, and where it stopped if it failed (then every goal fails)."""
    simulated = _simulated()
    size = StateSize.from_env(simulated)
    settings = ["--SingularityApp.pinned_memory_limit=16GiB"]
    env: dict[str, str] = {}
    if simulated:
        devices = f"simulated:1x{max(1, 4 * size.nbytes // GiB + 1)}GiB"
    else:
        devices = "auto"
        env["CUDA_VISIBLE_DEVICES"] = facts().uuids[0]  # one GPU: B's first cell must evict A
    run: dict[str, Any] = {"state": size.__dict__ | {"nbytes": size.nbytes}, "devices": devices}
    with pool_server(tmp_path_factory.mktemp("pool"), devices, *settings, env=env) as server:
        try:
            asyncio.run(_run(server, size, run))
        except BaseException as exc:
            run["error"] = f"{type(exc).__name__}: {exc}\n--- server log\n{server.log_tail()}"
    yield run


def _measured(run: dict, *path: Any) -> Any:
    """run[path...], failing the goal (with where the run stopped) when the run has no value."""
    value: Any = run
    for key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            value = None
        if value is None:
            pytest.fail(f"not measured: {'/'.join(map(str, path))}; {run.get('error', '')}")
    return value


def test_state_comes_back_bit_identical(pool_run: dict) -> None:
    assert _measured(pool_run, "identical") == [True, True]


def test_training_goes_on_as_if_never_offloaded(pool_run: dict) -> None:
    """A was offloaded twice between its steps and evicted once; B never: same losses, bitwise,
    and the same final state."""
    assert _measured(pool_run, "a", "losses") == _measured(pool_run, "b", "losses")
    assert _measured(pool_run, "a", "digest") == _measured(pool_run, "b", "digest")


def test_every_move_is_in_the_ledger_with_its_bytes_and_seconds(pool_run: dict) -> None:
    state = _measured(pool_run, "a", "state_bytes")
    moves = [
        *(("offload", i, m) for i, m in enumerate(_measured(pool_run, "offloads"))),
        *(("restore", i, m) for i, m in enumerate(_measured(pool_run, "restores"))),
        ("eviction for B", 0, _measured(pool_run, "evicted_for_b")),
    ]
    assert len(moves) == 5
    for what, index, move in moves:
        assert move["nbytes"] and move["nbytes"] >= 0.99 * state, (what, index, move)
        assert move["seconds"] and move["seconds"] > 0, (what, index, move)


def test_the_broker_evicts_an_idle_kernel_for_another(pool_run: dict) -> None:
    assert _measured(pool_run, "evicted_for_b", "state") in ("offloaded", "spilled")


def test_a_swap_brings_both_kernels_back_intact(pool_run: dict) -> None:
    for swap in _measured(pool_run, "swaps"):
        assert _measured(swap, "offload_bytes") > 0  # the victim was evicted
        assert _measured(swap, "restore_bytes") > 0
        assert swap["identical"] is True


@pytest.mark.gpu
def test_an_eviction_leaves_nothing_of_the_kernel_on_the_gpu(pool_run: dict) -> None:
    """NVML must see the kernel's process (its own pid, as the broker verified it) while it
    holds the GPU, and 0 MiB of it after every eviction: the tensor tier, then the driver tier."""
    assert _measured(pool_run, "a", "nvml_mib_resident") > 0
    evictions = [*_measured(pool_run, "offloads"), _measured(pool_run, "evicted_for_b")]
    for eviction in evictions:
        assert eviction["nvml_mib"] in (None, 0), eviction  # None: no longer listed at all
        assert eviction["gpu_bytes"] == 0, eviction


@pytest.mark.gpu
def test_the_driver_tier_takes_the_context_after_the_tensors(pool_run: dict) -> None:
    """After each eviction the broker checkpointed the kernel's process; the driver's copy of
    what was left (the context) counts in the kernel's host memory."""
    evictions = [*_measured(pool_run, "offloads"), _measured(pool_run, "evicted_for_b")]
    for eviction in evictions:
        assert eviction["context"]["checkpointed"] is True, eviction["context"]
        assert eviction["driver_seconds"] is not None, eviction
        assert eviction["host_bytes"] > eviction["nbytes"], eviction


def test_figures(pool_run: dict, record_property) -> None:
    """The numbers bench/gpu_check.py reports, each of which must have been measured."""
    figures = {
        "state_bytes": _measured(pool_run, "a", "state_bytes"),
        "restore_cell_seconds": [r["cell_seconds"] for r in _measured(pool_run, "restores")],
    }
    for name, moves in (("offload", "offloads"), ("restore", "restores")):
        for index, move in enumerate(_measured(pool_run, moves)):
            figures[f"{name}_{index + 1}_bytes"] = _measured(move, "nbytes")
            figures[f"{name}_{index + 1}_seconds"] = _measured(move, "seconds")
    for index, swap in enumerate(_measured(pool_run, "swaps")):
        for key in ("cell_seconds", "offload_bytes", "offload_seconds"):
            figures[f"swap_{index + 1}_{key}"] = _measured(swap, key)
        figures[f"swap_{index + 1}_restore_bytes"] = _measured(swap, "restore_bytes")
        figures[f"swap_{index + 1}_incoming_checkpointed"] = swap["incoming_checkpointed"]
    if not _simulated():
        for index, move in enumerate(_measured(pool_run, "offloads")):
            figures[f"offload_{index + 1}_driver_seconds"] = _measured(move, "driver_seconds")
            figures[f"offload_{index + 1}_nvml_mib_after"] = move["nvml_mib"] or 0
        figures["context_and_state_mib_resident"] = _measured(pool_run, "a", "nvml_mib_resident")
        overlap = _measured(pool_run, "prepare_overlap")
        figures["loop_seconds_while_pool_prepared"] = _measured(overlap, "during", "loop_seconds")
        figures["loop_seconds_after"] = _measured(overlap, "after", "loop_seconds")
        figures["pool_bytes_around_loops"] = (
            overlap["during"]["pool_bytes"] + overlap["after"]["pool_bytes"]
        )
    for name, value in figures.items():
        record_property(name, value)


@pytest.mark.gpu
def test_the_driver_tier_alone_on_the_same_state(
    pool_run: dict, record_property, tmp_path: Path
) -> None:
    """For comparison: a plain process holding the same state checkpointed and restored by the
    driver alone (cuda-checkpoint style): the data must survive and the GPU must be freed."""
    from jupyter_singularity.broker.checkpoint import DriverCheckpointer, detect

    size = StateSize.from_env(simulated=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", code(HOLDER_CODE, device="cuda", size=size, steps=2)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": facts().uuids[0]},
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        ready = result_line(holder.stdout.readline(), "READY")
        pid = ready["pid"]
        resident = nvml_process_mib(pid)
        assert resident, f"NVML does not list pid {pid}"
        driver = DriverCheckpointer(detect())
        seconds = driver.checkpoint(pid)
        assert not nvml_process_mib(pid)
        back = driver.restore(pid)
        holder.stdin.write("verify\n")
        holder.stdin.flush()
        assert result_line(holder.stdout.readline(), "VERIFY") == {"intact": True}
        record_property("state_bytes", ready["state_bytes"])
        record_property("nvml_mib_resident", resident)
        record_property("checkpoint_seconds", seconds)
        record_property("restore_seconds", back)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.gpu(min_devices=2)
def test_migration_between_two_gpus(tmp_path: Path, record_property) -> None:
    """With migration on: kernel A's state leaves GPU X; a pinned kernel fills X; A's next cell
    (reserving more than X has left) comes back on GPU Y through the driver's UUID remap. Its
    data must be intact, its CUDA_VISIBLE_DEVICES and NVML must name Y, and its pinned pool must
    work there (another offload and restore)."""
    size = StateSize.from_env(simulated=False)
    uuids = facts().uuids[:2]
    env = {"CUDA_VISIBLE_DEVICES": ",".join(uuids)}
    settings = ["--SingularityApp.migration=True", "--SingularityApp.pinned_memory_limit=16GiB"]
    with pool_server(tmp_path / "pool", "auto", *settings, env=env) as server:
        asyncio.run(_migrate(server, size, uuids, record_property))


async def _migrate(server: PoolServer, size: StateSize, uuids: tuple, record_property) -> None:
    devices = {d["index"]: d for d in server.api("singularity/api/pool")["devices"]}
    a = server.start_kernel()
    built = await _cell(server, a, code(BUILD_CELL, device="cuda", size=size, steps=2))
    pid = built["pid"]
    home = server.record(a)["device"]
    _offload(server, a, pid)
    total = devices[home]["total_bytes"]
    fill = (
        "import torch\n_fill = torch.empty(int(__N__), dtype=torch.uint8, device='cuda')\n"
        "print('RESULT {}', flush=True)"
    ).replace("__N__", str(int(total * 0.6)))

    async def pinned_filler() -> tuple[str, int]:
        kernel = server.start_kernel()
        await _cell(server, kernel, fill)
        server.api(f"singularity/api/kernels/{kernel}/pin", "POST", {"pinned": True})
        return kernel, server.record(kernel)["device"]

    first, where = await pinned_filler()
    if where != home:  # it took the other GPU: a second one must take A's, and the first moves
        _second, where = await pinned_filler()
        assert where == home, "the second filler did not take A's GPU"
        server.api(f"singularity/api/kernels/{first}/pin", "POST", {"pinned": False})
    since = time.time()
    hint = f"%%singularity --memory {int(total * 0.5)}\n"
    cell = await _cell(server, a, hint + CONTINUE_CELL.replace("__STEPS__", "0"))
    record = server.record(a)
    moved_to = record["device"]
    assert moved_to != home, f"A came back on its own GPU {home}"
    assert cell["digest_before"] == built["digest"]
    target = devices[moved_to]["uuid"]
    assert cell["cuda_visible_devices"] == target
    assert nvml_gpu_of(pid) == target
    assert record["context"]["seconds"].get("restore") is not None
    # Its pinned pool on the new GPU: offloaded and restored again, intact.
    _offload(server, a, pid)
    again = await _cell(server, a, DIGEST_CELL)
    assert again["digest"] == built["digest"]
    events = _since(server.record(a), since)
    record_property("migrated", f"GPU {home} -> GPU {moved_to} ({uuids})")
    record_property("restore_event", next((e for e in events if e["new_state"] == "running"), {}))
