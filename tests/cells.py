"""Run a notebook cell over a kernel's websocket, as JupyterLab does (shared by the tests and
``bench/gpu_check.py``; it needs nothing but tornado)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

KERNEL_INFO_TIMEOUT = 60.0
"""jupyter_server's ``kernel_info_timeout``: how long it waits for a new kernel to answer before
it answers the kernel's websocket."""


async def cell_messages(
    ws: WebSocketClientConnection,
    code: str,
    timeout: float = 60.0,
    messages: list | None = None,
    linger: float = 0.0,
) -> tuple[str, list[dict]]:
    """Send an ``execute_request``; return the reply's status and every message the cell caused.

    Pass ``messages=[]`` to watch them arrive while the cell runs, and ``linger=seconds`` to keep
    collecting messages of any parent (comm updates from the kernel's background threads) after
    the cell finished. Raises TimeoutError when the cell outlasts ``timeout``.
    """
    messages = [] if messages is None else messages
    msg_id = uuid.uuid4().hex
    request = {
        "header": {
            "msg_id": msg_id,
            "msg_type": "execute_request",
            "username": "test",
            "session": uuid.uuid4().hex,
            "version": "5.3",
            "date": "",
        },
        "parent_header": {},
        "metadata": {},
        "content": {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
        "channel": "shell",
        "buffers": [],
    }
    await ws.write_message(json.dumps(request))
    status: str | None = None
    idle = False
    deadline = time.monotonic() + timeout
    while status is None or not idle:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"cell did not finish within {timeout} s: {code!r}")
        raw = await asyncio.wait_for(ws.read_message(), remaining)
        if raw is None:
            raise ConnectionError("the kernel websocket closed while a cell ran")
        msg = json.loads(raw)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            if msg["msg_type"].startswith("comm"):
                messages.append(msg)
            continue
        messages.append(msg)
        kind, content = msg["msg_type"], msg["content"]
        if kind == "execute_reply":
            status = content["status"]
        elif kind == "status":
            idle = content["execution_state"] == "idle"
    end = time.monotonic() + linger
    while (remaining := end - time.monotonic()) > 0:
        try:
            raw = await asyncio.wait_for(ws.read_message(), remaining)
        except asyncio.TimeoutError:
            break
        if raw is None:
            break
        messages.append(json.loads(raw))
    return status, messages


async def kernel_websocket(ws_url: str, token: str) -> WebSocketClientConnection:
    """A kernel's channels websocket, opened as JupyterLab opens it. The server answers once the
    kernel answered its kernel_info request, so a kernel still starting on a loaded machine is
    waited for as long as the server waits for it, not tornado's default 20 s."""
    request = HTTPRequest(
        ws_url,
        headers={"Authorization": f"token {token}"},
        connect_timeout=KERNEL_INFO_TIMEOUT,
        request_timeout=KERNEL_INFO_TIMEOUT,
    )
    return await websocket_connect(request)


def cell_text(messages: list[dict], displays: bool = True) -> str:
    """The text a cell showed: streams and errors, and (``displays``) displays and their updates."""
    parts = []
    for msg in messages:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            parts.append(content["text"])
        elif kind == "error":
            parts.append("\n".join(content["traceback"]))
        elif displays and kind in ("display_data", "update_display_data", "execute_result"):
            parts.append(content.get("data", {}).get("text/plain", "") + "\n")
    return "".join(parts)


async def run_cell(
    ws: WebSocketClientConnection, code: str, timeout: float = 60.0
) -> tuple[str, str]:
    """Run a cell; return its status and what it printed (streams and errors)."""
    status, messages = await cell_messages(ws, code, timeout)
    return status, cell_text(messages, displays=False)


def record_of(pool: dict, kernel_id: str) -> dict | None:
    """One kernel's record in a ``GET /singularity/api/pool`` answer."""
    return next((k for k in pool["kernels"] if k["kernel_id"] == kernel_id), None)


async def wait_for(
    probe: Callable[[], Awaitable[Any]], timeout: float = 60.0, interval: float = 0.1
) -> Any:
    """Await ``probe()`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last result: {result!r})")
        await asyncio.sleep(interval)


def tensor_state(seed: int, storages: int) -> str:
    """A cell that makes ``storages`` tensors of 4 MiB from ``seed`` (the kernel's "GPU" state on
    simulated devices), defines ``digest()`` of every byte of them and prints it."""
    return f"""
import ctypes, hashlib, torch
torch.manual_seed({seed})
xs = [torch.randn(2**20) for _ in range({storages})]

def digest():
    h = hashlib.sha256()
    for x in xs:
        h.update(ctypes.string_at(x.data_ptr(), x.numel() * x.element_size()))
    return h.hexdigest()

print("digest", digest())
"""


def slow_copies(seconds: float) -> str:
    """Cell source after which every host<->device copy of the kernel's tensor tier takes
    ``seconds`` more (again for each run of it): an offload or restore then lasts long enough to
    act in the middle of it."""
    return f"""
import time
import jupyter_singularity.kernel.offload as _offload
def _slowed(copy, seconds):
    def slow(dst, src, *rest):
        time.sleep(seconds)
        copy(dst, src, *rest)
    return slow
_offload._copy = _slowed(_offload._copy, {seconds})
"""
