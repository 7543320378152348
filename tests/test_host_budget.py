"""``host_memory_limit`` holds at all times, end to end, through a real server and real kernels.

Four kernels with known tensors take turns on one small simulated device that holds one of them
at a time, so cells wait while the others are offloaded: the normal state under load. The pool
view, sampled throughout, never shows more offloaded state in host memory than the limit, with
the room reserved for offloads in flight (what does not fit goes to disk), and every kernel's
tensors come back bit-identical.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cells import record_of

MiB = 1 << 20
LIMIT = 40 * MiB  # less than one kernel's state
KERNELS = 4
ROUNDS = 3

# 48 MiB of random bytes in three storages, different for each kernel.
STATE = """
import ctypes, hashlib, torch
generator = torch.Generator().manual_seed({seed})
state = [
    torch.randint(0, 256, (n << 20,), dtype=torch.uint8, generator=generator) for n in (24, 16, 8)
]

def digest():
    h = hashlib.sha256()
    for t in state:
        h.update(ctypes.string_at(t.data_ptr(), t.numel()))
    return h.hexdigest()

print("digest", digest())
"""


@pytest.fixture
def singularity_devices() -> str:
    """One device that holds one kernel's state and the reservation of its next cell."""
    return "simulated:1x128MiB"


def digest_of(text: str) -> str:
    return next(line.split()[1] for line in text.splitlines() if line.startswith("digest "))


@pytest.mark.parametrize("singularity_config", [{"host_memory_limit": "40MiB"}], indirect=True)
async def test_host_memory_limit_holds_while_cells_wait(
    start_kernel, wait_in_pool, run, get_pool, singularity_app
):
    kernels = [await start_kernel() for _ in range(KERNELS)]
    await wait_in_pool(kernels)
    over: list[dict] = []  # samples with more host memory held than the limit
    seen = {"samples": 0, "host": 0, "disk": 0, "queued beside offloaded": 0}
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            pool = await get_pool()
            records = [r for r in pool["kernels"] if r["kernel_id"] in kernels]
            held = sum(r["host_bytes"] + r["host_reserved"] for r in records)
            states = {r["state"] for r in records}
            seen["samples"] += 1
            seen["host"] = max(seen["host"], held)
            seen["disk"] = max(seen["disk"], sum(r["disk_bytes"] for r in records))
            if "queued" in states and states & {"offloaded", "spilled"}:
                seen["queued beside offloaded"] += 1
            if held > LIMIT:
                over.append(pool)
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        built = await asyncio.gather(
            *(run(k, STATE.format(seed=i), timeout=180) for i, k in enumerate(kernels))
        )
        assert all(status == "ok" for status, _, _ in built), built
        digests = [digest_of(text) for _, text, _ in built]
        assert len(set(digests)) == KERNELS
        for _ in range(ROUNDS):
            again = await asyncio.gather(
                *(run(k, "print('digest', digest())", timeout=180) for k in kernels)
            )
            assert all(status == "ok" for status, _, _ in again), again
            assert [digest_of(text) for _, text, _ in again] == digests  # bit-identical
    finally:
        done.set()
        await sampler

    pool = await get_pool()
    assert singularity_app.host_memory_limit_bytes == LIMIT
    assert not over, f"{len(over)} samples held more than {LIMIT} bytes: {over[0]['kernels']}"
    # The test saw what it is about: contention, the host budget in use, state on disk.
    assert seen["queued beside offloaded"] and seen["host"] and seen["disk"], seen
    assert all(record_of(pool, k)["state"] != "error" for k in kernels), pool


@pytest.mark.parametrize("singularity_config", [{"host_memory_limit": "40MiB"}], indirect=True)
async def test_an_offload_that_fits_neither_host_memory_nor_disk_is_refused_with_the_reason(
    start_kernel, wait_in_pool, run, get_pool, singularity_app
):
    k1, k2 = await start_kernel(), await start_kernel()
    await wait_in_pool([k1, k2])
    status, out, _ = await run(k1, STATE.format(seed=1))
    assert status == "ok", out
    digest = digest_of(out)
    # Kernel 1's spill directory cannot be made: a file stands in its way.
    (Path(singularity_app.spill_dir) / k1).write_bytes(b"")

    # Kernel 2's cell needs kernel 1 off the device; 40 of its 48 MiB fit host memory, the rest
    # cannot go to disk: it stays, and the cell hears why it did not run.
    status, out, _ = await run(k2, "%%singularity --memory 100MiB\nprint('ran')")

    refusal = (
        "host_memory_limit (40.0 MiB) is full and the spill directory cannot take the rest: "
        f"cannot write spill file {Path(singularity_app.spill_dir) / k1}/"
    )
    assert status == "error" and "ran" not in out, out
    assert refusal in out, out
    record = record_of(await get_pool(), k1)
    assert record["state"] == "resident" and record["host_bytes"] == 0, record
    assert record["offload_refused"].startswith(refusal), record
    assert "\n" not in record["offload_refused"], record
    status, out, _ = await run(k1, "print('digest', digest())")  # nothing was lost
    assert status == "ok" and digest_of(out) == digest, out
