"""What users may do with the pool: decided in the broker for every request, from an identity the
OS or JupyterHub vouched for (the node broker issue). Real service, real ledger, simulated GPUs."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from traitlets.config import Config

from jupyter_singularity.broker.frontend import OPERATIONS, PoolError, call
from jupyter_singularity.broker.identity import (
    Identity,
    PeerCredentials,
    UnixIdentities,
    peer_credentials,
)
from jupyter_singularity.broker.kernel_requests import KernelConnection
from jupyter_singularity.broker.settings import OpenPool, PoolSettings
from jupyter_singularity.kernel.client import BrokerClient
from jupyter_singularity.protocol import ENV_BROKER_URL, ENV_KERNEL_KEY

ALICE = Identity("alice", ("students",), uid=5001)
BOB = Identity("bob", ("students",), uid=5002)
ADMIN = Identity("carol", ("staff",), admin=True, uid=5003)
GiB = 1 << 30


@pytest.fixture
async def pool(tmp_path: Path) -> OpenPool:
    settings = PoolSettings(
        config=Config(
            {
                "PoolSettings": {
                    "devices": "simulated:1x4GiB",
                    "spill_dir": str(tmp_path / "spill"),
                    "db_url": f"sqlite:///{tmp_path / 'ledger.sqlite'}",
                    "quotas": {"default": {"gpu_memory": "3GiB"}},
                }
            }
        )
    )
    opened = settings.open_pool(log=logging.getLogger("test-frontend"), shared=True)
    opened.frontend.admin_hint = "admins are named in the broker's admin_users"
    await opened.service.start()
    yield opened
    await opened.service.stop()
    opened.close()


async def test_a_user_acts_on_own_kernels_an_admin_on_all(pool: OpenPool) -> None:
    frontend = pool.frontend
    await call(frontend, ALICE, "register_kernel", {"kernel_id": "ka", "notebook": "alice/a.ipynb"})
    await call(frontend, BOB, "register_kernel", {"kernel_id": "kb", "notebook": "bob/b.ipynb"})

    with pytest.raises(PoolError) as refused:
        await call(frontend, BOB, "act", {"kernel_id": "ka", "action": "pin", "pinned": True})
    assert refused.value.status == 403
    assert "only an admin may pin another user's kernel" in refused.value.message
    assert "admin_users" in refused.value.message
    record = await call(frontend, BOB, "act", {"kernel_id": "kb", "action": "pin", "pinned": True})
    assert record["pinned"] is True
    record = await call(
        frontend, ADMIN, "act", {"kernel_id": "ka", "action": "pin", "pinned": True}
    )
    assert record["pinned"] is True and record["events"][0]["reason"] == "pinned by carol"
    # Only the owner (or an admin) removes a kernel; the registration of another's id is refused.
    with pytest.raises(PoolError) as refused:
        await call(frontend, BOB, "unregister_kernel", {"kernel_id": "ka", "reason": "mine now"})
    assert refused.value.status == 403
    with pytest.raises(PoolError) as taken:
        await call(frontend, BOB, "register_kernel", {"kernel_id": "ka"})
    assert taken.value.status == 409
    assert "ka" in pool.service.core.kernels and pool.service.core.kernels["ka"].user == "alice"


async def test_everyone_sees_every_kernel_but_only_owners_and_admins_see_notebooks(pool) -> None:
    frontend = pool.frontend
    await call(frontend, ALICE, "register_kernel", {"kernel_id": "ka", "notebook": "alice/a.ipynb"})
    seen = {
        who.user: {k["kernel_id"]: k for k in (await call(frontend, who, "pool", {}))["kernels"]}
        for who in (ALICE, BOB, ADMIN)
    }
    assert seen["alice"]["ka"]["notebook"] == "alice/a.ipynb"
    assert seen["carol"]["ka"]["notebook"] == "alice/a.ipynb"
    assert seen["bob"]["ka"]["notebook"] == ""
    assert (seen["bob"]["ka"]["user"], seen["bob"]["ka"]["state"]) == ("alice", "cold")
    assert (await call(frontend, BOB, "kernel", {"kernel_id": "ka"}))["notebook"] == ""
    # Renaming bob's notebooks moves no kernel of alice's.
    await call(frontend, BOB, "notebook_renamed", {"old": "alice/a.ipynb", "new": "x.ipynb"})
    assert pool.service.core.kernels["ka"].notebook == "alice/a.ipynb"


async def test_quotas_are_an_admins_and_apply_to_everyone_at_once(pool) -> None:
    frontend = pool.frontend
    for who in (ALICE, BOB):
        with pytest.raises(PoolError) as refused:
            await call(
                frontend, who, "set_quotas", {"config": {"user:bob": {"gpu_memory": "1TiB"}}}
            )
        assert refused.value.status == 403
        with pytest.raises(PoolError):
            await call(frontend, who, "quotas", {})
    model = await call(
        frontend, ADMIN, "set_quotas", {"config": {"default": {"gpu_memory": "1GiB"}}}
    )
    assert model["quotas"] == {"default": {"gpu_memory": GiB}}
    for who in (ALICE, BOB):
        assert (await call(frontend, who, "quota", {}))["limits"]["gpu_memory"] == GiB


async def test_usage_is_your_own_unless_you_are_an_admin(pool) -> None:
    frontend = pool.frontend
    mine = await call(frontend, BOB, "usage", {"since": 0, "until": 1e10})
    assert mine["users"] == [] and mine["leases"] == []
    with pytest.raises(PoolError) as refused:
        await call(frontend, BOB, "usage", {"since": 0, "until": 1e10, "user": "alice"})
    assert refused.value.status == 403
    await call(frontend, ADMIN, "usage", {"since": 0, "until": 1e10, "user": "alice"})


@pytest.mark.parametrize(
    ("op", "args", "message"),
    [
        ("shutdown_broker", {}, "unknown operation 'shutdown_broker'"),
        ("kernel", {}, "missing argument 'kernel_id'"),
        ("kernel", {"kernel_id": 7}, "argument 'kernel_id' has the wrong type"),
        ("act", {"kernel_id": "k", "action": "pin", "pinned": 1}, "'pinned' has the wrong type"),
        ("usage", {"since": True, "until": 1.0}, "'since' has the wrong type"),
        ("usage", {"since": float("nan"), "until": 1.0}, "'since' must be a finite number"),
        ("pool", {"admin": True}, "unknown argument(s) admin"),
        ("register_kernel", {"kernel_id": "k", "key": "short"}, "64 hexadecimal digits"),
        ("register_kernel", {"kernel_id": "../x"}, "invalid kernel id"),
    ],
)
async def test_requests_are_checked_before_anything_happens(pool, op, args, message) -> None:
    with pytest.raises(PoolError) as refused:
        await call(pool.frontend, ALICE, op, args)
    assert refused.value.status == 400 and message in refused.value.message
    assert pool.service.core.kernels == {}


def test_every_operation_is_a_method_of_the_frontend(pool) -> None:
    assert all(callable(getattr(pool.frontend, op)) for op in OPERATIONS)


async def test_the_kernel_channel_refuses_another_users_process(pool) -> None:
    """Where the broker checks peers (unix mode), a process with the right key but another uid
    than the kernel's owner (a user's process given another user's key) gets nothing."""
    service = pool.service
    service.verify_peers = True
    launch = service.register_kernel("kb", BOB)  # owner uid 5002: not this test's process
    client = BrokerClient(launch.env[ENV_BROKER_URL], "kb", launch.env[ENV_KERNEL_KEY].encode())
    client.start()
    try:
        with pytest.raises(Exception, match="may not speak for this kernel"):
            await asyncio.to_thread(client.request, "hello", {"pid": os.getpid()}, 5)
        connection: KernelConnection = service._connections["kb"]
        assert connection.pid is None
    finally:
        client.close()
    # The owner's own process is served, and its verified pid is the one the broker keeps.
    service._connections["kb"].owner_uid = os.getuid()
    client = BrokerClient(launch.env[ENV_BROKER_URL], "kb", launch.env[ENV_KERNEL_KEY].encode())
    client.start()
    try:
        # A pid the message names is not believed: one that is not the sending process's own
        # (as /proc says it) is refused, and the pid kept is the one the OS gives.
        with pytest.raises(Exception, match=r"hello refused: pid: .* not 1$"):
            await asyncio.to_thread(client.request, "hello", {"pid": 1}, 5)
        assert service._connections["kb"].pid is None
        await asyncio.to_thread(client.request, "hello", {"pid": os.getpid()}, 5)
        assert service._connections["kb"].pid == os.getpid()
    finally:
        client.close()


# ------------------------------------------------------------------------------- identities


def test_peer_credentials_come_from_zeromqs_peer_address() -> None:
    assert peer_credentials("localhost:1000:100:4242") == PeerCredentials(1000, 100, 4242)
    assert peer_credentials("") is None
    assert peer_credentials("127.0.0.1") is None
    assert peer_credentials("x:a:b:c") is None


def test_unix_identities_name_admins_by_user_and_group() -> None:
    me = UnixIdentities().of_uid(os.getuid())
    assert me.user and me.uid == os.getuid()
    assert me.admin is (os.getuid() == 0)  # root is always an admin
    named = UnixIdentities(admin_users=[me.user]).of_uid(os.getuid())
    assert named.admin is True
    with pytest.raises(KeyError):
        UnixIdentities().of_uid(2_000_000_000)


async def test_a_server_in_a_container_reports_its_kernel_in_its_own_pid_namespace(
    pool: OpenPool,
) -> None:
    """A server in a container (its own pid namespace: Kubernetes, Docker) reports the pid it
    started as the container sees it; the broker watches that process under its own pid here, not
    whatever process has the container's number on the host."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.fail("this test needs util-linux's unshare and root (a new pid namespace)")
    # The "server": unshare, whose child is pid 1 of a new namespace and starts the "kernel".
    server = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "sh", "-c", "sleep 300 & echo $!; wait"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        claimed = int(server.stdout.readline())
        assert claimed == 2  # the kernel's pid in the container: some other process's here
        await call(pool.frontend, ALICE, "register_kernel", {"kernel_id": "kc"})
        who = replace(ALICE, pid=server.pid)
        await call(pool.frontend, who, "kernel_started", {"kernel_id": "kc", "pid": claimed})
        watched = pool.service._connections["kc"].launched_pid
        assert watched != claimed
        # The process that is pid 2 in the container (the shell's child, "sleep" once it exec'd).
        status = Path(f"/proc/{watched}/status").read_text()
        (nspid,) = [line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")]
        assert nspid == [str(watched), str(claimed)]
        # A pid the server never started is not taken (the kernel's hello will say which it is).
        await call(pool.frontend, who, "kernel_started", {"kernel_id": "kc", "pid": 4242})
        assert pool.service._connections["kc"].launched_pid == watched
    finally:
        server.kill()
        server.wait()
