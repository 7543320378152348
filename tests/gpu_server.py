"""A ``jupyter server`` subprocess with the pool for the GPU tests: its own environment (the GPUs it
is given), optionally run as another Unix user, and the REST and cell helpers they share."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from servers import Server, jupyter_server


class PoolServer(Server):
    def start_kernel(self, timeout: float = 120) -> str:
        kernel_id = self.api("api/kernels", "POST", {"name": "python3"})["id"]
        deadline = time.monotonic() + timeout
        while kernel_id not in {
            k["kernel_id"] for k in self.api("singularity/api/pool")["kernels"]
        }:
            assert time.monotonic() < deadline, f"kernel {kernel_id} did not join the pool"
            time.sleep(0.1)
        return kernel_id

    def record(self, kernel_id: str) -> dict:
        return self.api(f"singularity/api/kernels/{kernel_id}")

    def wait_record(self, kernel_id: str, predicate, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            record = self.record(kernel_id)
            if predicate(record):
                return record
            assert time.monotonic() < deadline, f"kernel {kernel_id} stayed {record['state']}"
            time.sleep(0.02)


@contextmanager
def pool_server(
    directory: Path,
    devices: str,
    *settings: str,
    env: dict[str, str] | None = None,
    user: int | None = None,
    pythonpath: str | None = None,
) -> Iterator[PoolServer]:
    """``python -m jupyter_server`` with the pool on ``devices`` in ``directory`` (made, and given
    to ``user`` when one is named: the server and its kernels then run as that uid), with Jupyter's
    and IPython's folders of its own inside it."""
    directory.mkdir(parents=True, exist_ok=True)
    own_dirs = {
        "JUPYTER_DATA_DIR": str(directory / "data"),
        "JUPYTER_CONFIG_DIR": str(directory / "config"),
        "IPYTHONDIR": str(directory / "ipython"),
        "HOME": str(directory),
        "PYTHONUNBUFFERED": "1",
    }
    with jupyter_server(
        directory,
        directory / "ledger.sqlite",
        f"--SingularityApp.spill_dir={directory / 'spill'}",
        *settings,
        devices=devices,
        env={**(env or {}), **own_dirs},
        user=user,
        pythonpath=pythonpath,
        log_name="server.log",
        start_timeout=120,
    ) as server:
        yield PoolServer(server.url, server.process, server.log)
