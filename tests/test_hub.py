"""Real JupyterHub, real Unix users, each user's server with its own (embedded) pool.

alice and bob log in (tokens of their own), start their servers through the hub, and run a torch
cell over a kernel websocket through the proxy; their kernels run as them, and each pool answers
its owner only. The harness is tests/hub.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from cells import record_of

pytestmark = [pytest.mark.hub, pytest.mark.timeout(900)]  # a first run builds the users' venv

GiB = 1 << 30
WHO_AND_TORCH = """
import getpass, os, torch
x = torch.ones(1024, 1024)
print(os.getuid(), getpass.getuser(), os.environ.get("SGTEST_SPAWN"), float(x.sum()))
"""


async def resident(client, kernel_id: str, timeout: float = 60.0) -> dict:
    """The pool once the kernel's record there is ``resident`` (the cell's lease ended)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        pool = await client.pool()
        record = record_of(pool, kernel_id)
        if record is not None and record["state"] == "resident":
            return pool
        assert loop.time() < deadline, f"not resident after {timeout} s: {record}"
        await asyncio.sleep(0.2)


async def test_each_user_runs_torch_as_themself_and_only_they_see_their_pool(alice, bob):
    # Per-spawn settings reach the server (args) and its kernels (env); alice keeps the defaults.
    await asyncio.gather(
        alice.start_server(),
        bob.start_server(
            env={"SGTEST_SPAWN": "bob's"}, args=["--SingularityApp.devices=simulated:1x2GiB"]
        ),
    )
    kernels = await asyncio.gather(alice.start_kernel(), bob.start_kernel())
    for client, kernel_id, spawn_env, device_bytes in (
        (alice, kernels[0], None, 4 * GiB),
        (bob, kernels[1], "bob's", 2 * GiB),
    ):
        status, output = await client.run_cell(kernel_id, WHO_AND_TORCH, timeout=120)
        assert (status, output) == (
            "ok",
            f"{client.user.uid} {client.name} {spawn_env} 1048576.0\n",
        )

        pool = await resident(client, kernel_id)
        assert [d["total_bytes"] for d in pool["devices"]] == [device_bytes]
        # Embedded mode: each server's pool holds its own user's kernel, and only that one.
        assert [(k["kernel_id"], k["user"]) for k in pool["kernels"]] == [(kernel_id, client.name)]
        assert pool["kernels"][0]["gpu_bytes"] >= 1024 * 1024 * 4  # the cell's tensor, at least

    # bob's token opens nothing on alice's server, neither her pool nor her kernel.
    refused = await bob.request("GET", "singularity/api/pool", server=alice.name)
    assert refused.code == 403, refused.body
    refused = await bob.request("GET", f"api/kernels/{kernels[0]}", server=alice.name)
    assert refused.code == 403, refused.body
    # alice's own token, same request: answered (the refusal above is bob's, not the path's).
    kernel = json.loads((await alice.request("GET", f"api/kernels/{kernels[0]}")).body)
    assert kernel["id"] == kernels[0]


def test_a_process_of_a_user_outside_the_hub_runs_as_them_with_this_checkout(hub, bob):
    done = hub.run_python(
        bob.user, "import os, jupyter_singularity as p; print(os.getuid(), os.getcwd(), p.__file__)"
    )
    assert done.returncode == 0, done.stderr
    uid, cwd, package = done.stdout.split()
    assert (int(uid), cwd) == (bob.user.uid, str(bob.user.home))
    assert package.startswith(hub.server_env["PYTHONPATH"] + "/")
