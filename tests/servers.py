"""``jupyter server`` and ``jupyter singularity broker`` as users and admins run them: separate
processes, for the tests that restart or kill them, or join a server to the node's broker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cells import run_cell
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "singularity-test-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path


@contextmanager
def jupyter_server(
    tmp_path: Path, db: Path, *settings: str, devices: str = "simulated:1x16GiB"
) -> Iterator[Server]:
    """A ``jupyter server`` subprocess with the pool; ``settings`` are more command-line options.
    It is stopped with SIGINT at the end unless the test killed it already."""
    port = free_port()
    env = {
        **os.environ,
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    log_path = tmp_path / f"server-{port}.log"
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
            f"--ServerApp.root_dir={tmp_path}",
            "--ServerApp.jpserver_extensions=jupyter_singularity=True",
            f"--SingularityApp.devices={devices}",
            f"--SingularityApp.db_url=sqlite:///{db}",
            *settings,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                api(url, "singularity/api/pool")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("server did not start:\n" + log_path.read_text())
                time.sleep(0.2)
        yield Server(url, process, log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()


def api(url: str, path: str, method: str = "GET", body: dict | None = None) -> dict:
    request = urllib.request.Request(
        url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"token {TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


async def run_in_kernel(
    url: str, kernel_id: str, code: str, timeout: float = 60.0
) -> tuple[str, str]:
    ws_url = url.replace("http", "ws", 1) + f"api/kernels/{kernel_id}/channels"
    ws = await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"token {TOKEN}"}))
    try:
        return await run_cell(ws, code, timeout)
    finally:
        ws.close()


@dataclass
class NodeBroker:
    socket: Path
    process: subprocess.Popen
    log: Path
    metrics_port: int

    @property
    def url(self) -> str:
        """What a server's SingularityApp.broker_url is set to."""
        return f"unix://{self.socket}"


@contextmanager
def node_broker(
    tmp_path: Path,
    *settings: str,
    devices: str = "simulated:1x256MiB",
    run_dir: Path | None = None,
    state_dir: Path | None = None,
    config: str = "",
    env: dict[str, str] | None = None,
) -> Iterator[NodeBroker]:
    """``jupyter singularity broker`` as a system service runs it, on ``devices``; its sockets in
    ``run_dir`` (a short path: Unix socket paths are limited to about 100 bytes), its spill folder
    and ledger in ``state_dir`` (default ``tmp_path``; other users' kernels must be able to
    enter it), ``config`` the Python text of its configuration file, if any; ``env`` more
    environment (a hub service's token, say)."""
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="sgb-"))
    state_dir = state_dir or tmp_path
    if config:
        (tmp_path / "broker_config.py").write_text(config)
        settings = (f"--config={tmp_path / 'broker_config.py'}", *settings)
    socket_path = run_dir / "broker.sock"
    port = free_port()
    log_path = tmp_path / f"broker-{port}.log"
    log = log_path.open("w")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_singularity.cli",
            "broker",
            f"--socket={socket_path}",
            f"--devices={devices}",
            f"--SingularityBroker.spill_dir={state_dir / 'broker-spill'}",
            f"--SingularityBroker.db_url=sqlite:///{state_dir / 'broker-ledger.sqlite'}",
            f"--SingularityBroker.metrics_address=127.0.0.1:{port}",
            *settings,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while "jupyter-singularity broker:" not in log_path.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the broker did not start:\n" + log_path.read_text())
            time.sleep(0.1)
        yield NodeBroker(socket_path, process, log_path, port)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()
