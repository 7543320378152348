"""One pool per GPU node under Slurm: JupyterHub's SlurmSpawner (batchspawner) starts each user's
server as a Slurm job on the node, and the node broker pools the node's GPU among those jobs (issue
"Beyond one machine", its Slurm part; docs/deploy/slurm.md is the admin's side of it).

A one-node cluster of Debian's munged, slurmctld and slurmd (tests/slurm_cluster.py) whose GPU is
cut into shards; JupyterHub with configurable-http-proxy and the session's Unix users (tests/hub.py)
submitting ``sbatch`` as themselves; the node broker as the node's system service runs it, in
socket (unix) mode on one simulated GPU. The node broker's own tests under JupyterHub
(test_hub_node.py) run here unchanged, on this hub: eviction across users with a bit-identical
restore, a quota denial, 403 across users.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator

import pytest
from hub import join, require_hub, running_hub
from slurm_cluster import SlurmCluster, slurm_cluster
from slurm_cluster import missing_prerequisites as missing_slurm
from test_hub_node import (  # the node broker's tests under JupyterHub, here on Slurm
    test_quotas_and_rights_hold_across_users,  # noqa: F401
    test_users_share_one_pool_evict_each_other_and_lose_nothing,  # noqa: F401
)

pytestmark = [pytest.mark.hub, pytest.mark.slurm, pytest.mark.timeout(900)]

# The hub's side of batchspawner, as a site configures it (docs/deploy/slurm.md), appended to the
# test hub's configuration (tests/hub.py: SERVER_ENV is what every server gets).
SLURM_SPAWNER = """
import os

import batchspawner  # noqa: F401 (the hub's /api/batchspawner, to which a job reports its port)

c.JupyterHub.spawner_class = "batchspawner.SlurmSpawner"
# sbatch, squeue and scancel as the user. A site's hub uses sudo (batchspawner's default, "sudo -E
# -u {{username}}"); this one runs as root where sudo may be missing, and runuser keeps the
# environment the same way.
c.SlurmSpawner.exec_prefix = "{runuser} -u {{username}} --"
c.SlurmSpawner.batchspawner_singleuser_cmd = {wrapper!r}
# One shard of the node's GPU per notebook server: Slurm lets several such jobs share the GPU, the
# node broker keeps their memory apart.
c.SlurmSpawner.req_gres = "shard:1"
# The cluster's commands find it through SLURM_CONF: sbatch in the job's environment, squeue and
# scancel in the hub's own.
SERVER_ENV.update({slurm_env!r})
os.environ.update({slurm_env!r})
"""

# What a kernel in a user's job sees of it.
JOB_ENV_CELL = """
import json, os, pwd
names = ("SLURM_JOB_ID", "SLURM_SHARDS_ON_NODE", "CUDA_VISIBLE_DEVICES")
seen = {name: os.environ.get(name) for name in names}
print(json.dumps({"user": pwd.getpwuid(os.getuid()).pw_name, **seen}))
"""


@pytest.fixture(scope="module")
def slurm(hub_shared_dir) -> Iterator[SlurmCluster]:
    """The one-node cluster, its files where the test users may read them."""
    runuser = [] if shutil.which("runuser") else ["runuser on PATH (util-linux)"]
    require_hub([*missing_slurm(), *runuser], "the Slurm tests")
    with slurm_cluster(hub_shared_dir / "slurm") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def hub(slurm, hub_users, hub_venv, hub_shared_dir, hub_install, tmp_path_factory):
    """JupyterHub whose spawner submits each user's server to the cluster (overrides the session's
    hub for this module, so the node broker's tests imported above run on it)."""
    config = SLURM_SPAWNER.format(
        runuser=shutil.which("runuser"),
        wrapper=str(hub_venv / "bin/batchspawner-singleuser"),
        slurm_env=slurm.env,
    )
    workdir = tmp_path_factory.mktemp("slurm-hub")
    with running_hub(
        workdir, hub_shared_dir, hub_venv, hub_users, hub_install, extra_config=config
    ) as running:
        yield running


async def until(condition, what: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"not {what} after {timeout} s"
        await asyncio.sleep(0.2)


async def test_each_users_server_is_a_slurm_job_of_theirs_on_a_shard_of_the_gpu(
    hub, slurm, node, alice, bob
):
    await asyncio.gather(join(alice, node), join(bob, node))
    jobs = {job["user"]: job for job in slurm.jobs()}
    assert set(jobs) == {alice.name, bob.name}, jobs
    for job in jobs.values():
        assert (job["state"], job["node"], job["gres"]) == ("RUNNING", slurm.node, "gres:shard:1")

    # Each kernel runs in its user's job, as its user, and sees the GPU Slurm gave the job: the
    # shard's GPU by its index (the node broker, not CUDA_VISIBLE_DEVICES, keeps memory apart).
    kernels = await asyncio.gather(alice.start_kernel(), bob.start_kernel())
    for client, kernel_id in zip((alice, bob), kernels, strict=True):
        status, out = await client.run_cell(kernel_id, JOB_ENV_CELL, timeout=120)
        assert status == "ok", out
        assert json.loads(out) == {
            "user": client.name,
            "SLURM_JOB_ID": jobs[client.name]["id"],
            "SLURM_SHARDS_ON_NODE": "1",
            "CUDA_VISIBLE_DEVICES": "0",
        }
    pool = await bob.pool()
    assert {k["kernel_id"]: k["user"] for k in pool["kernels"]} == dict(
        zip(kernels, (alice.name, bob.name), strict=True)
    )

    # Stopping a server through the hub ends its job, and frees its shard.
    await alice.stop_server()
    await until(lambda: [j["user"] for j in slurm.jobs()] == [bob.name], "only bob's job left")
