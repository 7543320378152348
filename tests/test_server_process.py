"""``jupyter server`` as a user runs it: a separate process, restarted, read by the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
from servers import TOKEN, api, jupyter_server, run_in_kernel

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


async def test_ledger_survives_restart_and_cli_shows_pool(tmp_path):
    db = tmp_path / "ledger.sqlite"
    with jupyter_server(tmp_path, db) as server:
        url = server.url
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

    with jupyter_server(tmp_path, db) as server:
        url = server.url
        # A fresh server: the kernel is gone, but the day's GPU time and the lease are remembered.
        assert api(url, "singularity/api/pool")["kernels"] == []
        quota = api(url, "singularity/api/quota")
        assert quota["usage"]["gpu_seconds_today"] == pytest.approx(before, abs=0.01)
        leases = api(url, "singularity/api/usage")["leases"]
        assert [lease["kernel_id"] for lease in leases] == [kernel_id]
        assert leases[0]["gpu_seconds"] == pytest.approx(before, abs=0.01)
