"""CUDA that torch's gate never sees, on a real GPU through a real server: a kernel whose GPU
memory is CuPy's (JAX and Numba alike), and one whose only CUDA is torch's pinned memory, which
starts CUDA without ``torch.cuda._lazy_init``. Each must be booked with the pool at the end of the
cell that started CUDA, have its later cells gated, and be evicted by the driver tier alone: no
MiB of it left on the GPU, its data intact when its next cell runs.

Run by ``bench/gpu_check.py``; skipped without a GPU (see gpu_gate.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from gpu_gate import facts
from gpu_server import PoolServer, pool_server
from gpu_state import nvml_process_mib, result_line
from servers import run_in_kernel

pytestmark = pytest.mark.gpu

MiB = 1 << 20

# Each first cell starts CUDA outside torch's gate; each check cell reads what it made.
CUPY = (
    "import json, os, cupy\n"
    "_a = cupy.arange(1 << 28, dtype=cupy.float32)  # 1 GiB\n"
    "_expected = float(_a.sum())\n"
    "print('RESULT ' + json.dumps({'pid': os.getpid()}), flush=True)\n",
    "print('RESULT ' + json.dumps({'intact': float(_a.sum()) == _expected}), flush=True)\n",
)
PINNED = (
    "import json, os, torch\n"
    "_p = torch.full((1 << 20,), 7.0).pin_memory()\n"
    "print('RESULT ' + json.dumps({'pid': os.getpid(), 'torch_cuda': "
    "torch.cuda.is_initialized()}), flush=True)\n",
    "print('RESULT ' + json.dumps({'intact': bool((_p == 7).all()) and _p.is_pinned()}), "
    "flush=True)\n",
)


async def _cell(server: PoolServer, kernel_id: str, source: str) -> dict:
    status, text = await run_in_kernel(server.url, kernel_id, source, 300)
    assert status == "ok", text[-3000:]
    return result_line(text)


@pytest.mark.parametrize(("first", "check"), [CUPY, PINNED], ids=["cupy", "pinned"])
def test_cuda_outside_torch_is_booked_gated_and_evicted_by_the_driver(
    tmp_path: Path, first: str, check: str, record_property
) -> None:
    env = {"CUDA_VISIBLE_DEVICES": facts().uuids[0]}
    with pool_server(tmp_path / "pool", "auto", env=env) as server:
        kernel = server.start_kernel()
        pid = asyncio.run(_cell(server, kernel, first))["pid"]
        # Booked at the end of that cell: a lease taken and given back with NVML's bytes.
        record = server.wait_record(kernel, lambda r: r["state"] == "resident", timeout=60)
        resident_mib = nvml_process_mib(pid)
        assert resident_mib and record["gpu_bytes"] >= resident_mib * MiB // 2, record
        server.api(f"singularity/api/kernels/{kernel}/offload", "POST", {})
        record = server.wait_record(kernel, lambda r: r["state"] in ("offloaded", "error"))
        assert record["state"] == "offloaded", record
        assert record["context"]["checkpointed"] is True, record["context"]
        assert not nvml_process_mib(pid)
        # The next cell is gated: its lease restores the process before it runs.
        assert asyncio.run(_cell(server, kernel, check))["intact"]
        record = server.record(kernel)
        assert record["context"]["checkpointed"] is False, record["context"]
        assert nvml_process_mib(pid)
        record_property("resident_mib", resident_mib)
        record_property("context", record["context"])
