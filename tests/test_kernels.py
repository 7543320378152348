"""Kernels in the pool, end to end: real kernels started through jupyter_server's REST API."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time

import zmq
import zmq.asyncio

from jupyter_singularity.protocol import Sequencer, Signer, encode

GiB = 1 << 30
STATES = {
    "cold",
    "queued",
    "restoring",
    "running",
    "resident",
    "offloading",
    "offloaded",
    "spilled",
    "error",
}

# A GPU cell's lease, as the runtime of a kernel takes it: acquire, then release with the footprint.
TAKE_LEASE = """
from jupyter_singularity.kernel.runtime import Runtime
client = Runtime.current.client
grant = client.request("acquire", {{"request_id": "{rid}", "memory": {memory}}})
client.send("release", {{"request_id": "{rid}", "peak_bytes": {memory}, "gpu_bytes": {memory}}})
client.request("status", {{}})  # the broker handles one kernel's messages in order
print(grant["granted"], grant["device"]["index"])
"""


def booked(pool: dict) -> dict[int, int]:
    return {d["index"]: d["booked_bytes"] for d in pool["devices"]}


async def hold_memory(execute, kernel_id: str, memory: int, rid: str = "r1") -> int:
    status, out = await execute(kernel_id, TAKE_LEASE.format(rid=rid, memory=memory))
    assert status == "ok", out
    granted, device = out.split()
    assert granted == "True"
    return int(device)


async def test_three_kernels_appear_with_valid_states(start_kernel, wait_in_pool, execute):
    ids = [await start_kernel() for _ in range(3)]
    pool = await wait_in_pool(ids)
    kernels = {k["kernel_id"]: k for k in pool["kernels"]}
    assert set(kernels) == set(ids)
    for kernel in kernels.values():
        assert kernel["state"] in STATES
        assert kernel["state"] == "cold"  # no GPU cell has run yet
        assert kernel["home"] in (0, 1)
        assert kernel["process_gpu_bytes"] is None  # simulated devices: NVML has nothing to say
        assert kernel["user"]
    # Homes spread over both devices rather than piling onto one.
    assert {k["home"] for k in kernels.values()} == {0, 1}
    # The runtime is loaded in each kernel and sees its own record.
    status, out = await execute(ids[0], "%singularity status")
    assert status == "ok", out
    assert f"kernel {ids[0]}: cold" in out


async def test_shut_down_kernel_leaves_pool_and_frees_booking(
    start_kernel, wait_in_pool, execute, jp_fetch, get_pool
):
    kernel_id = await start_kernel()
    await wait_in_pool(kernel_id)
    device = await hold_memory(execute, kernel_id, 3 * GiB)
    pool = await get_pool()
    record = next(k for k in pool["kernels"] if k["kernel_id"] == kernel_id)
    assert record["state"] == "resident" and record["gpu_bytes"] == 3 * GiB
    assert booked(pool)[device] == 3 * GiB

    await jp_fetch("api", "kernels", kernel_id, method="DELETE")
    pool = await wait_in_pool(kernel_id, present=False)
    assert booked(pool) == {0: 0, 1: 0}


async def test_kernel_checkpointed_by_the_driver_is_ended_at_shutdown(
    start_kernel, wait_in_pool, execute, jp_fetch, jp_serverapp, singularity_app
):
    kernel_id = await start_kernel()
    await wait_in_pool(kernel_id)
    # A process the driver holds checkpointed cannot exit cleanly: its CUDA calls at exit wait for
    # a restore. Stand-ins for what CI lacks: an exit that waits, and the driver tier's mark.
    status, out = await execute(kernel_id, "import atexit, time; atexit.register(time.sleep, 600)")
    assert status == "ok", out
    manager = jp_serverapp.kernel_manager.get_kernel(kernel_id)
    manager.shutdown_wait_time = 600.0  # a clean exit would be waited for this long
    singularity_app.service._connections[kernel_id].checkpointed_uuid = "GPU-0000"
    process = manager.provisioner.process

    await asyncio.wait_for(jp_fetch("api", "kernels", kernel_id, method="DELETE"), 60)

    assert process.returncode == -signal.SIGKILL
    await wait_in_pool(kernel_id, present=False)


async def test_killed_kernel_leaves_pool_and_frees_booking(
    start_kernel, wait_in_pool, execute, get_pool, wait_for, singularity_app, jp_fetch
):
    kernel_id = await start_kernel()
    await wait_in_pool(kernel_id)
    device = await hold_memory(execute, kernel_id, 5 * GiB)
    _, out = await execute(kernel_id, "import os; print(os.getpid())")
    pid = int(out)
    assert booked(await get_pool())[device] == 5 * GiB

    os.kill(pid, signal.SIGKILL)

    async def freed():
        pool = await get_pool()
        return pool if booked(pool) == {0: 0, 1: 0} else None

    pool = await wait_for(freed, timeout=30)
    # jupyter_server restarts a dead kernel under the same id: it may come back, but fresh.
    for kernel in pool["kernels"]:
        if kernel["kernel_id"] == kernel_id:
            assert kernel["state"] == "cold" and kernel["gpu_bytes"] == 0

    async def restarted():  # let the restart finish, so the server shuts the kernel down cleanly
        model = json.loads((await jp_fetch("api", "kernels", kernel_id)).body)
        return model["execution_state"] == "idle"

    await wait_for(restarted, timeout=60)
    events = singularity_app.service.ledger.events(kernel_id=kernel_id, limit=50)
    assert any(e["new_state"] == "gone" and "died" in e["reason"] for e in events), events


BOUND_LEASE = """
from jupyter_singularity.kernel.runtime import Runtime
from jupyter_singularity.kernel.client import BrokerError
client = Runtime.current.client
try:
    grant = client.request("acquire", {{"request_id": "{rid}", "bound_uuid": "{uuid}"}})
except BrokerError as err:
    print("error:", err)
else:
    client.send("release", {{"request_id": "{rid}", "peak_bytes": 0, "gpu_bytes": 0}})
    print(grant["granted"], grant["device"]["index"])
"""


async def test_kernel_whose_cuda_chose_a_gpu_is_granted_that_gpu(
    start_kernel, wait_in_pool, execute, get_pool
):
    kernel_id = await start_kernel()
    pool = await wait_in_pool(kernel_id)
    home = next(k["home"] for k in pool["kernels"] if k["kernel_id"] == kernel_id)
    other = next(d for d in pool["devices"] if d["index"] != home)

    # A library initialised CUDA before the first lease: its GPU is fixed, the grant must follow.
    status, out = await execute(kernel_id, BOUND_LEASE.format(rid="r1", uuid=other["uuid"]))
    assert status == "ok", out
    assert out.split() == ["True", str(other["index"])], out

    status, out = await execute(kernel_id, BOUND_LEASE.format(rid="r2", uuid="GPU-nope"))
    assert status == "ok", out
    assert out.startswith("error:") and "GPU GPU-nope is not in this pool" in out, out


async def test_forged_rpc_message_is_rejected(
    start_kernel, wait_in_pool, execute, singularity_app, get_pool
):
    kernel_id = await start_kernel()
    await wait_in_pool(kernel_id)
    service = singularity_app.service
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    service.log.addHandler(handler)
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(service.endpoint)
    try:
        # A message claiming to be the kernel, asking for the whole device, signed with a wrong key.
        forged = Sequencer(kernel_id, "kernel").make(
            "acquire", {"request_id": "forged", "memory": 16 * GiB}
        )
        await sock.send_multipart(encode(forged, Signer(b"0" * 64)))
        deadline = time.monotonic() + 10
        while not any("dropped message" in r.getMessage() for r in records):
            assert time.monotonic() < deadline, "the broker did not report the forged message"
            await __import__("asyncio").sleep(0.05)
    finally:
        sock.close(linger=0)
        service.log.removeHandler(handler)
    message = next(r.getMessage() for r in records if "dropped message" in r.getMessage())
    assert "signature" in message
    pool = await get_pool()
    assert booked(pool) == {0: 0, 1: 0}
    assert next(k for k in pool["kernels"] if k["kernel_id"] == kernel_id)["state"] == "cold"
    # The real kernel is unaffected and still served.
    assert await hold_memory(execute, kernel_id, 1 * GiB) in (0, 1)


async def test_kernel_record_lists_events_with_durations(
    start_kernel, wait_in_pool, execute, get_json
):
    kernel_id = await start_kernel()
    await wait_in_pool(kernel_id)
    await hold_memory(execute, kernel_id, 2 * GiB)
    record = await get_json("singularity", "api", "kernels", kernel_id)
    assert record["state"] == "resident"
    assert record["device"] in (0, 1) and record["gpu_bytes"] == 2 * GiB
    assert [e["new_state"] for e in record["events"]][:2] == ["resident", "running"]
    usage = await get_json("singularity", "api", "usage")
    assert usage["leases"][0]["kernel_id"] == kernel_id
    assert usage["leases"][0]["gpu_seconds"] is not None


async def test_offload_and_pin_through_rest(
    start_kernel, wait_in_pool, execute, jp_fetch, get_json, wait_for
):
    kernel_id = await start_kernel()
    await wait_in_pool(kernel_id)
    await hold_memory(execute, kernel_id, 2 * GiB)
    response = await jp_fetch(
        "singularity",
        "api",
        "kernels",
        kernel_id,
        "pin",
        method="POST",
        body=json.dumps({"pinned": True}),
    )
    assert json.loads(response.body)["pinned"] is True
    await jp_fetch("singularity", "api", "kernels", kernel_id, "offload", method="POST", body="{}")

    async def offloaded():
        record = await get_json("singularity", "api", "kernels", kernel_id)
        return record if record["state"] not in ("resident", "offloading") else None

    record = await wait_for(offloaded, timeout=30)
    # This runtime has no GPU state to move yet: it reports honestly that nothing stayed.
    assert record["state"] == "offloaded"
    assert record["gpu_bytes"] == 0 and record["device"] is None


# A cell's view of what the tensor tier must not race (see kernel/outliving.py).
OUTLIVING = (
    "from jupyter_singularity.kernel.runtime import Runtime\n"
    "print(repr(Runtime.current.outliving.running_threads()))"
)


async def test_a_thread_a_cell_left_running_is_seen_and_the_kernels_own_are_not(
    start_kernel, wait_in_pool, execute
):
    """A thread started by a cell that still runs may use tensors as they move: it is named.
    The kernel's own threads (ipykernel's, also those it starts after the extension loaded or
    after the first cell, such as the subshells JupyterLab asks for, and the runtime's) never
    are, whatever the cells before used."""
    kernel_id = await start_kernel()
    await wait_in_pool(kernel_id)
    for code in (
        "1 + 1",
        "%singularity",
        "import asyncio\nawait asyncio.sleep(0.01)",
        "from IPython.display import display\ndisplay('x')",
        # a subshell's thread, of ipykernel's own class, as a subshell request starts it
        "from ipykernel.thread import BaseThread\n"
        "_subshell = BaseThread(name='subshell-test', daemon=True)\n_subshell.start()",
        OUTLIVING,
    ):
        status, out = await execute(kernel_id, code)
        assert status == "ok", out
    assert out.strip() == "''", out
    status, out = await execute(
        kernel_id,
        "import threading\n_stop = threading.Event()\n"
        "threading.Thread(target=_stop.wait, name='loader').start()\n" + OUTLIVING,
    )
    assert status == "ok" and "thread(s) started by its cells still run (loader):" in out, out
    status, out = await execute(
        kernel_id, "_stop.set()\nimport time\ntime.sleep(0.2)\n" + OUTLIVING
    )
    assert status == "ok" and out.strip() == "''", out
