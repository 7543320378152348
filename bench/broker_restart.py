"""Broker restart to all kernels re-registered: kill -9 of a node broker, started again at once.

A real ``jupyter singularity broker`` process and a server's real connection to it (``NodePool``,
which registers its kernels again when the broker comes back); the time is from the new broker
process's start until every kernel is back in its pool with what it holds (each one resident
again, as before the kill). Goal (node broker issue): <= 5 s with 100 kernels.

Two kinds of kernels:

* ``--kind light`` (default, 100): processes that run the kernel's real client, membership and
  runtime (``Runtime.attach`` without IPython: the same hello, keeper thread, holdings and rejoin
  code), each holding a lease's worth of state on a simulated GPU. 100 real ipykernel kernels do
  not fit this 2-core machine (each takes seconds of CPU to start and ~80 MB of memory), and the
  rejoin path does not involve IPython.
* ``--kind ipykernel`` (20 by default): real IPython kernels started by jupyter_client through the
  pool's provisioner, each made resident by a ``%%singularity`` cell.

Run: ``python bench/broker_restart.py`` and ``python bench/broker_restart.py --kind ipykernel``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from embedded_pool import NodeBrokerProcess

from jupyter_singularity.server.node_pool import NodePool

REPO = Path(__file__).resolve().parent.parent
GOAL_SECONDS = 5.0
MiB = 1 << 20

LIGHT_KERNEL = """
import threading
from jupyter_singularity.kernel.runtime import Runtime
runtime = Runtime.attach(None)
runtime.release(runtime.acquire(64 << 20, top_of_cell=False))
print("ready", flush=True)
threading.Event().wait()
"""


async def pool_of(node: NodePool) -> dict | None:
    try:
        return await node.call("pool")
    except Exception:  # not answering yet
        return None


async def all_resident(node: NodePool, ids: set[str], timeout: float = 600.0) -> dict:
    """The first moment the broker's pool shows every kernel of ``ids`` resident; when the broker
    first answered, and when all were resident (time.monotonic)."""
    deadline = time.monotonic() + timeout
    answered = None
    while time.monotonic() < deadline:
        pool = await pool_of(node)
        now = time.monotonic()
        if pool is not None:
            answered = answered or now
            resident = {k["kernel_id"] for k in pool["kernels"] if k["state"] == "resident"}
            if ids <= resident:
                return {"answered": answered, "all": now}
        await asyncio.sleep(0.05)
    raise TimeoutError(f"not every kernel was resident again within {timeout} s")


async def light_kernels(node: NodePool, count: int) -> list[subprocess.Popen]:
    env_base = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    processes = []
    for i in range(count):
        kernel_id = f"bench-{i:03d}"
        launch = await node.call("register_kernel", kernel_id=kernel_id, notebook="")
        process = subprocess.Popen(
            [sys.executable, "-c", LIGHT_KERNEL],
            env={**env_base, **launch["env"]},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        await node.call("kernel_started", kernel_id=kernel_id, pid=process.pid)
        processes.append(process)
    for process in processes:  # (a wait line, if any, is printed before)
        while (line := await asyncio.to_thread(process.stdout.readline)).strip() != b"ready":
            assert line, "a kernel process ended"
    return processes


async def ipykernels(node: NodePool, count: int) -> list:
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_client.provisioning import KernelProvisionerFactory

    from jupyter_singularity.server.provisioner import SingularityProvisioner

    SingularityProvisioner.pool = node
    KernelProvisionerFactory.instance().default_provisioner_name = "singularity-provisioner"
    managers = []
    for _ in range(count):
        manager = AsyncKernelManager(kernel_name="python3")
        await manager.start_kernel()
        managers.append(manager)
    for manager in managers:
        client = manager.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=300)
            reply = await client.execute_interactive(
                "%%singularity --memory 64MiB\npass", timeout=300
            )
            assert reply["content"]["status"] == "ok", reply["content"]
        finally:
            client.stop_channels()
    return managers


async def run(kind: str, count: int, devices: str) -> dict:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp:
        broker = NodeBrokerProcess(Path(tmp), devices)
        broker.start()
        node = NodePool(broker.socket, logging.getLogger("bench.server"))
        await node.start()
        kernels: list = []
        try:
            while await pool_of(node) is None:
                if (log := broker.failed()) is not None:
                    raise RuntimeError("the broker did not start:\n" + log)
                await asyncio.sleep(0.1)
            if kind == "light":
                kernels = await light_kernels(node, count)
            else:
                kernels = await ipykernels(node, count)
            ids = set(node.kernels)
            await all_resident(node, ids)

            broker.kill()
            started = broker.start()
            times = await all_resident(node, ids)
            result = {
                "kernels": len(ids),
                "kind": kind,
                "restart_to_all_rejoined_s": round(times["all"] - started, 3),
                "broker_answering_to_all_rejoined_s": round(times["all"] - times["answered"], 3),
                "goal_s": GOAL_SECONDS,
            }
            result["ratio_to_goal"] = round(result["restart_to_all_rejoined_s"] / GOAL_SECONDS, 3)
            return result
        finally:
            if kind == "light":
                for process in kernels:
                    process.kill()
                    process.wait()
            else:
                for manager in kernels:
                    await manager.shutdown_kernel(now=True)
            await node.stop()
            broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", choices=["light", "ipykernel"], default="light")
    parser.add_argument("-n", type=int, default=None, help="kernels (100 light, 20 ipykernel)")
    parser.add_argument("--devices", default="simulated:4x16GiB")
    args = parser.parse_args()
    count = args.n or (100 if args.kind == "light" else 20)
    print(json.dumps(asyncio.run(run(args.kind, count, args.devices)), indent=2))


if __name__ == "__main__":
    main()
