"""Pipelined swaps through a real server, real kernels and a real pool (simulated devices).

Two kernels of 96 MiB each cannot share the 160 MiB device, so a cell of one evicts the other:
the waiting kernel restores into the 64 MiB free beside the victim at once, and into the room the
victim frees as it copies its storages meanwhile (see jupyter_singularity.broker.swaps).
Each test checks that both kernels' bytes are intact and that no booking is left behind.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from cells import slow_copies, tensor_state

MiB = 1 << 20

#: The victim's copies are slowed down, so that the incoming kernel's restore overlaps them.
SLOW_COPIES = slow_copies(0.03)

#: The victim's next pipelined offload fails when it frees its 9th storage, once.
FAIL_MIDWAY = """
import jupyter_singularity.kernel.offload as _offload
_plain_resize = _offload._resize
_frees = []
def _failing_resize(storage, nbytes):
    if nbytes == 0:
        _frees.append(1)
        if len(_frees) == 9:
            raise RuntimeError("injected failure while freeing")
    _plain_resize(storage, nbytes)
_offload._resize = _failing_resize
"""

TRANSFERS = """
from jupyter_singularity.kernel.runtime import Runtime
print([(t.kind, t.reason, bool(t.error)) for t in Runtime.current.transfers])
"""


@pytest.fixture
def singularity_devices() -> str:
    return "simulated:1x160MiB"


async def made(run, kernel_id: str, seed: int) -> str:
    status, out, _ = await run(kernel_id, tensor_state(seed, 24))
    assert status == "ok", out
    return out.split("digest")[-1].strip()


async def digest_of(run, kernel_id: str) -> str:
    status, out, _ = await run(kernel_id, "print('digest', digest())", timeout=120)
    assert status == "ok", out
    return out.split("digest")[-1].strip()


async def transfers(run, kernel_id: str) -> str:
    status, out, _ = await run(kernel_id, TRANSFERS, timeout=120)
    assert status == "ok", out
    return out


def no_booking_leaked(pool: dict) -> None:
    for device in pool["devices"]:
        on_it = sum(k["booked_bytes"] for k in pool["kernels"] if k["device"] == device["index"])
        assert device["booked_bytes"] == on_it <= device["total_bytes"], pool


async def two_kernels(start_kernel, wait_in_pool, run, state) -> tuple[str, str, str, str, int]:
    """``incoming`` offloaded (all in host memory), ``victim`` resident with slow copies; and the
    incoming kernel's pid."""
    incoming, victim = await start_kernel(), await start_kernel()
    await wait_in_pool([incoming, victim])
    incoming_digest = await made(run, incoming, seed=1)
    status, out, _ = await run(incoming, "import os; print('pid', os.getpid())")
    assert status == "ok", out
    pid = int(out.split("pid")[-1])
    victim_digest = await made(run, victim, seed=2)
    await state(incoming, "offloaded", timeout=60)
    status, out, _ = await run(victim, SLOW_COPIES)
    assert status == "ok", out
    return incoming, victim, incoming_digest, victim_digest, pid


async def test_a_swap_restores_the_incoming_kernel_while_the_victim_offloads(
    start_kernel, wait_in_pool, run, state, get_pool
):
    incoming, victim, incoming_digest, victim_digest, _ = await two_kernels(
        start_kernel, wait_in_pool, run, state
    )

    assert await digest_of(run, incoming) == incoming_digest
    # The incoming kernel restored early (reason "swap"): into the room free beside the victim,
    # then into what the victim freed.
    moves = await transfers(run, incoming)
    # ... and kept it: the grant came while the victim's report was being handled, and the
    # room was not taken back (which would offload it again and restore it a second time).
    assert moves.rstrip().endswith("('restore', 'swap', False)]"), moves
    assert await digest_of(run, victim) == victim_digest
    assert await digest_of(run, incoming) == incoming_digest
    no_booking_leaked(await get_pool())


async def test_a_victim_failing_midway_gets_its_room_back_and_loses_nothing(
    start_kernel, wait_in_pool, run, state, get_pool
):
    incoming, victim, incoming_digest, victim_digest, _ = await two_kernels(
        start_kernel, wait_in_pool, run, state
    )
    status, out, _ = await run(victim, FAIL_MIDWAY)
    assert status == "ok", out

    # The victim's offload fails after freeing 8 storages: the incoming kernel gives back what
    # it restored, the victim refills its storages and stays resident, and the cell that needed
    # its room is refused with the reason (the core's rule for a kernel that cannot be offloaded).
    status, out, _ = await run(incoming, "print('digest', digest())", timeout=120)
    assert status == "error" and "injected failure while freeing" in out, out
    assert await digest_of(run, victim) == victim_digest
    # The failure was once: the victim is evicted again and the incoming kernel's state is intact.
    assert await digest_of(run, incoming) == incoming_digest
    log = await transfers(run, victim)
    assert "('offload', 'making room" in log and "True)" in log, log  # the failed offload
    assert await digest_of(run, victim) == victim_digest
    no_booking_leaked(await get_pool())


async def test_the_incoming_kernel_dying_mid_restore_costs_the_victim_nothing(
    start_kernel, wait_in_pool, run, state, get_pool, wait_for
):
    incoming, victim, _, victim_digest, pid = await two_kernels(
        start_kernel, wait_in_pool, run, state
    )

    # Slower still (~3 s for the victim's offload), so that the kill lands mid-swap under load too.
    status, out, _ = await run(victim, slow_copies(0.1))
    assert status == "ok", out
    incoming_cell = asyncio.ensure_future(run(incoming, "print(digest())", timeout=20))
    await state(victim, "offloading", timeout=60)
    await asyncio.sleep(0.2)  # the victim has freed some storages, the incoming restores
    os.kill(pid, signal.SIGKILL)
    with pytest.raises((TimeoutError, ConnectionError)):
        await incoming_cell

    assert await digest_of(run, victim) == victim_digest
    no_booking_leaked(await get_pool())


@pytest.mark.parametrize("singularity_devices", ["simulated:1x160MiB"])
async def test_two_victims_make_room_together(
    start_kernel, wait_in_pool, run, state, get_pool, jp_fetch, singularity_devices
):
    """The incoming kernel asks for nearly the whole device: both resident kernels (48 MiB each)
    are evicted, and it restores into the 64 MiB free beside them and the room the two free."""
    incoming, first, second = await start_kernel(), await start_kernel(), await start_kernel()
    await wait_in_pool([incoming, first, second])
    digests = {}
    for kernel_id, seed, memory, storages in (
        (incoming, 1, "100MiB", 24),
        (first, 2, "100MiB", 12),
        (second, 3, "100MiB", 12),
    ):
        status, out, _ = await run(
            kernel_id, f"%%singularity --memory {memory}\n{tensor_state(seed, storages)}"
        )
        assert status == "ok", out
        digests[kernel_id] = out.split("digest")[-1].strip()
    await jp_fetch("singularity", "api", "kernels", incoming, "offload", method="POST", body="")
    await state(incoming, "offloaded", timeout=60)
    for victim in (first, second):
        await state(victim, "resident", timeout=60)
        status, out, _ = await run(victim, f"%%singularity --memory 100MiB\n{SLOW_COPIES}")
        assert status == "ok", out

    status, out, _ = await run(
        incoming, "%%singularity --memory 150MiB\nprint('digest', digest())", timeout=120
    )
    assert status == "ok" and out.split("digest")[-1].strip() == digests[incoming], out
    assert "('restore', 'swap', False)" in await transfers(run, incoming)
    for victim in (first, second):
        log = await transfers(run, victim)
        assert f"('offload', 'making room for kernel {incoming[:8]}', False)" in log, log
    for kernel_id, digest in digests.items():
        assert await digest_of(run, kernel_id) == digest
    no_booking_leaked(await get_pool())
