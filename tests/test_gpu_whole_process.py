"""State the tensor tier must not move, on a real GPU through a real server.

A CUDA graph replays fixed device addresses: the driver tier takes the whole kernel process
instead, addresses kept, and the graph must replay right after the restore. A thread a cell left
running on the GPU could be torn by either tier (or stop the whole kernel while the driver holds
it): the kernel stays on its GPU, says why, and the thread's work goes on, no write lost.

Run by ``bench/gpu_check.py``; skipped without a GPU (see gpu_gate.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from gpu_gate import facts
from gpu_server import PoolServer, pool_server
from gpu_state import nvml_process_mib, result_line
from servers import run_in_kernel

pytestmark = pytest.mark.gpu

GRAPH = "\n".join(
    [
        "import json, os, torch",
        "_x = torch.zeros(1 << 20, device='cuda')",
        "_y = torch.zeros_like(_x)",
        "_s = torch.cuda.Stream()",
        "_s.wait_stream(torch.cuda.current_stream())",
        "with torch.cuda.stream(_s):",
        "    _y.copy_(_x * 2 + 1)  # warm-up outside the capture",
        "torch.cuda.current_stream().wait_stream(_s)",
        "_g = torch.cuda.CUDAGraph()",
        "with torch.cuda.graph(_g):",
        "    _y.copy_(_x * 2 + 1)",
        "_x.fill_(3.0); _g.replay(); torch.cuda.synchronize()",
        "print('RESULT ' + json.dumps({'pid': os.getpid(), 'y': float(_y[0])}), flush=True)",
    ]
)
REPLAY = (
    "_x.fill_(5.0); _g.replay(); torch.cuda.synchronize()\n"
    "print('RESULT ' + json.dumps({'ok': bool((_y == 11.0).all())}), flush=True)\n"
)
THREAD = "\n".join(
    [
        "import json, os, threading, time, torch",
        "_n = torch.zeros(1, device='cuda', dtype=torch.int64)",
        "_done, _stop = [0], threading.Event()",
        "def _work():",
        "    while not _stop.is_set():",
        "        _n.add_(1); torch.cuda.synchronize(); _done[0] += 1",
        "_t = threading.Thread(target=_work, name='gpu-worker'); _t.start()",
        "time.sleep(0.2)",
        "print('RESULT ' + json.dumps({'pid': os.getpid()}), flush=True)",
    ]
)
STOP = (
    "_stop.set(); _t.join()\n"
    "print('RESULT ' + json.dumps({'ok': int(_n.item()) == _done[0] > 0}), flush=True)\n"
)


async def _cell(server: PoolServer, kernel_id: str, source: str) -> dict:
    status, text = await run_in_kernel(server.url, kernel_id, source, 300)
    assert status == "ok", text[-3000:]
    return result_line(text)


@contextmanager
def _asked_to_offload(tmp_path: Path, first: str) -> Iterator[tuple[PoolServer, str, dict, dict]]:
    """A pool server whose kernel ran ``first`` and was then asked through REST to offload:
    the server, the kernel, the first cell's result, and the kernel's record once the offload
    ended (offloaded, refused, or in error)."""
    env = {"CUDA_VISIBLE_DEVICES": facts().uuids[0]}
    with pool_server(tmp_path / "pool", "auto", env=env) as server:
        kernel = server.start_kernel()
        result = asyncio.run(_cell(server, kernel, first))
        server.wait_record(kernel, lambda r: r["state"] == "resident", timeout=60)
        server.api(f"singularity/api/kernels/{kernel}/offload", "POST", {})
        record = server.wait_record(
            kernel, lambda r: r["state"] in ("offloaded", "error") or r["offload_refused"]
        )
        yield server, kernel, result, record


def test_a_cuda_graph_goes_whole_with_the_driver_tier_and_replays_after(
    tmp_path: Path, record_property
) -> None:
    with _asked_to_offload(tmp_path, GRAPH) as (server, kernel, built, record):
        assert built["y"] == 7.0
        assert record["state"] == "offloaded", record
        assert record["context"]["checkpointed"] is True, record["context"]
        assert not nvml_process_mib(built["pid"])
        assert asyncio.run(_cell(server, kernel, REPLAY))["ok"]
        record_property("context", server.record(kernel)["context"])


def test_a_thread_left_running_on_the_gpu_keeps_its_kernel_there(
    tmp_path: Path, record_property
) -> None:
    with _asked_to_offload(tmp_path, THREAD) as (server, kernel, started, record):
        assert record["state"] == "resident", record
        assert "gpu-worker" in record["offload_refused"], record
        assert nvml_process_mib(started["pid"])
        assert asyncio.run(_cell(server, kernel, STOP))["ok"]
        record_property("refused", record["offload_refused"])
