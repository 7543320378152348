"""One pool per machine: the node broker, joined by several servers (the node broker issue).

Real processes: ``jupyter singularity broker`` and ``jupyter server`` processes that join it, kernels
started through each server's REST API, cells run over their websockets. Here all run as one Unix
user; the tests with real JupyterHub users and their own uids are in test_hub.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cells import tensor_state
from servers import TOKEN, api, jupyter_server, node_broker, run_in_kernel
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from jupyter_singularity.server.events import schema_id

MiB = 1 << 20

# ~150 MiB of "GPU" state: one kernel's fits the 256 MiB device, two do not.
STORAGES = 36


def value(out: str, key: str) -> str:
    return next(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith(key + " "))


def wait_for_state(url: str, kernel_id: str, *states: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        pool = api(url, "singularity/api/pool")
        record = next((k for k in pool["kernels"] if k["kernel_id"] == kernel_id), None)
        if record is not None and record["state"] in states:
            return pool
        assert time.monotonic() < deadline, (kernel_id, states, pool)
        time.sleep(0.2)


async def event_stream(url: str) -> WebSocketClientConnection:
    """The server's event stream, as JupyterLab subscribes to it."""
    ws_url = url.replace("http", "ws", 1) + "api/events/subscribe"
    return await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"token {TOKEN}"}))


async def state_changes(ws: WebSocketClientConnection, *wanted: tuple[str, str]) -> list[tuple]:
    """(kernel_id, new state) of the stream's kernel_state events, until every one of ``wanted``
    was among them."""
    seen: list[tuple] = []
    while not set(wanted) <= set(seen):
        message = await asyncio.wait_for(ws.read_message(), 60)
        assert message is not None, f"the event stream closed; it had {seen}"
        event = json.loads(message)
        if event.get("schema_id") == schema_id("kernel_state"):
            seen.append((event["kernel_id"], event["new"]))
    return seen


async def test_two_servers_share_one_pool_through_the_node_broker(tmp_path: Path) -> None:
    with node_broker(tmp_path) as broker:
        joined = f"--SingularityApp.broker_url={broker.url}"
        one_dir, two_dir = tmp_path / "one", tmp_path / "two"
        one_dir.mkdir()
        two_dir.mkdir()
        with (
            jupyter_server(one_dir, one_dir / "unused.sqlite", joined) as one,
            jupyter_server(two_dir, two_dir / "unused.sqlite", joined) as two,
        ):
            k1 = api(one.url, "api/kernels", "POST", {"name": "python3"})["id"]
            k2 = api(two.url, "api/kernels", "POST", {"name": "python3"})["id"]
            status, out = await run_in_kernel(one.url, k1, tensor_state(1, STORAGES), 120)
            assert status == "ok", out
            digest1 = value(out, "digest")
            events = await event_stream(one.url)

            # Server two's kernel needs the GPU kernel one holds: the node broker evicts it.
            status, out = await run_in_kernel(two.url, k2, tensor_state(2, STORAGES), 120)
            assert status == "ok", out
            digest2 = value(out, "digest")
            # Server one's browser hears of both: the node's state changes reach every server.
            seen = await state_changes(events, (k1, "offloading"), (k2, "running"))
            assert seen.index((k1, "offloading")) < seen.index((k2, "running")), seen
            events.close()
            for url in (one.url, two.url):  # both servers see the whole node's pool
                pool = wait_for_state(url, k1, "offloaded", "spilled")
                assert {k["kernel_id"] for k in pool["kernels"]} == {k1, k2}
                assert pool["devices"][0]["booked_bytes"] <= pool["devices"][0]["total_bytes"]

            # Kernel one's next cell comes back bit-identical, evicting kernel two in turn.
            status, out = await run_in_kernel(one.url, k1, "print('digest', digest())", 120)
            assert status == "ok" and value(out, "digest") == digest1, out
            wait_for_state(two.url, k2, "offloaded", "spilled")
            status, out = await run_in_kernel(two.url, k2, "print('digest', digest())", 120)
            assert status == "ok" and value(out, "digest") == digest2, out

            # The CLI on the machine shows the node's pool; the broker serves its metrics.
            cli = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "jupyter_singularity.cli",
                    "status",
                    "--socket",
                    str(broker.socket),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert cli.returncode == 0, cli.stderr
            assert f"node broker at {broker.socket}" in cli.stdout
            assert k1[:8] in cli.stdout and k2[:8] in cli.stdout
            with urllib.request.urlopen(f"http://127.0.0.1:{broker.metrics_port}/metrics") as r:
                metrics = r.read().decode()
            assert "singularity_kernels" in metrics and "singularity_devices" in metrics

        # The servers are gone, their kernels with them (ipykernel ends an orphaned kernel): the
        # broker, which watches the kernels' processes, frees what they held.
        deadline = time.monotonic() + 60
        while (pool := api_pool_over_socket(broker.socket))["kernels"]:
            assert time.monotonic() < deadline, pool
            time.sleep(0.5)
        assert pool["devices"][0]["booked_bytes"] == 0
        broker.process.send_signal(signal.SIGTERM)
        assert broker.process.wait(timeout=30) == 0
    log = broker.log.read_text()
    start = next(line for line in log.splitlines() if "jupyter-singularity broker: " in line)
    for part in (
        "1 device(s) (simulated)",
        f"socket {broker.socket}",
        "identity unix",
        "driver tier",
    ):
        assert part in start, start
    assert "jupyter-singularity broker: stopped" in log


def api_pool_over_socket(socket: Path) -> dict:
    from jupyter_singularity.broker.control import ask

    return ask(str(socket), "pool")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "--SingularityBroker.devices=gpus:2",
            "SingularityBroker.devices = 'gpus:2': unknown device spec",
        ),
        (
            "--SingularityBroker.socket_group=no-such-group-here",
            "socket_group = 'no-such-group-here': no such group",
        ),
        ("--SingularityBroker.idle_timeout=-1", "SingularityBroker.idle_timeout = -1.0"),
        ("--SingularityBroker.lease_keep=-1", "SingularityBroker.lease_keep = -1.0: must be"),
        ("--SingularityBroker.identity=ldap", "SingularityBroker.identity = 'ldap': expected"),
        ("--config=/no/such/broker_config.py", "/no/such/broker_config.py does not exist"),
        ("--config={tmp}/broken.py", "the configuration file {tmp}/broken.py: SyntaxError"),
    ],
)
def test_a_bad_setting_stops_the_broker_with_one_line(
    tmp_path: Path, setting: str, message: str
) -> None:
    (tmp_path / "broken.py").write_text('c.SingularityBroker.devices = "simulated:1x1GiB"\noops(\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter_singularity.cli",
            "broker",
            f"--socket={tmp_path / 'b.sock'}",
            f"--SingularityBroker.spill_dir={tmp_path / 'spill'}",
            f"--SingularityBroker.db_url=sqlite:///{tmp_path / 'l.sqlite'}",
            "--SingularityBroker.metrics_address=",
            setting.format(tmp=tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert message.format(tmp=tmp_path) in result.stderr, result.stderr
