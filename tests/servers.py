"""``jupyter server`` as a user runs it: a separate process on a free port, for the tests that
restart or kill the server (shared by test_server_process.py and test_faults.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
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
    tmp_path: Path,
    db: Path,
    *settings: str,
    devices: str = "simulated:1x16GiB",
    ready: str = "singularity/api/pool",
) -> Iterator[Server]:
    """A ``jupyter server`` subprocess with the pool; ``settings`` are more command-line options.
    It counts as started once ``ready`` answers, and is stopped with SIGINT at the end unless the
    test killed it already."""
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
                api(url, ready)
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
