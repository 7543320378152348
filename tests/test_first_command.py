"""The README's first command, as a newcomer runs it: a fresh clone, a fresh virtualenv, the command
verbatim; then a torch cell in a kernel of the JupyterLab it started, and the kernel in the pool.

Only the environment is adapted, each adaptation said where it is made (:func:`newcomer_env`).
Slow (pip builds the package, the JupyterLab extension with jlpm included, and installs JupyterLab
and torch): select it with ``-m first_command``, or leave it out with ``-m "not first_command"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cells import kernel_websocket, record_of, run_cell
from tornado.httpclient import AsyncHTTPClient

from jupyter_singularity.devices import default_simulated_spec, open_inventory, usable_memory

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.first_command, pytest.mark.timeout(2400)]

INSTALL_AND_START_TIMEOUT = 1800.0
TORCH_CELL = "import torch; x = torch.ones(1024, 1024); print(float(x.sum()))"


def first_command(readme: str) -> str:
    """The first ```bash block of the README's "Quick start" section."""
    section = re.search(r"^## Quick start\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert section is not None, 'README.md has no "## Quick start" section'
    block = re.search(r"^```bash\n(.*?)^```", section.group(1), re.M | re.S)
    assert block is not None, 'the "Quick start" section of README.md has no ```bash block'
    return block.group(1).strip()


def test_first_command_is_read_from_the_readme():
    """The parser finds the first block of the section, not a block before or after it."""
    readme = (
        "# x\n```bash\nnot this\n```\n## Quick start\nText.\n\n```bash\npip install it && run it\n"
        "```\n\n```bash\nnor this\n```\n## Next\n```bash\nnor that\n```\n"
    )
    assert first_command(readme) == "pip install it && run it"
    assert first_command((REPO_ROOT / "README.md").read_text(encoding="utf-8"))


def fresh_clone(destination: Path) -> Path:
    """``git clone`` of this checkout's HEAD (what is committed; local changes are not in it)."""
    head = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    if head.returncode != 0:
        pytest.skip(f"not a git checkout, nothing to clone: {head.stderr.strip()}")
    subprocess.run(
        ["git", "clone", "--quiet", "--no-checkout", str(REPO_ROOT), str(destination)], check=True
    )
    subprocess.run(
        ["git", "-C", str(destination), "checkout", "--quiet", "--detach", head.stdout.strip()],
        check=True,
    )
    return destination


def newcomer_env(root: Path, venv: Path) -> dict[str, str]:
    """The environment the command runs in: this machine's, with the venv activated and these
    adaptations, each for the reason given."""
    env = {
        name: value
        for name, value in os.environ.items()
        # The test suite's own: kernels of the test servers import this checkout through
        # PYTHONPATH (conftest.py), and pytest-jupyter's Jupyter dirs; the newcomer has neither.
        if name not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
        and not name.startswith("JUPYTER")
    }
    # The venv activated, as `source venv/bin/activate` does it.
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), os.environ.get("PATH", "")])
    # A home and Jupyter dirs of its own: nothing of the person running the tests is read, and the
    # server's runtime dir (where `jupyter server list` looks) is known to the test.
    home = root / "home"
    for name, path in {
        "HOME": home,
        "JUPYTER_CONFIG_DIR": home / ".jupyter",
        "JUPYTER_DATA_DIR": home / ".local/share/jupyter",
        "JUPYTER_RUNTIME_DIR": home / ".local/share/jupyter/runtime",
        "IPYTHONDIR": home / ".ipython",
    }.items():
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    # pip's own configuration (find-links to the wheels this machine keeps, index mirrors) is in
    # the real home, which the line above replaces: keep reading it.
    user_pip_config = next(
        (
            path
            for path in (
                Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "pip/pip.conf",
                Path.home() / ".pip/pip.conf",
            )
            if path.is_file()
        ),
        None,
    )
    if user_pip_config is not None and "PIP_CONFIG_FILE" not in env:
        env["PIP_CONFIG_FILE"] = str(user_pip_config)
    # torch pinned to the build this interpreter runs (the CPU build this machine keeps, found
    # through pip's find-links), instead of pip downloading the default CUDA build of several GB.
    constraints = root / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__}\n")
    env["PIP_CONSTRAINT"] = str(constraints)
    # JupyterLab opens a browser: a no-op here (webbrowser runs `true URL`).
    env["BROWSER"] = "true"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Tests run as root on CI machines; a newcomer does not, and jupyter_server refuses to
        # start as root unless allowed in its config.
        (home / ".jupyter/jupyter_server_config.py").write_text("c.ServerApp.allow_root = True\n")
    return env


class Newcomer:
    """The command running in its process group, its log, and the server it started."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.clone = fresh_clone(root / "jupyter-singularity")
        self.venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
        self.env = newcomer_env(root, self.venv)
        self.log_path = root / "command.log"
        self.process: subprocess.Popen | None = None
        self.server: dict | None = None

    def run(self, command: str) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                ["bash", "-c", command],
                cwd=self.clone,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: nothing outlives the test
            )

    def log(self, tail: int = 6000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:]

    async def wait_for_server(self, timeout: float) -> dict:
        """The server the command started, from ``jupyter server list --json`` in the venv."""
        assert self.process is not None
        jupyter = self.venv / "bin" / "jupyter"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the command ended with {self.process.returncode}:\n{self.log()}")
            if (self.venv / "bin" / "jupyter-server").exists():
                listed = subprocess.run(
                    [str(jupyter), "server", "list", "--json"],
                    env=self.env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                servers = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
                if servers:  # the runtime dir is the test's own: this is the command's server
                    self.server = servers[0]
                    return self.server
            await asyncio.sleep(2)
        pytest.fail(f"no server within {timeout} s:\n{self.log()}")

    async def request(self, method: str, path: str, body: dict | None = None) -> dict:
        assert self.server is not None
        response = await AsyncHTTPClient().fetch(
            self.server["url"].rstrip("/") + path,
            method=method,
            headers={"Authorization": f"token {self.server['token']}"},
            body=None if body is None else json.dumps(body),
            allow_nonstandard_methods=True,
            request_timeout=60,
        )
        return json.loads(response.body) if response.body else {}

    async def run_cell(self, kernel_id: str, code: str) -> tuple[str, str]:
        assert self.server is not None
        url = self.server["url"].replace("http", "ws", 1).rstrip("/")
        ws = await kernel_websocket(f"{url}/api/kernels/{kernel_id}/channels", self.server["token"])
        try:
            return await run_cell(ws, code, timeout=180)
        finally:
            ws.close()

    async def stop(self) -> int | None:
        """Shut the server down through its API, kernels included. Returns the command's exit
        status when that stopped it, else None (and the process group is ended)."""
        if self.process is not None and self.process.poll() is None and self.server is not None:
            with contextlib.suppress(Exception):
                await self.request("POST", "/api/shutdown")
                deadline = time.monotonic() + 60
                while self.process.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
        if self.process is not None and self.process.poll() is not None:
            return self.process.returncode
        self.kill()
        return None

    def kill(self) -> None:
        """End the command's process group (pip, the server, its kernels): nothing outlives it."""
        if self.process is None:
            return
        for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
                return


@pytest.fixture
def newcomer(tmp_path_factory):
    root = tmp_path_factory.mktemp("first-command")
    person = Newcomer(root)
    try:
        yield person
    finally:
        person.kill()
        shutil.rmtree(root, ignore_errors=True)


async def test_the_readme_first_command_gives_a_lab_whose_kernel_runs_torch_in_the_pool(
    newcomer: Newcomer,
):
    command = first_command((newcomer.clone / "README.md").read_text(encoding="utf-8"))
    started = time.monotonic()
    newcomer.run(command)
    try:
        await newcomer.wait_for_server(INSTALL_AND_START_TIMEOUT)
        ready = time.monotonic() - started

        kernel = await newcomer.request("POST", "/api/kernels", {"name": "python3"})
        status, output = await newcomer.run_cell(kernel["id"], TORCH_CELL)
        # Exactly the cell's print: no warning in a newcomer's first cell (torch without numpy).
        assert (status, output) == ("ok", "1048576.0\n"), f"{output}\n{newcomer.log()}"

        deadline = time.monotonic() + 60
        while True:
            pool = await newcomer.request("GET", "/singularity/api/pool")
            record = record_of(pool, kernel["id"])
            if record is not None and record["state"] == "resident":
                break
            assert time.monotonic() < deadline, f"not resident: {record}\n{newcomer.log()}"
            await asyncio.sleep(0.5)
        assert record["gpu_bytes"] >= 1024 * 1024 * 4  # the cell's tensor, at least

        inventory = open_inventory("auto")
        has_gpu = bool(inventory.devices())
        inventory.close()
        if not has_gpu:
            # No GPU: simulated devices sized from this machine's memory, and the log says why.
            spec, why = default_simulated_spec(usable_memory())
            assert pool["inventory"]["simulated"] is True
            assert [d["total_bytes"] for d in pool["devices"]] == [
                d.total_bytes for d in open_inventory(spec).devices()
            ]
            assert f"--SingularityApp.devices={spec} ({why})" in newcomer.log(tail=10**7)
    finally:
        exit_status = await newcomer.stop()
    assert exit_status == 0, f"the server did not stop cleanly:\n{newcomer.log()}"
    print(
        f"first command: server up after {ready:.0f} s, all done after {time.monotonic() - started:.0f} s"
    )
