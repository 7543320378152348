"""Tensor-tier bandwidth against a plain copy of the same bytes, measured in the same run.

Fills ``--gib`` GiB of tensors on the device, then times (1) a plain copy of them to reusable host
buffers and back (pinned on CUDA: the physical ceiling) and (2) the engine's offload and restore,
first with a cold host pool (allocation included) then warm. Prints JSON with the ratios; the
goal on CUDA (issue 3) is offload and restore ≥ 0.9 x the pinned copy. ``--spill-dir`` adds a
spill to disk and a restore from it. ``--device cpu`` runs the simulated path (the "device" is
host memory, so ratios show the engine's overhead, not PCIe).

Run: ``python bench/offload_bandwidth.py [--device cuda] [--gib 8] [--spill-dir /tmp/spill]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from jupyter_singularity.kernel.offload import TensorEngine, Transfer

MIB = 1 << 20


def timed(device: torch.device, work: Callable[[], object]) -> float:
    """Seconds for ``work`` including every asynchronous copy it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def fill(device: torch.device, gib: float, tensor_mib: int) -> list[torch.Tensor]:
    count = max(1, int(gib * 1024 / tensor_mib))
    generator = torch.Generator(device=device).manual_seed(0)
    return [
        torch.empty(tensor_mib * MIB // 4, device=device).uniform_(generator=generator)
        for _ in range(count)
    ]


def checksums(tensors: list[torch.Tensor]) -> list[int]:
    return [int(t.view(torch.int32).sum(dtype=torch.int64)) for t in tensors]


def plain_copy(device: torch.device, tensors: list[torch.Tensor], rounds: int) -> dict:
    """Best of ``rounds`` copies to preallocated host buffers and back (pinned on CUDA)."""
    pinned = device.type == "cuda"
    hosts = [torch.empty_like(t, device="cpu", pin_memory=pinned) for t in tensors]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)

    def out() -> None:
        for host, t in zip(hosts, tensors, strict=True):
            host.copy_(t, non_blocking=True)

    def back() -> None:
        for host, t in zip(hosts, tensors, strict=True):
            t.copy_(host, non_blocking=True)

    d2h = min(timed(device, out) for _ in range(rounds))
    h2d = min(timed(device, back) for _ in range(rounds))
    return {"to_host_gbps": nbytes / d2h / 1e9, "to_device_gbps": nbytes / h2d / 1e9}


def cycle(engine: TensorEngine, device: torch.device) -> tuple[Transfer, Transfer]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return engine.offload(), engine.restore()


def run(
    device: torch.device, gib: float, tensor_mib: int, cycles: int, spill_dir: Path | None
) -> dict:
    tensors = fill(device, gib, tensor_mib)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    expected = checksums(tensors)
    copy = plain_copy(device, tensors, rounds=3)
    gc.collect()

    engine = TensorEngine(
        simulated=device.type == "cpu", pinned_limit=nbytes + 64 * MIB, min_bytes=MIB
    )
    scan = min(timed(device, engine.device_bytes) for _ in range(3))
    cold_offload, cold_restore = cycle(engine, device)
    warm = [cycle(engine, device) for _ in range(cycles)]
    identical = checksums(tensors) == expected
    offload_gbps = statistics.median(o.gbps for o, _ in warm)
    restore_gbps = statistics.median(r.gbps for _, r in warm)
    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else "cpu (simulated)",
        "torch": torch.__version__,
        "bytes": nbytes,
        "tensors": len(tensors),
        "gc_objects": len(gc.get_objects()),
        "scan_seconds": scan,
        "plain_copy": copy,
        "offload_cold_gbps": cold_offload.gbps,
        "restore_cold_gbps": cold_restore.gbps,
        "offload_gbps": offload_gbps,
        "restore_gbps": restore_gbps,
        "offload_vs_copy": offload_gbps / copy["to_host_gbps"],
        "restore_vs_copy": restore_gbps / copy["to_device_gbps"],
        "storages_moved": warm[-1][0].storages,
        "left_bytes_after_offload": warm[-1][0].left_bytes,
        "pool_bytes": engine.pool_bytes,
        "bit_identical_checksums": identical,
    }
    if device.type == "cuda":
        engine.offload()
        result["cuda_memory_reserved_while_offloaded"] = torch.cuda.memory_reserved(device)
        engine.restore()
    if spill_dir is not None:
        engine.offload()
        started = time.perf_counter()
        written = engine.spill(spill_dir)
        spill_seconds = time.perf_counter() - started
        restored = engine.restore()
        result["spill_write_gbps"] = written / spill_seconds / 1e9
        result["restore_from_disk_gbps"] = restored.gbps
        result["bit_identical_after_spill"] = checksums(tensors) == expected
    engine.discard()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--gib", type=float, default=1.0, help="GiB of tensors to move")
    parser.add_argument("--tensor-mib", type=int, default=64, help="size of each tensor")
    parser.add_argument("--cycles", type=int, default=3, help="warm offload/restore cycles")
    parser.add_argument("--spill-dir", type=Path, help="also spill to this directory and back")
    parser.add_argument("--spill", action="store_true", help="spill to a temporary directory")
    args = parser.parse_args()
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if args.device == "cuda"
        else torch.device("cpu")
    )
    with tempfile.TemporaryDirectory() as temporary:
        spill_dir = args.spill_dir or (Path(temporary) if args.spill else None)
        print(json.dumps(run(device, args.gib, args.tensor_mib, args.cycles, spill_dir), indent=2))


if __name__ == "__main__":
    main()
