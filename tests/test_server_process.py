"""``jupyter server`` as a user runs it: a separate process, restarted, read by the CLI."""

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
from pathlib import Path

import pytest
from cells import run_cell
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "singularity-test-token"
GiB = 1 << 30

LEASE_CELL = """
import time
from jupyter_singularity.kernel.runtime import Runtime
client = Runtime.current.client
grant = client.request("acquire", {"request_id": "cell-1", "memory": 2 << 30})
time.sleep(1.0)
client.send("release", {"request_id": "cell-1", "peak_bytes": 2 << 30, "gpu_bytes": 2 << 30})
client.request("status", {})  # the broker handles one kernel's messages in order
print(grant["granted"])
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def jupyter_server(tmp_path: Path, db: Path) -> Iterator[str]:
    """A ``jupyter server`` subprocess with the pool on one simulated device; yields its URL."""
    port = free_port()
    env = {
        **os.environ,
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    log = (tmp_path / f"server-{port}.log").open("w")
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
            "--SingularityApp.devices=simulated:1x16GiB",
            f"--SingularityApp.db_url=sqlite:///{db}",
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
                    pytest.fail(
                        "server did not start:\n" + (tmp_path / f"server-{port}.log").read_text()
                    )
                time.sleep(0.2)
        yield url
    finally:
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


async def run_in_kernel(url: str, kernel_id: str, code: str) -> tuple[str, str]:
    ws_url = url.replace("http", "ws", 1) + f"api/kernels/{kernel_id}/channels"
    ws = await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"token {TOKEN}"}))
    try:
        return await run_cell(ws, code)
    finally:
        ws.close()


async def test_ledger_survives_restart_and_cli_shows_pool(tmp_path):
    db = tmp_path / "ledger.sqlite"
    with jupyter_server(tmp_path, db) as url:
        kernel_id = api(url, "api/kernels", "POST", {"name": "python3"})["id"]
        status, out = await run_in_kernel(url, kernel_id, LEASE_CELL)
        assert (status, out.strip()) == ("ok", "True")

        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "jupyter_singularity.cli",
                "status",
                "--url",
                url,
                "--token",
                TOKEN,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        assert "GPU 0  Simulated GPU (simulated)  2.0 GiB booked of 16.0 GiB" in cli.stdout
        assert kernel_id[:8] in cli.stdout and "resident" in cli.stdout
        before = api(url, "singularity/api/quota")["usage"]["gpu_seconds_today"]
        assert before >= 1.0

    with jupyter_server(tmp_path, db) as url:
        # A fresh server: the kernel is gone, but the day's GPU time and the lease are remembered.
        assert api(url, "singularity/api/pool")["kernels"] == []
        quota = api(url, "singularity/api/quota")
        assert quota["usage"]["gpu_seconds_today"] == pytest.approx(before, abs=0.01)
        leases = api(url, "singularity/api/usage")["leases"]
        assert [lease["kernel_id"] for lease in leases] == [kernel_id]
        assert leases[0]["gpu_seconds"] == pytest.approx(before, abs=0.01)
