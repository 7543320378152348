"""Run a notebook cell over a kernel's websocket, as JupyterLab does (shared by the tests)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
from tornado.websocket import WebSocketClientConnection


async def run_cell(
    ws: WebSocketClientConnection, code: str, timeout: float = 60.0
) -> tuple[str, str]:
    """Send an ``execute_request``; return the reply's status and the cell's output text."""
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
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
        "channel": "shell",
        "buffers": [],
    }
    await ws.write_message(json.dumps(request))
    output: list[str] = []
    status: str | None = None
    idle = False
    deadline = time.monotonic() + timeout
    while status is None or not idle:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"cell did not finish within {timeout} s: {code!r}")
        raw = await asyncio.wait_for(ws.read_message(), remaining)
        if raw is None:
            pytest.fail("kernel websocket closed while a cell ran")
        msg = json.loads(raw)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            output.append(content["text"])
        elif kind == "error":
            output.append("\n".join(content["traceback"]))
        elif kind == "execute_reply":
            status = content["status"]
        elif kind == "status":
            idle = content["execution_state"] == "idle"
    return status, "".join(output)
