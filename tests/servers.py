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
from cells import kernel_websocket, run_cell

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

    def api(self, path: str, method: str = "GET", body: dict | None = None) -> dict:
        return api(self.url, path, method, body)

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def jupyter_server(
    tmp_path: Path,
    db: Path,
    *settings: str,
    devices: str = "simulated:1x16GiB",
    ready: str = "singularity/api/pool",
    env: dict[str, str] | None = None,
    user: int | None = None,
    pythonpath: str | None = None,
    log_name: str | None = None,
    start_timeout: float = 60,
) -> Iterator[Server]:
    """A ``jupyter server`` subprocess with the pool; ``settings`` are more command-line options,
    ``env`` more environment, ``pythonpath`` where it imports this package from (default: this
    checkout). With ``user`` it runs as that uid (``tmp_path`` is given to it). It counts as
    started once ``ready`` answers, and is stopped with SIGINT at the end (its kernels with it)
    unless the test killed it already."""
    port = free_port()
    environment = {
        **os.environ,
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        **(env or {}),
        "PYTHONPATH": os.pathsep.join(
            filter(None, [pythonpath or str(REPO_ROOT), os.environ.get("PYTHONPATH")])
        ),
    }
    if user is not None:
        for item in [tmp_path, *tmp_path.rglob("*")]:
            os.chown(item, user, -1)
    log_path = tmp_path / (log_name or f"server-{port}.log")
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
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        user=user,
        group=None if user is None else _primary_group(user),
        extra_groups=None if user is None else [],
        start_new_session=True,
    )
    server = Server(f"http://127.0.0.1:{port}/", process, log_path)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                server.api(ready)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the server did not start:\n" + server.log_tail())
                time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def _primary_group(uid: int) -> int:
    import pwd

    return pwd.getpwuid(uid).pw_gid


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
    ws = await kernel_websocket(ws_url, TOKEN)
    try:
        return await run_cell(ws, code, timeout)
    finally:
        ws.close()


class NodeBroker:
    """``jupyter singularity broker`` as a system service runs it; ``kill`` and ``start`` again
    on the same sockets, ledger and spill directory, as its service manager would."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        socket: Path,
        state_dir: Path,
        log_dir: Path,
        metrics_port: int,
    ) -> None:
        self.args, self.env, self.socket, self.log_dir = args, env, socket, log_dir
        self.spill = state_dir / "broker-spill"
        self.ledger = state_dir / "broker-ledger.sqlite"
        self.metrics_port = metrics_port
        self.process: subprocess.Popen | None = None
        self.log = log_dir / "broker-0.log"
        self.runs = 0

    @property
    def url(self) -> str:
        """What a server's SingularityApp.broker_url is set to."""
        return f"unix://{self.socket}"

    def start(self) -> None:
        """Start a run of it; returns once it says it serves (its one start line)."""
        self.runs += 1
        self.log = self.log_dir / f"broker-{self.metrics_port}-{self.runs}.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [
                    *self.args,
                    f"--SingularityBroker.spill_dir={self.spill}",
                    f"--SingularityBroker.db_url=sqlite:///{self.ledger}",
                ],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.log_dir,
            )
        deadline = time.monotonic() + 60
        while "jupyter-singularity broker:" not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the broker did not start:\n" + self.log.read_text())
            time.sleep(0.1)

    def kill(self) -> None:
        """kill -9: no clean-up of any kind."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()


@contextmanager
def node_broker(
    tmp_path: Path,
    *settings: str,
    devices: str = "simulated:1x256MiB",
    run_dir: Path | None = None,
    state_dir: Path | None = None,
    config: str = "",
    env: dict[str, str] | None = None,
    start: bool = True,
) -> Iterator[NodeBroker]:
    """``jupyter singularity broker`` on ``devices``, started unless ``start`` is false; its
    sockets in ``run_dir`` (a short path: Unix socket paths are limited to about 100 bytes), its
    spill folder and ledger in ``state_dir`` (default ``tmp_path``; other users' kernels must be
    able to enter it), ``config`` the Python text of its configuration file, if any; ``env`` more
    environment (a hub service's token, say)."""
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="sgb-"))
    if config:
        (tmp_path / "broker_config.py").write_text(config)
        settings = (f"--config={tmp_path / 'broker_config.py'}", *settings)
    port = free_port()
    broker = NodeBroker(
        [
            sys.executable,
            "-m",
            "jupyter_singularity.cli",
            "broker",
            f"--socket={run_dir / 'broker.sock'}",
            f"--devices={devices}",
            f"--SingularityBroker.metrics_address=127.0.0.1:{port}",
            *settings,
        ],
        {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
            ),
            **(env or {}),
        },
        run_dir / "broker.sock",
        state_dir or tmp_path,
        tmp_path,
        port,
    )
    try:
        if start:
            broker.start()
        yield broker
    finally:
        broker.stop()
