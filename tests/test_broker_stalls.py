"""Kernels that stop answering, in the decision core (the hardening issue, "no stall lasts forever").

A stalled kernel is never asked to make room, a request that can run on another GPU does not wait
for it, a GPU whose stalled lease holder may still write takes no new grant, and a revoked lease
frees the GPU while the kernel's state waits in host memory.
"""

from __future__ import annotations

import pytest
from test_broker_core import T0, GiB, S, make, of, one, run_cell, sim

from jupyter_singularity.broker.model import BrokerError, Grant, Offload, StateChanged, Wait


def test_a_stalled_idle_kernel_is_not_chosen_to_make_room_and_the_cell_goes_elsewhere():
    core = make(sim("2x16GiB"), kernels={"idle": "ann", "hung": "bob", "new": "cy"})
    run_cell(core, "idle", "r1", T0 + 1, T0 + 2, 12 * GiB)  # GPU 0 (both empty: lowest index)
    run_cell(core, "hung", "r2", T0 + 3, T0 + 4, 12 * GiB)  # GPU 1
    assert (core.kernels["idle"].device, core.kernels["hung"].device) == (0, 1)
    # hung's GPU is its home, and the least recently used idle kernel is on it after idle runs.
    run_cell(core, "idle", "r3", T0 + 5, T0 + 6, 12 * GiB)
    core.set_stalled("hung", T0 + 4, T0 + 7)

    actions = core.acquire("new", "r4", T0 + 8, memory=10 * GiB)

    assert ids_of(actions, Offload) == ["idle"]  # not hung, although it is the older one
    assert core.kernels["hung"].state == S.RESIDENT


def test_a_request_waiting_for_a_stalled_offload_moves_to_another_gpu():
    core = make(sim("2x16GiB"), kernels={"a": "ann", "b": "bob", "c": "cy"})
    run_cell(core, "a", "r1", T0 + 1, T0 + 2, 12 * GiB)
    run_cell(core, "b", "r2", T0 + 3, T0 + 4, 12 * GiB)
    first = core.acquire("c", "r3", T0 + 5, memory=10 * GiB)
    victim = one(first, Offload)
    assert one(first, Wait).kernel_id == "c"
    other = 1 - victim.device
    # The victim stops answering before it reports its offload.
    actions = core.set_stalled(victim.kernel_id, T0 + 5, T0 + 20)
    note = [a for a in of(actions, StateChanged) if a.kernel_id == victim.kernel_id]
    assert note and note[0].old == note[0].new and "stopped answering" in note[0].reason
    # The cell is re-placed: the other GPU's idle kernel is asked to make room instead.
    offload = one(actions, Offload)
    assert (offload.device, offload.kernel_id) == (other, "ab"[other])
    grant = one(core.offloaded(offload.kernel_id, T0 + 21, host_bytes=12 * GiB), Grant)
    assert (grant.kernel_id, grant.device) == ("c", other)


def test_a_gpu_held_only_by_a_stalled_kernel_makes_the_cell_wait_saying_why():
    core = make(sim("1x16GiB"), kernels={"hung": "ann", "new": "bob"})
    run_cell(core, "hung", "r1", T0 + 1, T0 + 2, 12 * GiB)
    core.set_stalled("hung", T0 + 2, T0 + 10)
    actions = core.acquire("new", "r2", T0 + 11, memory=8 * GiB)
    wait = one(actions, Wait)
    assert "stopped answering" in wait.reason and "hung"[:8] in wait.reason
    assert not of(actions, Offload)
    # It answers again: it is evicted as usual and the cell runs.
    offload = one(core.set_stalled("hung", None, T0 + 12), Offload)
    assert offload.kernel_id == "hung"
    assert one(core.offloaded("hung", T0 + 13, host_bytes=12 * GiB), Grant).kernel_id == "new"


def test_an_unavailable_gpu_takes_no_grant_until_it_is_usable_again():
    core = make(sim("2x16GiB"), kernels={"k": "ann"})
    core.set_device_unavailable(0, "kernel x stalled", T0)
    core.set_device_unavailable(1, "kernel y stalled", T0)
    wait = one(core.acquire("k", "r1", T0 + 1, memory=GiB), Wait)
    assert "GPU 0 is unavailable: kernel x stalled" in wait.reason
    assert core.snapshot(T0 + 1)["devices"][1]["unavailable"] == "kernel y stalled"
    grant = one(core.set_device_unavailable(1, None, T0 + 2), Grant)
    assert grant.device == 1
    with pytest.raises(BrokerError):
        core.set_device_unavailable(7, "no such GPU", T0)


def test_revoking_a_stalled_lease_frees_the_gpu_and_keeps_the_state_to_restore():
    core = make(sim("1x16GiB"), kernels={"hung": "ann", "new": "bob"})
    grant = one(core.acquire("hung", "r1", T0 + 1, memory=12 * GiB), Grant)
    waiting = core.acquire("new", "r2", T0 + 2, memory=8 * GiB)
    assert one(waiting, Wait)
    actions = core.revoke("hung", T0 + 200, "stalled for 190 s")
    assert one(actions, Grant).kernel_id == "new"
    kernel = core.kernels["hung"]
    # Its state is with the driver (the service restores its process before any grant).
    assert (kernel.state, kernel.device, kernel.lease, kernel.gpu_bytes) == (
        S.OFFLOADED,
        None,
        None,
        grant.reservation,
    )
    assert grant.reservation and core.used_seconds("ann", T0 + 200) == pytest.approx(199)
    # It comes back with a restore once there is room.
    core.release("new", "r2", T0 + 201, peak_bytes=GiB, gpu_bytes=GiB)
    # (its peak is unknown: a restore reserves the whole device, so the idle kernel makes room)
    assert one(core.restore("hung", T0 + 202), Offload).kernel_id == "new"
    grant = one(core.offloaded("new", T0 + 203, host_bytes=GiB), Grant)
    assert (grant.kernel_id, grant.hold) == ("hung", False)
    assert core.kernels["hung"].booking() == 12 * GiB  # its footprint is booked again at once


def ids_of(actions: list, cls: type) -> list[str]:
    return [a.kernel_id for a in of(actions, cls)]


def test_a_grant_is_not_a_side_effect_of_marking_a_stall():
    core = make(sim("1x16GiB"), kernels={"k": "ann"})
    assert not of(core.set_stalled("k", T0, T0 + 1), Grant)
    assert core.set_stalled("k", T0, T0 + 2) == []  # unchanged: nothing to say
    assert isinstance(core.kernels["k"].to_dict()["stalled_since"], float)
    assert core.kernels["k"].state == S.COLD


def test_a_first_cell_does_not_take_a_gpu_a_stalled_kernel_fills_with_nothing_booked():
    core = make(sim("1x16GiB"), kernels={"hung": "ann", "new": "bob"})
    one(core.acquire("hung", "r1", T0 + 1), Grant)  # a first cell: the whole device
    core.set_stalled("hung", T0 + 1, T0 + 10)
    wait = one(core.acquire("new", "r2", T0 + 11), Wait)
    assert "stopped answering" in wait.reason
