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

pytestmark = [pytest.mark.hub, pytest.mark.timeout(900)]

WHO_AND_TORCH = """
import getpass, os, torch
x = torch.ones(1024, 1024)
print(os.getuid(), getpass.getuser(), float(x.sum()))
"""


async def resident(client, kernel_id: str, timeout: float = 60.0) -> dict:
    """The kernel's record in its owner's pool once the cell's lease has ended there."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        record = record_of(await client.pool(), kernel_id)
        if record is not None and record["state"] == "resident":
            return record
        assert loop.time() < deadline, f"not resident after {timeout} s: {record}"
        await asyncio.sleep(0.2)


async def test_each_user_runs_torch_as_themself_and_only_they_see_their_pool(alice, bob):
    await asyncio.gather(alice.start_server(), bob.start_server())
    kernels = await asyncio.gather(alice.start_kernel(), bob.start_kernel())
    for client, kernel_id in zip((alice, bob), kernels, strict=True):
        status, output = await client.run_cell(kernel_id, WHO_AND_TORCH, timeout=120)
        assert (status, output) == ("ok", f"{client.user.uid} {client.name} 1048576.0\n")

        record = await resident(client, kernel_id)
        assert record["gpu_bytes"] >= 1024 * 1024 * 4  # the cell's tensor, at least
        assert record["user"] == client.name
        # Embedded mode: each server's pool holds only its own user's kernel.
        assert [k["kernel_id"] for k in (await client.pool())["kernels"]] == [kernel_id]

    # bob's token opens nothing on alice's server, neither her pool nor her kernel.
    refused = await bob.request("GET", "singularity/api/pool", server=alice.name)
    assert refused.code == 403, refused.body
    refused = await bob.request("GET", f"api/kernels/{kernels[0]}", server=alice.name)
    assert refused.code == 403, refused.body
    # alice's own token, same request: answered (the refusal above is bob's, not the path's).
    kernel = json.loads((await alice.request("GET", f"api/kernels/{kernels[0]}")).body)
    assert kernel["id"] == kernels[0]
