"""One pool per machine under a real JupyterHub: the node broker shared by real Unix users (the node
broker issue's "Tested for real").

JupyterHub with configurable-http-proxy, LocalProcessSpawner, users alice, bob and carol (an admin of
the pool) created by the test session (tests/hub.py); the node broker, `jupyter singularity broker`,
as its own process (run as root, like a system service) on one simulated GPU. Driven as users drive
it: each user's own API token, the hub's REST API, kernel websockets through the proxy.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import textwrap
from pathlib import Path

import pytest
from cells import record_of
from hub import REQUIRE_ENV, join
from servers import node_broker

pytestmark = [pytest.mark.hub, pytest.mark.timeout(900)]  # a first run builds the users' venv

MiB = 1 << 20

# A model with Adam state and a ballast tensor: ~300 MiB of "GPU" state; two do not fit the 512 MiB
# GPU. ``step()`` trains one step; the losses are exact, so a run evicted and restored between steps
# gives the same numbers as one that was never interrupted.
TRAINING = """
import ctypes, hashlib, json, torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 1024))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
data = torch.randn(64, 1024)
ballast = torch.arange(40 * 2**20, dtype=torch.float32)

def step():
    opt.zero_grad()
    loss = model(data).pow(2).mean()
    loss.backward()
    opt.step()
    return loss.item()

def digest():
    h = hashlib.sha256()
    for t in [*model.parameters(), *(v for s in opt.state.values() for v in s.values()), ballast]:
        c = t.detach().contiguous()
        h.update(ctypes.string_at(c.data_ptr(), c.numel() * c.element_size()))
    return h.hexdigest()
"""


async def state(client, kernel_id: str, *states: str, timeout: float = 60.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        pool = await client.pool()
        record = record_of(pool, kernel_id)
        if record is not None and record["state"] in states:
            return pool
        assert loop.time() < deadline, f"{kernel_id} not {states} after {timeout} s: {record}"
        await asyncio.sleep(0.2)


def losses(output: str) -> list[float]:
    return json.loads(next(line for line in output.splitlines() if line.startswith("[")))


async def session_kernel(client, path: str) -> str:
    """A kernel started for a notebook (a session), as JupyterLab opens one."""
    response = await client.request(
        "POST",
        "api/sessions",
        {"path": path, "name": path, "type": "notebook", "kernel": {"name": "python3"}},
    )
    assert response.code == 201, response.body
    return json.loads(response.body)["kernel"]["id"]


async def test_users_share_one_pool_evict_each_other_and_lose_nothing(hub, node, alice, bob):
    await asyncio.gather(join(alice, node), join(bob, node))
    bob_kernel, alice_kernel = await asyncio.gather(bob.start_kernel(), alice.start_kernel())

    status, out = await bob.run_cell(
        bob_kernel, TRAINING + "print(json.dumps([step(), step(), step()]))", timeout=180
    )
    assert status == "ok", out
    first = losses(out)
    status, out = await bob.run_cell(bob_kernel, "print('digest', digest())", timeout=60)
    before = out.split()[-1]

    # alice's cell needs the GPU bob's idle kernel holds: the node broker evicts it.
    status, out = await alice.run_cell(alice_kernel, TRAINING + "print('ok', step())", timeout=180)
    assert status == "ok", out
    pool = await state(bob, bob_kernel, "offloaded", "spilled")
    users = {k["kernel_id"]: k["user"] for k in pool["kernels"]}
    assert users == {bob_kernel: bob.name, alice_kernel: alice.name}  # one pool, both users
    assert (await alice.pool())["devices"] == pool["devices"]

    # bob's next cell restores his state bit-identically, and his training goes on as if nothing
    # had happened: the losses equal those of a run that was never interrupted.
    status, out = await bob.run_cell(
        bob_kernel, "print('digest', digest())\nprint(json.dumps([step(), step(), step()]))", 120
    )
    assert status == "ok", out
    assert out.splitlines()[0].split()[-1] == before
    resumed = losses(out)
    reference = await bob.start_kernel()
    status, out = await bob.run_cell(
        reference, TRAINING + "print(json.dumps([step() for _ in range(6)]))", timeout=180
    )
    assert status == "ok", out
    assert first + resumed == losses(out)


async def test_quotas_and_rights_hold_across_users(hub, node, alice, bob, carol):
    await asyncio.gather(join(alice, node), join(bob, node), join(carol, node))
    alice_kernel = await session_kernel(alice, "secret-project.ipynb")
    bob_kernel = await bob.start_kernel()
    status, out = await alice.run_cell(alice_kernel, "import torch\nx = torch.ones(2**20)", 120)
    assert status == "ok", out
    await state(alice, alice_kernel, "resident")

    # bob sees alice's kernel, her name and its state, not its notebook path.
    pool = await bob.pool()
    seen = record_of(pool, alice_kernel)
    assert (seen["user"], seen["state"], seen["notebook"]) == (alice.name, "resident", "")
    assert record_of(await alice.pool(), alice_kernel)["notebook"].endswith("secret-project.ipynb")
    # bob may not offload alice's kernel, nor change the quotas; carol, an admin, may offload it.
    action = f"singularity/api/kernels/{alice_kernel}/offload"
    refused = await bob.request("POST", action, {})
    assert refused.code == 403, refused.body
    assert "only an admin may offload another user's kernel" in json.loads(refused.body)["message"]
    refused = await bob.request(
        "PUT", "singularity/api/quotas", {"default": {"gpu_memory": "1TiB"}}
    )
    assert refused.code == 403, refused.body
    assert json.loads((await carol.request("GET", "singularity/api/me")).body)["admin"] is True
    done = await carol.request("POST", action, {})
    assert done.code == 200, done.body
    await state(alice, alice_kernel, "offloaded", "spilled")

    # alice's daily GPU time (20 s) runs out; her next cell is refused in one line, bob's runs.
    status, out = await alice.run_cell(alice_kernel, "import time\ntime.sleep(21)", timeout=180)
    assert status == "ok", out
    status, out = await alice.run_cell(alice_kernel, "print('ran')", timeout=60)
    assert status == "error" and "ran" not in out, out
    assert f"GPU-time quota reached: {alice.name} used" in out, out
    status, out = await bob.run_cell(
        bob_kernel, "import torch\nprint('ran', torch.ones(4).sum())", 120
    )
    assert status == "ok" and "ran" in out, out
    quota = json.loads((await bob.request("GET", "singularity/api/quota")).body)
    assert quota["user"] == bob.name and quota["limits"]["gpu_seconds_per_day"] is None


@pytest.mark.faults
async def test_a_forged_hello_from_a_users_other_process_gets_nothing(hub, node, alice, bob):
    await asyncio.gather(join(alice, node), join(bob, node))
    alice_kernel = await alice.start_kernel()
    status, out = await alice.run_cell(alice_kernel, "import torch\nx = torch.ones(2**20)", 120)
    assert status == "ok", out
    # (the lease a kernel keeps between cells goes back just after the cell)
    before = record_of(await state(alice, alice_kernel, "resident"), alice_kernel)

    # A process of bob's, not a kernel: it sends hello and acquire for alice's kernel (it has no
    # key: a made-up one), and asks the broker to offload alice's kernel.
    forged = f"""
import json, os, time, zmq
from jupyter_singularity.protocol import Sequencer, Signer, encode, ORIGIN_KERNEL
from jupyter_singularity.broker.control import ask
from jupyter_singularity.broker.frontend import PoolError
dealer = zmq.Context.instance().socket(zmq.DEALER)
dealer.connect("ipc://{node.socket.parent / "kernels.sock"}")
seq = Sequencer({alice_kernel!r}, ORIGIN_KERNEL)
for kind, body in (("hello", {{"pid": os.getpid()}}), ("acquire", {{"request_id": "x"}})):
    dealer.send_multipart(encode(seq.make(kind, body), Signer(os.urandom(32).hex().encode())))
answered = dealer.poll(3000)
try:
    ask({str(node.socket)!r}, "act", {{"kernel_id": {alice_kernel!r}, "action": "offload"}})
    refusal = "none"
except PoolError as err:
    refusal = f"{{err.status}} {{err.message}}"
print(json.dumps({{"answered": bool(answered), "refusal": refusal}}))
"""
    done = hub.run_python(bob.user, forged, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["answered"] is False  # not even an error: it learns nothing
    assert result["refusal"].startswith("403 only an admin may offload another user's kernel")
    after = record_of(await alice.pool(), alice_kernel)
    assert (after["state"], after["lease"], after["booked_bytes"]) == (
        before["state"],
        None,
        before["booked_bytes"],
    )
    assert "dropped message on the kernel channel" in Path(node.log).read_text()


@pytest.mark.faults
async def test_kill_9_of_the_node_broker_loses_no_users_state(hub, node, alice, bob):
    """kill -9 of the broker mid-run and a restart: bob's evicted state and alice's resident one
    stay intact, bob's cell started while the broker is away waits and then runs, and both
    users' training goes on."""
    await asyncio.gather(join(alice, node), join(bob, node))
    bob_kernel, alice_kernel = await asyncio.gather(bob.start_kernel(), alice.start_kernel())
    digests = {}
    for client, kernel_id in ((bob, bob_kernel), (alice, alice_kernel)):
        status, out = await client.run_cell(
            kernel_id, TRAINING + "step()\nprint('digest', digest())", timeout=180
        )
        assert status == "ok", out
        digests[kernel_id] = out.split()[-1]
    await state(bob, bob_kernel, "offloaded", "spilled")  # alice's cell evicted it

    node.kill()
    waiting = asyncio.ensure_future(
        bob.run_cell(bob_kernel, "print('digest', digest())", timeout=300)
    )
    await asyncio.sleep(5)
    assert not waiting.done(), "bob's GPU cell ran while the broker was away"
    node.start()

    status, out = await waiting
    assert status == "ok" and out.split()[-1] == digests[bob_kernel], out
    status, out = await alice.run_cell(alice_kernel, "print('digest', digest())", timeout=120)
    assert status == "ok" and out.split()[-1] == digests[alice_kernel], out
    pool = await state(alice, alice_kernel, "resident")  # (once the lease it kept went back)
    users = {k["kernel_id"]: k["user"] for k in pool["kernels"]}
    assert users == {bob_kernel: bob.name, alice_kernel: alice.name}
    assert sum(1 for k in pool["kernels"] if k["state"] == "resident") == 1, pool
    for client, kernel_id in ((bob, bob_kernel), (alice, alice_kernel)):
        status, out = await client.run_cell(kernel_id, "print('loss', step())", timeout=120)
        assert status == "ok" and "loss" in out, out


# ------------------------------------------------------------------- jupyterhub (token) mode

BROKER_SERVICE = "jupyter-singularity"


async def test_token_mode_tells_users_apart_by_their_servers_hub_tokens(
    hub_users, hub_venv, hub_shared_dir, hub_install, tmp_path
):
    """Where uids do not tell users apart (containers), the broker, a hub service, asks the hub
    whose each server's token is. The same eviction and rights as in unix mode."""
    from hub import HubClient, running_hub  # the session hub's helpers, for a hub of its own

    token = secrets.token_hex(32)
    service = textwrap.dedent(
        f"""
        c.JupyterHub.services.append({{"name": {BROKER_SERVICE!r}, "api_token": {token!r}}})
        c.JupyterHub.load_roles.append(
            {{"name": "singularity", "services": [{BROKER_SERVICE!r}], "scopes": ["read:users"]}}
        )
        """
    )
    workdir = tmp_path / "token-hub"
    workdir.mkdir()
    with running_hub(
        workdir, hub_shared_dir, hub_venv, hub_users, hub_install, extra_config=service
    ) as hub:
        shared = hub_shared_dir / f"node-{tmp_path.name}"
        shared.mkdir(mode=0o755)
        hub_env = {"JUPYTERHUB_API_URL": f"{hub.url}hub/api", "JUPYTERHUB_API_TOKEN": token}
        with node_broker(
            tmp_path,
            "--SingularityBroker.identity=jupyterhub",
            devices="simulated:1x512MiB",
            run_dir=shared / "run",
            state_dir=shared,
            env=hub_env,
        ) as broker:
            alice, bob = [
                HubClient(hub, user, await hub.new_token(user.name))
                for user in (hub_users["alice"], hub_users["bob"])
            ]
            await asyncio.gather(join(alice, broker), join(bob, broker))
            bob_kernel, alice_kernel = await asyncio.gather(
                bob.start_kernel(), alice.start_kernel()
            )
            status, out = await bob.run_cell(
                bob_kernel, TRAINING + "print('digest', digest())", 180
            )
            assert status == "ok", out
            before = out.split()[-1]
            status, out = await alice.run_cell(alice_kernel, TRAINING + "print(step())", 180)
            assert status == "ok", out
            pool = await state(bob, bob_kernel, "offloaded", "spilled")
            users = {k["kernel_id"]: k["user"] for k in pool["kernels"]}
            assert users == {bob_kernel: bob.name, alice_kernel: alice.name}
            status, out = await bob.run_cell(bob_kernel, "print('digest', digest())", 120)
            assert status == "ok" and out.split()[-1] == before, out

            refused = await bob.request(
                "POST", f"singularity/api/kernels/{alice_kernel}/offload", {}
            )
            assert refused.code == 403, refused.body
            # Without a hub token, or with one the hub does not know, the broker serves nobody.
            probe = f"""
import os
from jupyter_singularity.broker.control import ask
from jupyter_singularity.broker.frontend import PoolError
for token in (None, "not-a-token"):
    os.environ.pop("JUPYTERHUB_API_TOKEN", None)
    if token:
        os.environ["JUPYTERHUB_API_TOKEN"] = token
    try:
        ask({str(broker.socket)!r}, "pool")
        print("served")
    except PoolError as err:
        print(err.status, err.message)
"""
            done = hub.run_python(hub_users["bob"], probe, timeout=60)
            assert done.returncode == 0, done.stderr
            assert done.stdout.splitlines() == [
                "403 this broker tells users apart by their server's hub token: none came",
                "403 the hub does not know this server's token",
            ], done.stdout
            for client in (alice, bob):
                await client.stop_server()


# --------------------------------------------------------------------------------- browser

UI_TESTS = Path(__file__).resolve().parent.parent / "labextension" / "ui-tests"


async def test_in_the_browser_a_user_sees_another_users_kernel_in_the_panel(hub, node, alice, bob):
    """Galata/Playwright in Debian's Chromium, logged into the hub as alice (see
    labextension/ui-tests/tests/hub-panel.spec.ts)."""
    playwright = UI_TESTS / "node_modules" / ".bin" / "playwright"
    if not playwright.exists():
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"the browser tests' packages are not installed ({UI_TESTS}: jlpm install)")
        pytest.skip(f"the browser tests' packages are not installed ({UI_TESTS}: jlpm install)")
    await asyncio.gather(join(alice, node), join(bob, node))
    bob_kernel = await bob.start_kernel()
    status, out = await bob.run_cell(bob_kernel, "import torch\nx = torch.ones(2**20)", 120)
    assert status == "ok", out
    await state(bob, bob_kernel, "resident")
    result = await asyncio.to_thread(
        subprocess.run,
        [str(playwright), "test", "-c", "playwright.hub.config.js"],
        cwd=UI_TESTS,
        env={
            **os.environ,
            "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1",
            "HUB_URL": hub.url,
            "HUB_USER": alice.name,
            "HUB_PASSWORD": hub.password,
            "OTHER_USER": bob.name,
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout, result.stdout[-2000:]
