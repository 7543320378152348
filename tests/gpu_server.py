"""A ``jupyter server`` subprocess with the pool for the GPU tests: its own environment (the GPUs it
is given), optionally run as another Unix user, and the REST and cell helpers they share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import REPO_ROOT, TOKEN, api, free_port


@dataclass
class PoolServer:
    url: str
    process: subprocess.Popen
    log: Path

    def api(self, path: str, method: str = "GET", body: dict | None = None) -> dict:
        return api(self.url, path, method, body)

    def start_kernel(self, timeout: float = 120) -> str:
        kernel_id = self.api("api/kernels", "POST", {"name": "python3"})["id"]
        deadline = time.monotonic() + timeout
        while kernel_id not in {
            k["kernel_id"] for k in self.api("singularity/api/pool")["kernels"]
        }:
            assert time.monotonic() < deadline, f"kernel {kernel_id} did not join the pool"
            time.sleep(0.1)
        return kernel_id

    def record(self, kernel_id: str) -> dict:
        return self.api(f"singularity/api/kernels/{kernel_id}")

    def wait_record(self, kernel_id: str, predicate, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            record = self.record(kernel_id)
            if predicate(record):
                return record
            assert time.monotonic() < deadline, f"kernel {kernel_id} stayed {record['state']}"
            time.sleep(0.02)

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def pool_server(
    directory: Path,
    devices: str,
    *settings: str,
    env: dict[str, str] | None = None,
    user: int | None = None,
    pythonpath: str | None = None,
) -> Iterator[PoolServer]:
    """``python -m jupyter_server`` with the pool on ``devices`` in ``directory`` (made, and given
    to ``user`` when one is named: the server and its kernels then run as that uid). Stopped with
    SIGINT at the end."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    path = pythonpath or str(REPO_ROOT)
    environment = {
        **os.environ,
        **(env or {}),
        "JUPYTER_RUNTIME_DIR": str(directory / "runtime"),
        "JUPYTER_DATA_DIR": str(directory / "data"),
        "JUPYTER_CONFIG_DIR": str(directory / "config"),
        "IPYTHONDIR": str(directory / "ipython"),
        "HOME": str(directory),
        "PYTHONPATH": os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    }
    if user is not None:
        for item in [directory, *directory.rglob("*")]:
            os.chown(item, user, -1)
    log_path = directory / "server.log"
    log = log_path.open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_server",
            "--no-browser",
            "--allow-root",
            f"--port={port}",
            f"--IdentityProvider.token={TOKEN}",
            f"--ServerApp.root_dir={directory}",
            "--ServerApp.jpserver_extensions=jupyter_singularity=True",
            f"--SingularityApp.devices={devices}",
            f"--SingularityApp.db_url=sqlite:///{directory / 'ledger.sqlite'}",
            f"--SingularityApp.spill_dir={directory / 'spill'}",
            *settings,
        ],
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=directory,
        user=user,
        group=None if user is None else _primary_group(user),
        extra_groups=None if user is None else [],
        start_new_session=True,
    )
    server = PoolServer(f"http://127.0.0.1:{port}/", process, log_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                server.api("singularity/api/pool")
                break
            except (OSError, urllib.error.URLError):
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the server did not start:\n" + server.log_tail())
                time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def _primary_group(uid: int) -> int:
    import pwd

    return pwd.getpwuid(uid).pw_gid
