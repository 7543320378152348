"""Shared fixtures: a real jupyter_server with the extension on two simulated 16 GiB devices.

pytest-jupyter provides the server (``jp_serverapp``, ``jp_fetch``, ``jp_ws_fetch``); the fixtures
here make it run the extension the way ``jupyter server`` does, and give tests small helpers to
start kernels through the REST API and watch them in the pool.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from cells import cell_messages, record_of, run_cell
from cells import cell_text as cell_text_of
from cells import wait_for as _wait_for
from traitlets.config import Config

# hub: a real JupyterHub with real Unix users (tests/hub.py); gpu_gate: the rules of GPU runs;
# broker_service: a broker service with kernels' clients over the real channel.
pytest_plugins = ["pytest_jupyter.jupyter_server", "hub", "gpu_gate", "broker_service"]

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def jp_asyncio_loop(_function_scoped_runner):
    """One event loop for pytest-jupyter's server and pytest-asyncio's test coroutines.

    pytest-jupyter makes its own loop for the server while pytest-asyncio (asyncio_mode=auto)
    runs each async test in a loop of its own; a request from the test would then wait forever
    for a server whose loop never runs. Both use pytest-asyncio's loop instead, which its runner
    also closes.
    """
    return _function_scoped_runner.get_loop()


@pytest.fixture(autouse=True)
def _kernels_import_this_checkout(monkeypatch):
    """Kernels are subprocesses: let them import jupyter_singularity from this source tree."""
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO_ROOT), path) if p))


@pytest.fixture
def singularity_devices() -> str:
    """The test server's ``devices``; a test module overrides it for a smaller pool."""
    return "simulated:2x16GiB"


@pytest.fixture
def singularity_config(request, tmp_path: Path, singularity_devices: str) -> dict[str, Any]:
    """``SingularityApp`` settings of the test server; ``indirect`` parametrisation adds or
    replaces settings (quotas, say)."""
    return {
        "devices": singularity_devices,
        "db_url": f"sqlite:///{tmp_path / 'singularity.sqlite'}",
        "spill_dir": str(tmp_path / "spill"),
        **getattr(request, "param", {}),
    }


@pytest.fixture
def jp_server_config(singularity_config: dict[str, Any]) -> Config:
    return Config(
        {
            "ServerApp": {
                # pytest-jupyter adds terminals unless told otherwise; they are not needed here.
                "jpserver_extensions": {
                    "jupyter_singularity": True,
                    "jupyter_server_terminals": False,
                },
                "allow_unauthenticated_access": False,
                # A broken extension fails the test instead of a server running without it.
                "reraise_server_extension_failures": True,
            },
            "SingularityApp": singularity_config,
        }
    )


@pytest.fixture
def jp_serverapp(jp_server_config, jp_argv, jp_configurable_serverapp, jp_asyncio_loop):
    """The server, with its extensions started as ``ServerApp.start_ioloop`` would start them."""
    app = jp_configurable_serverapp(config=jp_server_config, argv=jp_argv)
    jp_asyncio_loop.run_until_complete(app.extension_manager.start_all_extensions())
    return app


@pytest.fixture
def singularity_app(jp_serverapp):
    """The running SingularityApp of the test server."""
    return jp_serverapp.extension_manager.extension_points["jupyter_singularity"].app


@pytest.fixture
def wait_for():
    """``await wait_for(probe, timeout)``: poll an async probe until it returns something truthy."""
    return _wait_for


@pytest.fixture
def get_json(jp_fetch):
    """``await get_json("singularity", "api", "pool")`` -> the decoded JSON body."""

    async def get(*parts: str, **kwargs: Any) -> Any:
        response = await jp_fetch(*parts, **kwargs)
        return json.loads(response.body)

    return get


@pytest.fixture
def get_pool(get_json):
    async def pool() -> dict:
        return await get_json("singularity", "api", "pool")

    return pool


@pytest.fixture
def start_kernel(jp_fetch):
    """``await start_kernel()`` starts a kernel through ``POST /api/kernels``; returns its id."""

    async def start(name: str = "python3") -> str:
        response = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": name}))
        return json.loads(response.body)["id"]

    return start


@pytest.fixture
def wait_in_pool(get_pool):
    """``await wait_in_pool(ids)`` until all are in the pool (``present=False``: all gone)."""

    async def wait(kernel_ids, present: bool = True, timeout: float = 60.0) -> dict:
        wanted = set([kernel_ids] if isinstance(kernel_ids, str) else kernel_ids)

        async def probe() -> dict | None:
            pool = await get_pool()
            ids = {k["kernel_id"] for k in pool["kernels"]}
            done = wanted <= ids if present else not (wanted & ids)
            return pool if done else None

        return await _wait_for(probe, timeout=timeout)

    return wait


@pytest.fixture
def execute(jp_ws_fetch):
    """``await execute(kernel_id, code)`` runs a cell through the server's kernel websocket and
    returns ``(status, output)``, the way JupyterLab runs a cell."""

    async def run(kernel_id: str, code: str, timeout: float = 60.0) -> tuple[str, str]:
        ws = await jp_ws_fetch("api", "kernels", kernel_id, "channels")
        try:
            return await run_cell(ws, code, timeout)
        finally:
            ws.close()

    return run


# ------------------------------------------------------------------ kernel runtime (issue 3)


@pytest.fixture
def execute_messages(jp_ws_fetch):
    """``await execute_messages(kernel_id, code)`` -> ``(status, messages)``: every message the
    cell caused (display, updates, clear_output, comms, errors), not only its text; see
    :func:`cells.cell_messages` for ``messages`` and ``linger``."""

    async def run(kernel_id: str, code: str, **kwargs: Any) -> tuple[str, list[dict]]:
        ws = await jp_ws_fetch("api", "kernels", kernel_id, "channels")
        try:
            return await cell_messages(ws, code, **kwargs)
        finally:
            ws.close()

    return run


@pytest.fixture
def cell_text():
    """``cell_text(messages)``: the text of a cell's outputs, displays and errors included."""
    return cell_text_of


@pytest.fixture
def run(execute_messages):
    """``await run(kernel_id, code)`` -> ``(status, text, messages)`` of one cell."""

    async def run(kernel_id: str, code: str, **kwargs: Any) -> tuple[str, str, list[dict]]:
        status, messages = await execute_messages(kernel_id, code, **kwargs)
        return status, cell_text_of(messages), messages

    return run


@pytest.fixture
def state(get_pool):
    """``await state(kernel_id, *states)`` waits until the kernel's record is in one of them.

    A cell's lease ends with a message of its own, which may reach the broker just after the
    cell's reply reaches the test: read a state a cell leaves behind through this.
    """

    async def wait(kernel_id: str, *states: str, timeout: float = 30) -> dict:
        async def probe():
            pool = await get_pool()
            record = record_of(pool, kernel_id)
            return pool if record is not None and record["state"] in states else None

        return await _wait_for(probe, timeout=timeout)

    return wait
