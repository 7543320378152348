"""The GPU path for a user without privileges: the server, its broker and its kernels run as an
ordinary Unix user (a throwaway one when the tests run as root), through the same provisioner.

The driver tier then acts on the user's own kernels with no capability: the kernel is the server's
child, which is what ptrace rights need. The user must be able to run this interpreter and import
its packages (true of a system Python such as /usr/bin/python3, not of one under /root); the code
of this checkout is copied where the user can read it.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpu_gate import facts, mode
from gpu_server import pool_server
from gpu_state import BUILD_CELL, DIGEST_CELL, StateSize, code, nvml_process_mib, result_line
from servers import REPO_ROOT, run_in_kernel

pytestmark = pytest.mark.gpu(simulate=True)

#: Small: this is about who runs it, not how fast.
SIZE = StateSize(2, 2048, 64)


@pytest.fixture
def unprivileged_user() -> Iterator[int]:
    """A uid other than root: this one when the tests do not run as root, else a new user that
    is removed again, with every process it still has."""
    if os.geteuid() != 0:
        yield os.getuid()
        return
    name = f"sggpu-{uuid.uuid4().hex[:8]}"
    useradd = shutil.which("useradd")
    if useradd is None:
        pytest.skip("cannot make a user to run as: no useradd")
    subprocess.run(
        [useradd, "--system", "--no-create-home", "--user-group", "--shell", "/bin/false", name],
        check=True,
    )
    uid = pwd.getpwnam(name).pw_uid
    try:
        yield uid
    finally:
        _end_processes_of(uid)
        subprocess.run(["userdel", name], check=False)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's own temporary folders are private to root)."""
    directory = Path(tempfile.mkdtemp(prefix="sggpu-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _end_processes_of(uid: int) -> None:
    """SIGKILL what the test user still runs (its server and kernels), by pid."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    os.kill(int(entry.name), 9)
            except (OSError, ProcessLookupError):
                continue


def _readable_copy(directory: Path) -> Path:
    """This checkout's package where any user can read it."""
    target = directory / "code"
    shutil.copytree(
        REPO_ROOT / "jupyter_singularity",
        target / "jupyter_singularity",
        ignore=shutil.ignore_patterns("__pycache__", "labextension", "node_modules"),
    )
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def _can_run_as(uid: int, pythonpath: Path) -> str:
    """Why ``uid`` cannot run the server with this interpreter ("" when it can)."""
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import jupyter_server, ipykernel, torch, jupyter_singularity"],
            user=uid,
            group=pwd.getpwuid(uid).pw_gid,
            extra_groups=[],
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), *sys.path[1:]])},
            cwd="/",
            capture_output=True,
            text=True,
        )
    except OSError as err:  # the interpreter itself is out of its reach
        return f"uid {uid} cannot run {sys.executable}: {err.strerror}"
    if probe.returncode == 0:
        return ""
    return f"uid {uid} cannot use {sys.executable}: {probe.stderr.strip().splitlines()[-1:]}"


def test_an_ordinary_user_gets_the_whole_gpu_path(
    unprivileged_user: int, shared_dir: Path, record_property
) -> None:
    uid = unprivileged_user
    code_dir = _readable_copy(shared_dir)
    why_not = _can_run_as(uid, code_dir)
    if why_not:
        pytest.skip(why_not)  # (a failure where a GPU run is required)
    simulated = mode() == "simulate"
    device = "cpu" if simulated else "cuda"
    devices = "simulated:1x1GiB" if simulated else "auto"
    env = {} if simulated else {"CUDA_VISIBLE_DEVICES": facts().uuids[0]}
    pythonpath = os.pathsep.join([str(code_dir), *sys.path[1:]])
    with pool_server(
        shared_dir / "server", devices, env=env, user=uid, pythonpath=pythonpath
    ) as server:
        kernel_id = server.start_kernel()
        status, text = asyncio.run(
            run_in_kernel(
                server.url, kernel_id, code(BUILD_CELL, device=device, size=SIZE, steps=2)
            )
        )
        assert status == "ok", text[-3000:]
        built = result_line(text)
        pid = built["pid"]
        assert Path(f"/proc/{pid}").stat().st_uid == uid  # the kernel runs as the user
        server.api(f"singularity/api/kernels/{kernel_id}/offload", "POST", {})
        record = server.wait_record(kernel_id, lambda r: r["state"] in ("offloaded", "error"))
        assert record["state"] == "offloaded", record
        if not simulated:
            assert record["context"]["checkpointed"] is True, record["context"]
            assert not nvml_process_mib(pid)
        status, text = asyncio.run(run_in_kernel(server.url, kernel_id, DIGEST_CELL))
        assert status == "ok", text[-3000:]
        assert result_line(text)["digest"] == built["digest"]
        record_property("uid", uid)
        record_property("context", record["context"])
