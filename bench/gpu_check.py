"""The real-GPU check of issue 3, in one run: a real jupyter_server, real kernels, the real driver.

What it measures (each step keeps going past a failure of another; the errors are in the JSON):

1. Device facts: GPU name, driver version, ``detect().log_line()``.
2. Pinned host<->device copy GB/s each way (2 GiB, best of 3, CUDA events), in a subprocess, so
   this process never holds a CUDA context.
3. Kernel A (a real kernel of a ``python -m jupyter_server`` subprocess with
   ``--SingularityApp.devices=auto``) builds >= 8 GB of state: ``LAYERS`` x ``nn.Linear(WIDTH,
   WIDTH)`` in float32 with Adam (parameters + gradients + 2 moments = 16 bytes a parameter;
   8 x 8000^2 -> 8.19 GB, under the broker's 8 GiB pinned pool so all of it goes through pinned
   memory), trains 2 steps with a fixed seed and deterministic algorithms, prints the losses (as
   float.hex, so equality is bitwise) and a digest of every byte of its state (computed on the
   device: per 4M-word chunk, the sum and two position-weighted sums of the 32-bit words, no
   overflow, then SHA-256 over them).
4. ``POST /singularity/api/kernels/A/offload``: the tensor tier's GB/s from the kernel record's
   ledger events (bytes, duration), its ratio to the pinned D->H copy (goal >= 0.9); NVML's
   memory for A's pid after the full eviction (goal 0 MiB); the record's ``context`` (did the
   driver tier run); the driver tier's seconds for the leftover context (server log).
   Done twice: the first offload of a kernel allocates its pinned pool (0.42 s/GiB, DESIGN §5),
   the second reuses it. The goals are judged on the second (warm) one; the first is reported.
5. A's next cell restores (the cell is timed; the ledger's restoring->running event has the
   tensor restore's bytes and seconds) -> GB/s and ratio to pinned H->D; digest identical; two
   more steps. Kernel B then runs the same 4 steps uninterrupted (its first CUDA use makes the
   broker evict A: a third, broker-initiated offload, also reported); losses and final state must
   be bitwise equal.
6. Driver tier alone on the same state: a plain python subprocess builds it (2 steps, empty
   cache), then ``DriverCheckpointer.checkpoint(pid)`` / ``restore(pid)`` are called from here and
   timed; then again with an identity UUID remap. The subprocess verifies its digest after each
   restore. Goal: our full eviction (tensor tier + driver tier of the context) >= 5x faster than
   the driver tier alone.
7. ``bench/offload_bandwidth.py --device cuda --gib 8`` and the CUDA/GPU tests
   (``pytest tests/test_offload.py tests/test_checkpoint.py -k "cuda or gpu"``), as subprocesses.

Progress lines go to stdout as it runs; the last thing printed is the JSON summary on one line
(verdicts first, without event lists and logs); the full one goes to ``--out DIR/gpu_check.json``
with the server and subprocess logs. Exit status 0 when every
applicable goal passed and no step failed. A watchdog prints the summary and exits at
``--deadline`` seconds whatever happens; every wait has its own timeout.

``--simulate`` runs the same flow without a GPU (``--SingularityApp.devices=simulated:1x64GiB``,
256 MiB of state, CPU copies instead of pinned ones, no driver tier); goals that need a GPU are
then reported as not applicable.

Run on the lent GPU (see bench/README.md): ``python3 bench/gpu_check.py --out $OUT``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# The project, and the tests' cell runner (the same websocket protocol JupyterLab speaks).
for _path in (REPO_ROOT, REPO_ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from cells import cell_messages, cell_text  # noqa: E402

TOKEN = "gpu-check-" + uuid.uuid4().hex[:16]
GiB = 1 << 30
MiB = 1 << 20

# --------------------------------------------------------------------------- code run elsewhere

# The state of kernels A and B and of the driver-tier subprocess; __NAME__ tokens are replaced.
STATE_CODE = r"""
import hashlib, json, os, time
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts: determinism
import torch
torch.use_deterministic_algorithms(True, warn_only=True)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
DEVICE = torch.device(__DEVICE__)
_t0 = time.perf_counter()
torch.manual_seed(0)
_layers = []
for _ in range(__LAYERS__):
    _layers += [torch.nn.Linear(__WIDTH__, __WIDTH__, device=DEVICE), torch.nn.ReLU()]
model = torch.nn.Sequential(*_layers[:-1])
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
data = torch.randn(__BATCH__, __WIDTH__, device=DEVICE)
target = torch.randn(__BATCH__, __WIDTH__, device=DEVICE)
losses = []


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def train_step():
    opt.zero_grad()
    loss = (model(data) - target).pow(2).mean()
    loss.backward()
    opt.step()
    value = loss.item()
    losses.append(value)
    return value


def state_tensors():
    tensors = [*model.parameters()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for _, v in sorted(s.items()) if torch.is_tensor(v)]
    return tensors + [data, target]


def state_bytes():
    return sum(t.untyped_storage().nbytes() for t in state_tensors() if t.device == DEVICE)


def state_digest():
    # Every byte counts: per chunk of 32-bit words, their sum and two position-weighted sums of
    # their 16-bit halves (exact in int64: no overflow), all hashed in order. Runs where the
    # tensors are, one device-to-host transfer per tensor.
    h = hashlib.sha256()
    chunk = 1 << 22
    weights = {}
    with torch.no_grad():
        for t in state_tensors():
            h.update(f"{tuple(t.shape)} {t.dtype}".encode())
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
            if raw.numel() % 4:
                raw = torch.cat([raw, raw.new_zeros(4 - raw.numel() % 4)])
            words = raw.view(torch.int32)
            if t.device not in weights:
                weights[t.device] = torch.arange(chunk, device=t.device, dtype=torch.int64) % 65521 + 1
            w = weights[t.device]
            sums = []
            for start in range(0, words.numel(), chunk):
                part = words[start : start + chunk].to(torch.int64)
                n = part.numel()
                sums.append(torch.stack([
                    part.sum(), ((part & 0xFFFF) * w[:n]).sum(), ((part >> 16) * w[:n]).sum()
                ]))
            h.update(repr(torch.stack(sums).cpu().tolist()).encode())
            del raw, words, sums
    weights.clear()
    return h.hexdigest()


def report(**extra):
    _sync()
    out = {
        "pid": os.getpid(),
        "losses": [float(x).hex() for x in losses],
        "loss_values": losses,
        "digest": state_digest(),
        "state_bytes": state_bytes(),
        "tensors": len(state_tensors()),
        "device": str(DEVICE),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if DEVICE.type == "cuda":
        out["gpu_name"] = torch.cuda.get_device_name()
        out["cuda_allocated"] = torch.cuda.memory_allocated()
        out["cuda_reserved"] = torch.cuda.memory_reserved()
    out.update(extra)
    print("RESULT " + json.dumps(out), flush=True)
"""

BUILD_CELL = (
    STATE_CODE
    + r"""
_built = time.perf_counter() - _t0
for _ in range(__STEPS__):
    train_step()
_sync()
report(build_seconds=_built, seconds=time.perf_counter() - _t0, steps=__STEPS__)
"""
)

CONTINUE_CELL = r"""
_t0 = time.perf_counter()
_before = state_digest()
for _ in range(__STEPS__):
    train_step()
_sync()
report(digest_before=_before, seconds=time.perf_counter() - _t0)
"""

DIGEST_CELL = 'print("RESULT " + json.dumps({"digest": state_digest(), "losses": [x.hex() for x in losses]}), flush=True)'

#: A cell that does nothing: timed, it is what a restore costs the user.
PROBE_CELL = "_probe = 1"

HOLDER_CODE = (
    STATE_CODE
    + r"""
import sys
for _ in range(__STEPS__):
    train_step()
_sync()
if DEVICE.type == "cuda":
    torch.cuda.empty_cache()  # the driver would save cached free blocks too: give it the state only
    _uuid = str(torch.cuda.get_device_properties(0).uuid)
    _uuid = _uuid if _uuid.startswith("GPU-") else "GPU-" + _uuid
else:
    _uuid = ""
print("READY " + json.dumps({"pid": os.getpid(), "digest": state_digest(), "state_bytes": state_bytes(),
      "uuid": _uuid, "losses": [x.hex() for x in losses]}), flush=True)
for line in sys.stdin:
    if line.strip() != "verify":
        break
    _t = time.perf_counter()
    _d = state_digest()
    print("VERIFY " + json.dumps({"digest": _d, "seconds": time.perf_counter() - _t}), flush=True)
"""
)

COPY_CODE = r"""
import json, sys, time, torch
device, nbytes, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cuda = device == "cuda"
dev = torch.device(device)
src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(7)
started = time.perf_counter()
host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
pin_seconds = time.perf_counter() - started

def timed(fn):
    if not cuda:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000

out_ = lambda: host.copy_(src, non_blocking=True)
back = lambda: src.copy_(host, non_blocking=True)
timed(out_), timed(back)  # warm-up
d2h = [timed(out_) for _ in range(rounds)]
h2d = [timed(back) for _ in range(rounds)]
result = {
    "device": torch.cuda.get_device_name() if cuda else "cpu (memcpy, not PCIe)",
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "bytes": nbytes,
    "pinned": cuda,
    "pin_alloc_seconds": pin_seconds,
    "d2h_seconds": d2h,
    "h2d_seconds": h2d,
    "d2h_gbps": nbytes / min(d2h) / 1e9,
    "h2d_gbps": nbytes / min(h2d) / 1e9,
}
if cuda:
    props = torch.cuda.get_device_properties(0)
    result["uuid"] = str(props.uuid)
    result["total_memory"] = props.total_memory
print("RESULT " + json.dumps(result), flush=True)
"""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CHECKPOINT_LOG = re.compile(
    r"jupyter-singularity: (\S+) checkpointed off GPU (\d+) in ([0-9.]+) s"
)


def fill(code: str, **values: Any) -> str:
    for key, value in values.items():
        code = code.replace(
            f"__{key.upper()}__", repr(value) if isinstance(value, str) else str(value)
        )
    return code


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def result_line(text: str, tag: str = "RESULT") -> dict:
    """The JSON of the last ``TAG {...}`` line in ``text``."""
    for line in reversed(text.splitlines()):
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1 :])
    raise RuntimeError(f"no {tag} line in the output:\n{text[-3000:]}")


def gbps(nbytes: float | None, seconds: float | None) -> float | None:
    if not nbytes or not seconds:
        return None
    return nbytes / seconds / 1e9


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


class StepSkipped(Exception):
    """A step that could not run because one it needs failed (not an error of its own)."""


class Timeout(Exception):
    pass


class ApiError(Exception):
    """A REST call answered with an HTTP error; the message has the server's explanation."""


def call_with_timeout(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """Run a blocking call (a driver call, say) in a daemon thread; give up after ``timeout``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=what)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise Timeout(f"{what} did not return within {timeout:.0f} s (still blocked)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ---------------------------------------------------------------------------------- NVML


class Nvml:
    """Per-process and per-device GPU memory from NVML; every call degrades to None."""

    def __init__(self) -> None:
        self.ok = False
        self.reason = ""
        try:
            import pynvml

            pynvml.nvmlInit()
            self.pynvml = pynvml
            self.ok = True
        except Exception as exc:
            self.reason = f"NVML unavailable: {exc}"

    def close(self) -> None:
        if self.ok:
            with contextlib.suppress(Exception):
                self.pynvml.nvmlShutdown()

    def _handles(self) -> list[Any]:
        nv = self.pynvml
        return [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]

    @staticmethod
    def _text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    def facts(self) -> dict:
        if not self.ok:
            return {"nvml": self.reason}
        nv = self.pynvml
        out: dict[str, Any] = {"driver_version": self._text(nv.nvmlSystemGetDriverVersion())}
        with contextlib.suppress(Exception):
            version = nv.nvmlSystemGetCudaDriverVersion()
            out["cuda_driver_version"] = f"{version // 1000}.{version % 1000 // 10}"
        gpus = []
        for handle in self._handles():
            gpu = {
                "name": self._text(nv.nvmlDeviceGetName(handle)),
                "uuid": self._text(nv.nvmlDeviceGetUUID(handle)),
                "memory_total_mib": nv.nvmlDeviceGetMemoryInfo(handle).total // MiB,
            }
            with contextlib.suppress(Exception):
                link = (
                    nv.nvmlDeviceGetCurrPcieLinkGeneration(handle),
                    nv.nvmlDeviceGetCurrPcieLinkWidth(handle),
                )
                gpu["pcie"] = f"Gen{link[0]} x{link[1]}"
            gpus.append(gpu)
        out["gpus"] = gpus
        return out

    def snapshot(self) -> dict:
        """Used memory per device and per listed process (MiB)."""
        if not self.ok:
            return {"nvml": self.reason}
        nv = self.pynvml
        try:
            devices, processes = [], {}
            for handle in self._handles():
                devices.append(nv.nvmlDeviceGetMemoryInfo(handle).used // MiB)
                for proc in nv.nvmlDeviceGetComputeRunningProcesses(handle):
                    used = proc.usedGpuMemory
                    processes[int(proc.pid)] = None if used is None else int(used) // MiB
            return {"device_used_mib": devices, "processes_mib": processes}
        except Exception as exc:
            return {"nvml": f"NVML query failed: {exc}"}

    def process(self, pid: int | None) -> dict:
        """NVML's view of one pid: listed or not, its MiB, and the devices' used MiB."""
        snap = self.snapshot()
        if "nvml" in snap:
            return {"available": False, "reason": snap["nvml"]}
        listed = pid in snap["processes_mib"]
        return {
            "available": True,
            "pid": pid,
            "listed": listed,
            "process_mib": snap["processes_mib"][pid] if listed else 0,
            "device_used_mib": snap["device_used_mib"],
            "pids_listed": sorted(snap["processes_mib"]),
        }


# --------------------------------------------------------------------------------- server


@dataclass
class Cell:
    status: str
    text: str
    seconds: float
    result: dict | None = None


class Server:
    """A ``python -m jupyter_server`` subprocess with the extension, driven over REST and websockets."""

    def __init__(self, workdir: Path, devices: str, env: dict[str, str], log: Callable) -> None:
        self.workdir = workdir
        self.devices = devices
        self.env = env
        self.log = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = workdir / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float) -> None:
        root = self.workdir / "root"
        root.mkdir(exist_ok=True)
        log_file = self.log_path.open("w")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter_server",
                "--no-browser",
                "--allow-root",
                f"--port={self.port}",
                "--ServerApp.ip=127.0.0.1",
                "--ServerApp.log_level=INFO",
                f"--IdentityProvider.token={TOKEN}",
                f"--ServerApp.root_dir={root}",
                "--ServerApp.jpserver_extensions=jupyter_singularity=True",
                f"--SingularityApp.devices={self.devices}",
                f"--SingularityApp.db_url=sqlite:///{self.workdir / 'ledger.sqlite'}",
                f"--SingularityApp.spill_dir={self.workdir / 'spill'}",
            ],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=root,
            start_new_session=True,
        )
        log_file.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.api("singularity/api/pool", timeout=5)
                return
            except (OSError, ApiError, json.JSONDecodeError):
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"the server exited ({self.process.returncode}):\n{self.log_tail(60)}"
                    ) from None
                if time.monotonic() > deadline:
                    raise Timeout(
                        f"the server did not answer within {timeout:.0f} s:\n{self.log_tail(60)}"
                    ) from None
                time.sleep(0.25)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def api(self, path: str, method: str = "GET", body: Any = None, timeout: float = 30) -> Any:
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            body = ""
            with contextlib.suppress(Exception):
                body = err.read().decode(errors="replace")[:2000]
            raise ApiError(f"{method} {path}: HTTP {err.code} {err.reason}: {body}") from None
        return json.loads(raw) if raw else None

    def start_kernel(self, timeout: float = 60) -> str:
        kernel_id = self.api("api/kernels", "POST", {"name": "python3"}, timeout=timeout)["id"]
        deadline = time.monotonic() + timeout
        while kernel_id not in {
            k["kernel_id"] for k in self.api("singularity/api/pool")["kernels"]
        }:
            if time.monotonic() > deadline:
                raise Timeout(f"kernel {kernel_id} did not join the pool within {timeout:.0f} s")
            time.sleep(0.1)
        return kernel_id

    def record(self, kernel_id: str) -> dict:
        return self.api(f"singularity/api/kernels/{kernel_id}")

    async def run_cell(self, kernel_id: str, code: str, timeout: float) -> Cell:
        """Run a cell over the kernel websocket, as JupyterLab does; its status, text and time."""
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        ws_url = self.url.replace("http", "ws", 1) + f"api/kernels/{kernel_id}/channels"
        ws = await asyncio.wait_for(
            websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"token {TOKEN}"})),
            30,
        )
        messages: list[dict] = []
        try:
            started = time.perf_counter()
            status, _ = await cell_messages(ws, code, timeout, messages=messages)
            seconds = time.perf_counter() - started
        except TimeoutError:
            text = _ANSI.sub("", cell_text(messages))
            with contextlib.suppress(Exception):
                self.api(f"api/kernels/{kernel_id}/interrupt", "POST", {}, timeout=10)
            raise Timeout(
                f"cell did not finish within {timeout:.0f} s (kernel interrupted); output so far:\n"
                f"{text[-3000:]}"
            ) from None
        finally:
            ws.close()
        text = _ANSI.sub("", cell_text(messages))
        cell = Cell(status, text, seconds)
        with contextlib.suppress(RuntimeError, json.JSONDecodeError):
            cell.result = result_line(text)
        return cell

    def shutdown_kernel(self, kernel_id: str, timeout: float = 60) -> float:
        started = time.perf_counter()
        self.api(f"api/kernels/{kernel_id}", "DELETE", timeout=timeout)
        return time.perf_counter() - started

    def stop(self, timeout: float = 20) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)


class LineProcess:
    """A subprocess answering on stdout lines; reads with timeouts (never blocks forever)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._stderr = log_path.open("w")
        self.process = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, tag: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                raise Timeout(
                    f"no {tag} line within {timeout:.0f} s; stderr:\n{self.stderr_tail()}"
                ) from None
            if line is None:
                raise RuntimeError(
                    f"the subprocess exited ({self.process.wait()}) before {tag}; stderr:\n"
                    f"{self.stderr_tail()}"
                )
            self.seen.append(line)
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1 :])

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def stderr_tail(self, lines: int = 40) -> str:
        self._stderr.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.process.stdin.close()  # type: ignore[union-attr]
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        self._stderr.close()


# ---------------------------------------------------------------------------------- check


class GpuCheck:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.simulate: bool = args.simulate
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.deadline
        self.workdir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.out = Path(args.out) if args.out else None
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.children: list[subprocess.Popen] = []
        self.kernel_pids: list[int] = []
        self.nvml = Nvml()
        self.server: Server | None = None
        self.used_checkpoint_logs: dict[str, int] = {}
        self.summary: dict[str, Any] = {
            "check": "jupyter-singularity GPU check (issue 3)",
            "mode": "simulate" if self.simulate else "gpu",
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": sys.version.split()[0],
            "config": {
                "devices": args.devices,
                "state": {
                    "layers": args.layers,
                    "width": args.width,
                    "batch": args.batch,
                    "dtype": "float32",
                    "optimizer": "Adam(lr=1e-3)",
                    "bytes_expected": 16 * args.layers * (args.width**2 + args.width)
                    + 8 * args.batch * args.width,
                    "note": "Linear(width, width) x layers with ReLU between; params + grads + "
                    "2 Adam moments = 16 B a parameter, plus data and target",
                },
                "copy_bytes": args.copy_bytes,
                "deadline_s": args.deadline,
            },
            "errors": [],
            "notes": [],
        }
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env["JUPYTER_RUNTIME_DIR"] = str(self.workdir / "runtime")
        env["IPYTHONDIR"] = str(self.workdir / "ipython")
        env["PYTHONUNBUFFERED"] = "1"
        self.env = env

    # -- plumbing --------------------------------------------------------------------------

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {message}", flush=True)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def budget(self, wanted: float, reserve: float = 15) -> float:
        """A step's timeout: what it wants, within what the deadline leaves (minus a reserve)."""
        return max(1.0, min(wanted, self.remaining() - reserve))

    def note(self, text: str) -> None:
        self.summary["notes"].append(text)
        self.log("note: " + text)

    @contextlib.contextmanager
    def step(
        self, name: str, requires: tuple[str, ...] = (), min_seconds: float = 0
    ) -> Iterator[None]:
        """Run a step; an exception is recorded and the check goes on with the next step."""
        missing = [r for r in requires if r not in self.done]
        if missing:
            self.summary["errors"].append(
                {"step": name, "error": f"skipped: needs {', '.join(missing)}", "skipped": True}
            )
            self.log(f"--- {name}: skipped (needs {', '.join(missing)})")
            raise StepSkipped(name)
        if self.remaining() < min_seconds:
            message = f"skipped: {self.remaining():.0f} s left before the deadline, needs ~{min_seconds:.0f} s"
            self.summary["errors"].append({"step": name, "error": message, "skipped": True})
            self.log(f"--- {name}: {message}")
            raise StepSkipped(name)
        self.log(f"--- {name}")
        started = time.monotonic()
        try:
            yield
        except StepSkipped:
            raise
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.failed.add(name)
            error = f"{type(exc).__name__}: {exc}"
            self.summary["errors"].append(
                {"step": name, "error": error[-4000:], "traceback": traceback.format_exc()[-3000:]}
            )
            self.log(f"!!! {name} failed after {time.monotonic() - started:.1f} s: {error[:2000]}")
        else:
            self.done.add(name)
            self.log(f"    {name} done in {time.monotonic() - started:.1f} s")

    def run_step(self, name: str, fn: Callable[[], Any], **kwargs: Any) -> None:
        with contextlib.suppress(StepSkipped), self.step(name, **kwargs):
            fn()

    async def run_step_async(self, name: str, fn: Callable[[], Any], **kwargs: Any) -> None:
        with contextlib.suppress(StepSkipped), self.step(name, **kwargs):
            await fn()

    def python(self, code: str, args: list[str], timeout: float, name: str) -> tuple[str, str]:
        """Run ``python -c code args`` to completion with a timeout; (stdout, stderr)."""
        process = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.children.append(process)
        return self.communicate(process, timeout, name)

    def communicate(self, process: subprocess.Popen, timeout: float, name: str) -> tuple[str, str]:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate(timeout=10)
            raise Timeout(
                f"{name} did not finish within {timeout:.0f} s; stderr:\n{(err or '')[-3000:]}"
            ) from None
        if self.out is not None:
            (self.out / f"{name}.log").write_text(f"{out}\n--- stderr\n{err}")
        if process.returncode != 0:
            raise RuntimeError(
                f"{name} exited with {process.returncode}; stderr:\n{(err or '')[-3000:]}"
                f"\nstdout:\n{(out or '')[-1500:]}"
            )
        return out, err

    def state_code(self, template: str, steps: int) -> str:
        device = "cpu" if self.simulate else "cuda"
        return fill(
            template,
            device=device,
            layers=self.args.layers,
            width=self.args.width,
            batch=self.args.batch,
            steps=steps,
        )

    # -- 1. device facts -------------------------------------------------------------------

    def device_facts(self) -> None:
        from jupyter_singularity.broker.checkpoint import detect

        capability = detect()
        facts: dict[str, Any] = {
            "detect": {
                "available": capability.available,
                "migration": capability.migration,
                "driver_version": capability.driver_version,
                "reason": capability.reason,
                "log_line": capability.log_line(),
            },
            **self.nvml.facts(),
        }
        self.capability = capability
        self.summary["device"] = facts
        self.log(f"detect(): {capability.log_line()}")
        gpus = facts.get("gpus") or []
        if gpus:
            self.log(f"GPU: {gpus[0]['name']} driver {facts.get('driver_version')}")
            self.gpu_uuid = gpus[0]["uuid"]
        if not self.simulate and not gpus:
            raise RuntimeError(f"no GPU found: {facts.get('nvml', 'NVML lists none')}")
        self.summary["device"]["nvml_baseline"] = self.nvml.snapshot()

    # -- 2. pinned copy --------------------------------------------------------------------

    def pinned_copy(self) -> None:
        device = "cpu" if self.simulate else "cuda"
        out, _ = self.python(
            COPY_CODE, [device, str(self.args.copy_bytes), "3"], self.budget(120), "pinned_copy"
        )
        result = result_line(out)
        self.summary["pinned_copy"] = result
        self.copy = result
        if self.simulate:
            self.note("simulate: pinned copy replaced by a CPU memcpy (plumbing only, no PCIe)")
        self.log(
            f"copy {result['bytes'] / GiB:.2f} GiB: D->H {result['d2h_gbps']:.1f} GB/s, "
            f"H->D {result['h2d_gbps']:.1f} GB/s ({result['device']})"
        )
        self.summary["device"]["nvml_after_copy"] = self.nvml.snapshot()

    # -- 3-5. server and kernels -----------------------------------------------------------

    def start_server(self) -> None:
        self.server = Server(self.workdir, self.args.devices, self.env, self.log)
        self.server.start(self.budget(90))
        if self.server.process is not None:
            self.children.append(self.server.process)
        pool = self.server.api("singularity/api/pool")
        self.summary["pool"] = {"devices": pool.get("devices"), "inventory": pool.get("inventory")}
        lines = [ln for ln in self.server.log_text().splitlines() if "driver-tier" in ln]
        self.summary["pool"]["driver_tier_log_line"] = lines[-1] if lines else None
        self.log(f"server at {self.server.url}: {len(pool.get('devices') or [])} device(s)")
        if not pool.get("devices"):
            raise RuntimeError(f"the pool has no device: {pool.get('inventory')}")

    async def cell(self, kernel_id: str, code: str, timeout: float, label: str) -> Cell:
        assert self.server is not None
        cell = await self.server.run_cell(kernel_id, code, self.budget(timeout))
        self.log(f"cell {label}: {cell.status} in {cell.seconds:.2f} s")
        if cell.status != "ok":
            raise RuntimeError(f"cell {label} ended with {cell.status}:\n{cell.text[-4000:]}")
        if cell.result is None and "RESULT" in code:
            raise RuntimeError(f"cell {label} printed no RESULT line:\n{cell.text[-3000:]}")
        return cell

    async def kernel_a_build(self) -> None:
        assert self.server is not None
        self.a = self.server.start_kernel(timeout=self.budget(60))
        self.summary["kernel_a"] = {"id": self.a}
        cell = await self.cell(self.a, self.state_code(BUILD_CELL, 2), 240, "A: build + 2 steps")
        result = cell.result or {}
        self.kernel_pids.append(result["pid"])
        self.a_pid = result["pid"]
        self.a_digests = [result["digest"]]
        self.a_losses = list(result["losses"])
        self.summary["kernel_a"].update(
            {
                "pid": self.a_pid,
                "cell_seconds": cell.seconds,
                "build": {k: v for k, v in result.items() if k not in ("losses",)},
                "nvml_resident": self.nvml.process(self.a_pid),
                "record_resident": self._record_brief(self.server.record(self.a)),
            }
        )
        self.state_bytes = result["state_bytes"]
        self.log(
            f"A holds {self.state_bytes / 1e9:.3f} GB in {result['tensors']} tensors; losses "
            f"{result['loss_values']}"
        )

    @staticmethod
    def _record_brief(record: dict) -> dict:
        keys = (
            "state",
            "device",
            "gpu_bytes",
            "host_bytes",
            "disk_bytes",
            "booked_bytes",
            "context",
        )
        return {k: record.get(k) for k in keys}

    def _checkpoint_seconds(self, kernel_id: str) -> float | None:
        """The driver tier's seconds of the newest unread 'checkpointed off GPU' log line."""
        assert self.server is not None
        matches = [
            float(m.group(3))
            for m in _CHECKPOINT_LOG.finditer(self.server.log_text())
            if m.group(1) == kernel_id
        ]
        if len(matches) > self.used_checkpoint_logs.get(kernel_id, 0):
            self.used_checkpoint_logs[kernel_id] = len(matches)
            return matches[-1]
        return None

    def _events_since(self, kernel_id: str, since: float) -> list[dict]:
        assert self.server is not None
        events = self.server.record(kernel_id).get("events") or []
        return [e for e in events if float(e.get("time") or 0) >= since - 0.05]

    def _offload_measure(self, kernel_id: str, pid: int, since: float, wall: float | None) -> dict:
        """Numbers of the offload that ended after ``since``: tensor tier, driver tier, NVML."""
        assert self.server is not None
        record = self.server.record(kernel_id)
        nvml = self.nvml.process(pid)
        events = [
            e for e in (record.get("events") or []) if float(e.get("time") or 0) >= since - 0.05
        ]
        done = next((e for e in events if e.get("new_state") in ("offloaded", "spilled")), None)
        begun = next((e for e in events if e.get("new_state") == "offloading"), None)
        tensor_bytes = done.get("nbytes") if done else None
        tensor_seconds = done.get("duration") if done else None
        driver_seconds = self._checkpoint_seconds(kernel_id)
        ledger_span = (
            float(done["time"]) - float(begun["time"])
            if done is not None and begun is not None
            else None
        )
        tensor_gbps = gbps(tensor_bytes, tensor_seconds)
        out = {
            "tensor_tier": {"nbytes": tensor_bytes, "seconds": tensor_seconds, "gbps": tensor_gbps},
            "offload_vs_pinned_d2h": ratio(tensor_gbps, getattr(self, "copy", {}).get("d2h_gbps")),
            "driver_context_checkpoint_seconds": driver_seconds,
            "full_eviction_seconds": (tensor_seconds or 0) + (driver_seconds or 0)
            if tensor_seconds is not None
            else None,
            "ledger_offloading_to_offloaded_seconds": ledger_span,
            "wall_seconds": wall,
            "context": record.get("context"),
            "record": self._record_brief(record),
            "nvml_after": nvml,
            "events": events,
        }
        if nvml.get("available"):
            self.log(
                f"NVML after eviction: pid {pid} listed={nvml['listed']} "
                f"{nvml['process_mib']} MiB; device used {nvml['device_used_mib']} MiB"
            )
        self.log(
            f"offload: {fmt(tensor_bytes, 1e9, 'GB')} in {fmt(tensor_seconds)} s "
            f"= {fmt(tensor_gbps)} GB/s (x{fmt(out['offload_vs_pinned_d2h'])} of pinned D->H); "
            f"driver tier {fmt(driver_seconds)} s; context {record.get('context')}"
        )
        return out

    def offload(self, label: str) -> None:
        """POST .../offload for kernel A, wait for 'offloaded', measure."""
        assert self.server is not None
        # The cell's lease ends with a message the broker handles just after the cell: only an
        # idle resident kernel (no lease) may be offloaded, so wait for that first.
        deadline = time.monotonic() + self.budget(30)
        while True:
            record = self.server.record(self.a)
            if record.get("state") == "resident" and not record.get("lease"):
                break
            if time.monotonic() > deadline:
                raise Timeout(f"kernel A not idle and resident: {self._record_brief(record)}")
            time.sleep(0.02)
        before = self.nvml.process(self.a_pid)
        since = time.time()
        started = time.perf_counter()
        self.server.api(f"singularity/api/kernels/{self.a}/offload", "POST", {})
        deadline = time.monotonic() + self.budget(120)
        while True:
            record = self.server.record(self.a)
            state = record.get("state")
            if state in ("offloaded", "spilled", "error"):
                break
            if state == "resident" and any(
                e.get("old_state") == "offloading" for e in self._events_since(self.a, since)
            ):
                raise RuntimeError(f"the offload failed, the kernel stayed resident: {record}")
            if time.monotonic() > deadline:
                raise Timeout(
                    f"kernel A not offloaded in time; record: {self._record_brief(record)}"
                )
            time.sleep(0.02)
        wall = time.perf_counter() - started
        if state == "error":
            raise RuntimeError(f"kernel A is in state 'error' after the offload: {record}")
        measure = self._offload_measure(self.a, self.a_pid, since, wall)
        measure["nvml_before"] = before
        measure["label"] = label
        self.summary.setdefault("offloads", []).append(measure)

    async def restore_cell(self, label: str) -> None:
        """A's next cell restores: time it, read the ledger's restore event."""
        assert self.server is not None
        since = time.time()
        cell = await self.cell(self.a, PROBE_CELL, 120, f"A: {label}")
        events = self._events_since(self.a, since)
        moved = next(
            (e for e in events if e.get("new_state") == "running" and e.get("nbytes")), None
        )
        nbytes = moved.get("nbytes") if moved else None
        seconds = moved.get("duration") if moved else None
        rate = gbps(nbytes, seconds)
        out = {
            "label": label,
            "cell_seconds": cell.seconds,
            "tensor_tier": {"nbytes": nbytes, "seconds": seconds, "gbps": rate},
            "restore_vs_pinned_h2d": ratio(rate, getattr(self, "copy", {}).get("h2d_gbps")),
            "cell_seconds_minus_tensor_restore": cell.seconds - seconds if seconds else None,
            "cell_output": cell.text[-500:],
            "record": self._record_brief(self.server.record(self.a)),
            "nvml_after": self.nvml.process(self.a_pid),
            "events": events,
        }
        self.summary.setdefault("restores", []).append(out)
        self.log(
            f"restore: cell {cell.seconds:.3f} s; tensor tier {fmt(nbytes, 1e9, 'GB')} in "
            f"{fmt(seconds)} s = {fmt(rate)} GB/s (x{fmt(out['restore_vs_pinned_h2d'])} of pinned H->D)"
        )
        if moved is None:
            raise RuntimeError(f"no restoring->running event with bytes after the cell: {events}")

    async def continue_training(self) -> None:
        cell = await self.cell(
            self.a, fill(CONTINUE_CELL, steps=2), 120, "A: digest + 2 more steps"
        )
        result = cell.result or {}
        identical = result["digest_before"] == self.a_digests[-1]
        self.a_digests.append(result["digest"])
        self.a_losses = list(result["losses"])
        self.summary["kernel_a"]["after_restore_1"] = {
            "digest_identical": identical,
            "losses": result["losses"],
            "loss_values": result["loss_values"],
            "cell_seconds": cell.seconds,
        }
        self.log(f"A after restore: digest identical={identical}; losses {result['loss_values']}")

    async def check_digest(self) -> None:
        cell = await self.cell(self.a, DIGEST_CELL, 120, "A: digest after restore 2")
        identical = (cell.result or {})["digest"] == self.a_digests[-1]
        self.summary["kernel_a"]["after_restore_2"] = {"digest_identical": identical}
        self.log(f"A after restore 2: digest identical={identical}")

    async def kernel_b_reference(self) -> None:
        assert self.server is not None
        self.b = self.server.start_kernel(timeout=self.budget(60))
        a_present = hasattr(self, "a_pid")
        since = time.time()
        cell = await self.cell(self.b, self.state_code(BUILD_CELL, 4), 240, "B: reference, 4 steps")
        result = cell.result or {}
        self.kernel_pids.append(result["pid"])
        self.b_result = result
        self.summary["kernel_b"] = {
            "id": self.b,
            "pid": result["pid"],
            "cell_seconds": cell.seconds,
            "losses": result["losses"],
            "loss_values": result["loss_values"],
            "digest": result["digest"],
            "state_bytes": result["state_bytes"],
        }
        if a_present:
            record = self.server.record(self.a)
            evicted = record.get("state") in ("offloaded", "spilled")
            entry: dict[str, Any] = {"a_state_after_b": record.get("state")}
            if evicted:
                entry.update(self._offload_measure(self.a, self.a_pid, since, None))
                entry["label"] = "offload 3: broker-initiated, to make room for B's first cell"
            self.summary["auto_eviction"] = entry
            self.log(f"A after B's first cell: {record.get('state')}")

    def compare(self) -> None:
        a, b = self.a_losses, self.b_result["losses"]
        self.summary["training"] = {
            "a_losses_hex": a,
            "b_losses_hex": b,
            "losses_equal_bitwise": a == b,
            "a_final_digest": self.a_digests[-1],
            "b_final_digest": self.b_result["digest"],
            "state_equal_to_reference": self.a_digests[-1] == self.b_result["digest"],
        }
        self.log(
            f"losses A (offloaded twice) == B (uninterrupted): {a == b}; final state equal: "
            f"{self.a_digests[-1] == self.b_result['digest']}"
        )

    def stop_server(self) -> None:
        server = self.server
        if server is None:
            return
        shutdowns = {}
        for name in ("b", "a"):
            kernel_id = getattr(self, name, None)
            if kernel_id is None:
                continue
            try:
                state = server.record(kernel_id).get("state")
                seconds = server.shutdown_kernel(kernel_id, timeout=self.budget(60, reserve=5))
                shutdowns[name] = {"state_before": state, "seconds": seconds}
            except Exception as exc:
                shutdowns[name] = {"error": f"{type(exc).__name__}: {exc}"}
        self.summary["kernel_shutdown"] = shutdowns
        lines = [ln for ln in server.log_text().splitlines() if "singularity" in ln]
        self.summary["server_log_singularity"] = lines[-40:]
        server.stop()
        for pid in self.kernel_pids:  # kernels whose shutdown failed: do not leave them on the GPU
            kill_kernel(pid)
        self.log(f"server stopped; kernel shutdowns {shutdowns}")

    # -- 6. driver tier alone --------------------------------------------------------------

    def driver_alone(self) -> None:
        from jupyter_singularity.broker.checkpoint import DriverCheckpointer

        env = dict(self.env)
        gpu_uuid = getattr(self, "gpu_uuid", None)
        if gpu_uuid and not self.simulate:
            env["CUDA_VISIBLE_DEVICES"] = gpu_uuid
        holder = LineProcess(
            [sys.executable, "-c", self.state_code(HOLDER_CODE, 2)],
            env,
            self.workdir / "holder.log",
        )
        self.children.append(holder.process)
        result: dict[str, Any] = {}
        self.summary["driver_alone"] = result
        try:
            ready = holder.expect("READY", self.budget(180))
            pid = ready["pid"]
            result.update(
                {
                    "pid": pid,
                    "state_bytes": ready["state_bytes"],
                    "losses_equal_to_kernel_a_first_steps": ready["losses"]
                    == getattr(self, "a_losses", [None, None])[:2],
                    "nvml_before": self.nvml.process(pid),
                }
            )
            self.log(f"holder pid {pid} holds {ready['state_bytes'] / 1e9:.3f} GB")
            capability = self.capability
            if not capability.available:
                result["skipped"] = f"driver tier unavailable: {capability.reason}"
                self.note(f"driver tier alone skipped: {capability.reason}")
                holder.send("verify")
                result["verify_plumbing_digest_equal"] = (
                    holder.expect("VERIFY", self.budget(60))["digest"] == ready["digest"]
                )
                return
            checkpointer = DriverCheckpointer(capability)

            def cycle(pairs: list[tuple[str, str]], entry: dict) -> None:
                """Checkpoint, restore (with ``pairs``), verify; ``entry`` keeps what happened."""
                started = time.perf_counter()
                entry["checkpoint_seconds"] = call_with_timeout(
                    lambda: checkpointer.checkpoint(pid), self.budget(120), "driver checkpoint"
                )
                entry["checkpoint_wall_seconds"] = time.perf_counter() - started
                entry["checkpoint_gbps"] = gbps(ready["state_bytes"], entry["checkpoint_seconds"])
                entry["state_after_checkpoint"] = checkpointer.state(pid)
                entry["nvml_after_checkpoint"] = self.nvml.process(pid)
                started = time.perf_counter()
                entry["restore_call"] = "started"
                entry["restore_seconds"] = call_with_timeout(
                    lambda: checkpointer.restore(pid, pairs), self.budget(120), "driver restore"
                )
                entry["restore_call"] = "returned"
                entry["restore_wall_seconds"] = time.perf_counter() - started
                entry["restore_gbps"] = gbps(ready["state_bytes"], entry["restore_seconds"])
                entry["state_after_restore"] = checkpointer.state(pid)
                entry["nvml_after_restore"] = self.nvml.process(pid)
                holder.send("verify")
                entry["data_intact"] = (
                    holder.expect("VERIFY", self.budget(60))["digest"] == ready["digest"]
                )

            failures = []
            plain: dict[str, Any] = {}
            result["plain"] = plain
            try:
                cycle([], plain)
            except Exception as exc:
                plain["error"] = f"{type(exc).__name__}: {exc}"
                failures.append(f"checkpoint/restore: {plain['error']}")
            self.log(
                f"driver alone: checkpoint {fmt(plain.get('checkpoint_seconds'))} s, restore "
                f"{fmt(plain.get('restore_seconds'))} s, intact {plain.get('data_intact')}, NVML "
                f"after checkpoint {(plain.get('nvml_after_checkpoint') or {}).get('process_mib')} "
                f"MiB{'; ' + plain['error'] if 'error' in plain else ''}"
            )
            if not capability.migration:
                result["identity_remap"] = {"skipped": "the driver has no GPU UUID remap"}
            else:
                uuid_ = gpu_uuid or ready["uuid"]
                remap: dict[str, Any] = {"pair": [uuid_, uuid_]}
                result["identity_remap"] = remap
                try:
                    state = checkpointer.state(pid)
                    if state != "running":
                        raise RuntimeError(f"not tried: the process is {state!r}, not running")
                    cycle([(uuid_, uuid_)], remap)
                    remap["accepted"] = True
                except Exception as exc:
                    remap["error"] = f"{type(exc).__name__}: {exc}"
                    # Accepted means the restore call with the pair returned without an error.
                    remap["accepted"] = remap.get("restore_call") == "returned"
                    failures.append(f"identity remap: {remap['error']}")
                self.log(
                    f"identity UUID remap: accepted {remap.get('accepted')}, intact "
                    f"{remap.get('data_intact')}{'; ' + remap['error'] if 'error' in remap else ''}"
                )
            if failures:
                raise RuntimeError("; ".join(failures))
        finally:
            holder.close()

    # -- 7. other benches and tests --------------------------------------------------------

    def offload_bandwidth(self) -> None:
        device, gib = ("cpu", "0.25") if self.simulate else ("cuda", "8")
        process = subprocess.Popen(
            [
                sys.executable,
                str(REPO_ROOT / "bench" / "offload_bandwidth.py"),
                "--device",
                device,
                "--gib",
                gib,
            ],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        self.children.append(process)
        out, _ = self.communicate(process, self.budget(180, reserve=10), "offload_bandwidth")
        result = json.loads(out[out.index("{") :])
        self.summary["offload_bandwidth"] = result
        self.log(
            f"offload_bandwidth: offload x{fmt(result.get('offload_vs_copy'))}, restore "
            f"x{fmt(result.get('restore_vs_copy'))} of the plain copy"
        )

    def pytest(self) -> None:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pytest",
                "tests/test_offload.py",
                "tests/test_checkpoint.py",
                "-q",
                "-k",
                "cuda or gpu",
                "-p",
                "no:cacheprovider",
            ],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        self.children.append(process)
        started = time.perf_counter()
        try:
            out, _ = process.communicate(timeout=self.budget(150, reserve=5))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate(timeout=10)
            self.summary["pytest"] = {"rc": None, "output_tail": out[-3000:]}
            raise Timeout("pytest did not finish in time") from None
        lines = [ln for ln in out.splitlines() if ln.strip()]
        summary_line = next(
            (
                ln
                for ln in reversed(lines)
                if re.search(r"passed|failed|skipped|error|deselected", ln)
            ),
            lines[-1] if lines else "",
        )
        self.summary["pytest"] = {
            "rc": process.returncode,
            "summary": summary_line.strip("= "),
            "seconds": time.perf_counter() - started,
            "output_tail": out[-2500:],
        }
        if self.out is not None:
            (self.out / "pytest.log").write_text(out)
        self.log(f"pytest: rc {process.returncode}: {summary_line.strip('= ')}")
        if process.returncode not in (0, 5):  # 5: nothing collected
            raise RuntimeError(f"pytest failed (rc {process.returncode}): {summary_line}")

    # -- goals -----------------------------------------------------------------------------

    def goals(self) -> dict:
        s = self.summary
        gpu = not self.simulate
        goals: dict[str, dict] = {}

        def goal(
            name: str, text: str, value: Any, passed: bool | None, applicable: bool = True
        ) -> None:
            goals[name] = {
                "goal": text,
                "value": value,
                "pass": passed if applicable else None,
                **({} if applicable else {"note": "not applicable in --simulate"}),
            }

        offloads = s.get("offloads") or []
        restores = s.get("restores") or []

        def labelled(entries: list[dict], prefix: str) -> dict | None:
            return next((e for e in entries if str(e.get("label", "")).startswith(prefix)), None)

        warm = labelled(offloads, "offload 2")
        cold = labelled(offloads, "offload 1")
        warm_restore = labelled(restores, "restore 2")

        state_bytes = (s.get("kernel_a") or {}).get("build", {}).get("state_bytes")
        threshold = 8e9 if gpu else 256 * MiB * 0.99
        goal(
            "state_at_least_8GB",
            f">= {threshold / 1e9:.3g} GB of model + Adam state in kernel A",
            state_bytes,
            None if state_bytes is None else state_bytes >= threshold,
        )
        for name, entry, key, text in (
            (
                "offload_vs_pinned_copy",
                warm,
                "offload_vs_pinned_d2h",
                "tensor-tier offload (warm pool) >= 0.9 x pinned D->H",
            ),
            (
                "restore_vs_pinned_copy",
                warm_restore,
                "restore_vs_pinned_h2d",
                "tensor-tier restore (2nd) >= 0.9 x pinned H->D",
            ),
        ):
            value = entry.get(key) if entry else None
            goal(name, text, value, None if value is None else value >= 0.9, gpu)
        goals["offload_vs_pinned_copy_first_offload"] = {
            "goal": "info: the kernel's first offload allocates its pinned pool (0.42 s/GiB)",
            "value": cold.get("offload_vs_pinned_d2h") if cold else None,
            "pass": None,
        }
        first_restore = labelled(restores, "restore 1")
        goals["restore_vs_pinned_copy_first_restore"] = {
            "goal": "info: restore after the first offload",
            "value": first_restore.get("restore_vs_pinned_h2d") if first_restore else None,
            "pass": None,
        }

        def zero_mib(entry: dict | None) -> tuple[Any, bool | None]:
            if not entry:
                return None, None
            nvml = entry.get("nvml_after") or {}
            if not nvml.get("available"):
                return nvml.get("reason"), None
            before = entry.get("nvml_before") or {}
            if before.get("available") and not before.get("listed"):
                return "pid not listed by NVML even while resident (pid namespace?)", None
            return nvml.get("process_mib"), nvml.get("process_mib") == 0

        evictions = [e for e in (cold, warm, s.get("auto_eviction")) if e and "nvml_after" in e]
        values = [zero_mib(e) for e in evictions]
        verdicts = [v for _, v in values if v is not None]
        goal(
            "gpu_memory_after_full_eviction_0MiB",
            "NVML memory of kernel A's pid after offload (both tiers) == 0 MiB, every eviction",
            [v for v, _ in values],
            (all(verdicts) if verdicts else None),
            gpu,
        )
        contexts = [bool((e.get("context") or {}).get("checkpointed")) for e in evictions]
        goal(
            "driver_tier_ran_after_tensor_tier",
            "record.context.checkpointed after each eviction",
            contexts,
            (all(contexts) if contexts else None),
            gpu,
        )
        digests = [
            (s.get("kernel_a") or {}).get("after_restore_1", {}).get("digest_identical"),
            (s.get("kernel_a") or {}).get("after_restore_2", {}).get("digest_identical"),
        ]
        known = [d for d in digests if d is not None]
        goal(
            "state_bit_identical_after_restore",
            "digest of all state unchanged by offload + restore",
            digests,
            all(known) if len(known) == 2 else None,
        )
        training = s.get("training") or {}
        goal(
            "losses_equal_uninterrupted_run",
            "A's 4 losses (offloaded between steps 2 and 3) == B's, bitwise",
            training.get("losses_equal_bitwise"),
            training.get("losses_equal_bitwise"),
        )
        goal(
            "final_state_equal_uninterrupted_run",
            "A's state after 4 steps == B's, bitwise (digest)",
            training.get("state_equal_to_reference"),
            training.get("state_equal_to_reference"),
        )
        driver = s.get("driver_alone") or {}
        plain = driver.get("plain") or {}
        ours, ours_from = None, None
        if warm and warm.get("driver_context_checkpoint_seconds") is not None:
            ours, ours_from = warm.get("full_eviction_seconds"), "tensor tier + driver tier (log)"
        elif warm and warm.get("ledger_offloading_to_offloaded_seconds") is not None:
            # The driver's seconds were not found in the log: the broker's own span of the
            # offload (both tiers and the RPC) is an upper bound of ours.
            ours = warm["ledger_offloading_to_offloaded_seconds"]
            ours_from = "ledger span offloading -> offloaded (both tiers + RPC)"
        full = bool(((warm or {}).get("context") or {}).get("checkpointed"))
        alone = plain.get("checkpoint_seconds")
        speedup = ratio(alone, ours)
        warm_restore_cell = (warm_restore or {}).get("cell_seconds")
        s["eviction_comparison"] = {
            "ours_full_eviction_seconds": ours,
            "ours_measured_as": ours_from,
            "ours_tensor_seconds": ((warm or {}).get("tensor_tier") or {}).get("seconds"),
            "ours_driver_context_seconds": (warm or {}).get("driver_context_checkpoint_seconds"),
            "ours_was_full_eviction": full,
            "driver_alone_checkpoint_seconds": alone,
            "speedup": speedup,
            "first_offload_full_eviction_seconds": (cold or {}).get("full_eviction_seconds"),
            "first_offload_speedup": ratio(alone, (cold or {}).get("full_eviction_seconds")),
            "info_ours_restore_cell_seconds": warm_restore_cell,
            "info_driver_alone_restore_seconds": plain.get("restore_seconds"),
            "info_restore_speedup": ratio(plain.get("restore_seconds"), warm_restore_cell),
        }
        goal(
            "ours_5x_faster_than_driver_alone",
            "driver-tier-alone checkpoint seconds / our full eviction (tensor tier + driver tier "
            "of the context, warm pool) >= 5; fails if the driver tier did not run in the broker",
            speedup,
            None if speedup is None else speedup >= 5 and full,
            gpu,
        )
        holder_visible = (driver.get("nvml_before") or {}).get("listed")
        after_checkpoint = (plain.get("nvml_after_checkpoint") or {}).get("process_mib")
        goal(
            "driver_alone_restore_intact",
            "driver checkpoint + restore of the same state: 0 MiB while checkpointed, data intact",
            {
                "data_intact": plain.get("data_intact"),
                "mib_while_checkpointed": after_checkpoint
                if holder_visible
                else "pid not listed by NVML even before (pid namespace?)",
            },
            (plain.get("data_intact") is True and (after_checkpoint == 0 or not holder_visible))
            if plain
            else None,
            gpu,
        )
        remap = driver.get("identity_remap") or {}
        goal(
            "identity_uuid_remap",
            "restore with gpu_pairs=[(uuid, uuid)] accepted and data intact",
            {
                k: remap.get(k)
                for k in ("accepted", "data_intact", "error", "skipped")
                if k in remap
            },
            (remap.get("accepted") is True and remap.get("data_intact") is True) if remap else None,
            gpu,
        )
        bench = s.get("offload_bandwidth") or {}
        bench_ratios = [bench.get("offload_vs_copy"), bench.get("restore_vs_copy")]
        goal(
            "offload_bandwidth_bench_ratios",
            "bench/offload_bandwidth.py --device cuda --gib 8: offload and restore >= 0.9 x copy",
            bench_ratios,
            all(r is not None and r >= 0.9 for r in bench_ratios) if bench else None,
            gpu,
        )
        tests = s.get("pytest") or {}
        goal(
            "gpu_tests_pass",
            "pytest -k 'cuda or gpu' on test_offload.py and test_checkpoint.py",
            tests.get("summary"),
            tests.get("rc") == 0 if tests else None,
        )
        return goals

    # -- the whole run ---------------------------------------------------------------------

    async def run_async(self) -> None:
        self.run_step("device_facts", self.device_facts)
        self.run_step("pinned_copy", self.pinned_copy, requires=("device_facts",))
        self.run_step("server_start", self.start_server)
        try:
            await self.run_step_async(
                "kernel_a_build", self.kernel_a_build, requires=("server_start",)
            )
            self.run_step(
                "offload_1",
                lambda: self.offload("offload 1: first, allocates the pinned pool"),
                requires=("kernel_a_build",),
            )
            await self.run_step_async(
                "restore_1",
                lambda: self.restore_cell("restore 1 (next cell)"),
                requires=("kernel_a_build",),
            )
            await self.run_step_async(
                "train_after_restore", self.continue_training, requires=("kernel_a_build",)
            )
            self.run_step(
                "offload_2",
                lambda: self.offload("offload 2: pinned pool reused"),
                requires=("kernel_a_build",),
            )
            await self.run_step_async(
                "restore_2",
                lambda: self.restore_cell("restore 2 (next cell)"),
                requires=("offload_2",),
            )
            await self.run_step_async(
                "digest_after_restore_2", self.check_digest, requires=("restore_2",)
            )
            await self.run_step_async(
                "kernel_b_reference", self.kernel_b_reference, requires=("server_start",)
            )
            self.run_step(
                "compare_training",
                self.compare,
                requires=("train_after_restore", "kernel_b_reference"),
            )
        finally:
            self.run_step("server_stop", self.stop_server)
        self.run_step(
            "driver_tier_alone", self.driver_alone, requires=("device_facts",), min_seconds=30
        )
        if not self.args.skip_bench:
            self.run_step("offload_bandwidth_bench", self.offload_bandwidth, min_seconds=30)
        if not self.args.skip_pytest:
            self.run_step("gpu_tests", self.pytest, min_seconds=20)

    def finish(self, reason: str = "") -> dict:
        s = self.summary
        if reason:
            s["errors"].append({"step": "watchdog", "error": reason})
        try:
            s["goals"] = self.goals()
        except Exception as exc:
            s["errors"].append(
                {
                    "step": "goals",
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-2000:],
                }
            )
            s.setdefault("goals", {})
        s["seconds"] = time.monotonic() - self.t0
        verdicts = [g["pass"] for g in s["goals"].values() if g.get("pass") is not None]
        real_errors = [e for e in s["errors"] if not e.get("skipped")]
        s["goals_passed"] = sum(1 for v in verdicts if v)
        s["goals_failed"] = [name for name, g in s["goals"].items() if g.get("pass") is False]
        s["ok"] = (
            bool(verdicts)
            and all(verdicts)
            and not real_errors
            and not any(e.get("skipped") for e in s["errors"])
        )
        return s

    def emit(self, summary: dict) -> None:
        """The full summary to ``--out``/gpu_check.json; a compact one (no event lists, logs or
        long tracebacks, goals first) as one JSON line on stdout, the last thing printed."""
        full = rounded(summary)
        if self.out is not None:
            with contextlib.suppress(OSError):
                (self.out / "gpu_check.json").write_text(json.dumps(full, indent=2, default=str))
                for name in ("server.log", "holder.log"):
                    if (self.workdir / name).exists():
                        shutil.copy(self.workdir / name, self.out / name)
        print("=== gpu_check summary (JSON) ===", flush=True)
        print(json.dumps(compact(full), separators=(",", ":"), default=str), flush=True)

    def kill_children(self) -> None:
        for process in self.children:
            if process.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, signal.SIGKILL)
        for pid in self.kernel_pids:
            kill_kernel(pid)


def compact(summary: dict) -> dict:
    """The summary without its bulky parts, the verdicts first (stdout is read from its tail)."""
    drop = {
        "events",
        "output_tail",
        "cell_output",
        "pids_listed",
        "traceback",
        "record",
        "record_resident",
        "nvml_baseline",
        "nvml_after_copy",
        "note",
        "d2h_seconds",
        "h2d_seconds",
        "a_final_digest",
        "b_final_digest",
    }

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in drop}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    first = ("ok", "mode", "goals_failed", "goals", "eviction_comparison", "errors", "notes")
    out = {k: strip(summary[k]) for k in first if k in summary}
    # Verdict and value per goal; what each goal means is in the full summary.
    out["goals"] = {
        name: {"pass": goal.get("pass"), "value": strip(goal.get("value"))}
        for name, goal in (summary.get("goals") or {}).items()
    }
    for key, value in summary.items():
        if key == "server_log_singularity":
            out[key] = value[-12:]
        elif key not in out:
            out[key] = strip(value)
    for error in out.get("errors") or []:
        if isinstance(error.get("error"), str):
            error["error"] = error["error"][-1500:]
    return out


def kill_kernel(pid: int) -> None:
    """SIGKILL a kernel this check started, if that pid is still one of its kernels."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"ipykernel" in cmdline:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def fmt(value: float | None, scale: float = 1.0, unit: str = "") -> str:
    if value is None:
        return "?"
    return f"{value / scale:.3f}{(' ' + unit) if unit else ''}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--simulate", action="store_true", help="no GPU: simulated device, 256 MiB of state"
    )
    parser.add_argument("--out", help="directory for gpu_check.json and the logs (e.g. $OUT)")
    parser.add_argument(
        "--deadline", type=float, default=290.0, help="hard limit for the whole run (s)"
    )
    parser.add_argument(
        "--layers", type=int, help="Linear layers of the model (GPU: 8, simulate: 4)"
    )
    parser.add_argument("--width", type=int, help="their width (GPU: 8000, simulate: 2048)")
    parser.add_argument("--batch", type=int, help="batch size (GPU: 256, simulate: 64)")
    parser.add_argument("--copy-bytes", type=int, help="bytes of the pinned copy (GPU: 2 GiB)")
    parser.add_argument(
        "--devices", help="SingularityApp.devices (GPU: auto, simulate: simulated:1x64GiB)"
    )
    parser.add_argument(
        "--skip-bench", action="store_true", help="do not run bench/offload_bandwidth.py"
    )
    parser.add_argument("--skip-pytest", action="store_true", help="do not run the CUDA/GPU tests")
    args = parser.parse_args()
    defaults = (
        {
            "layers": 4,
            "width": 2048,
            "batch": 64,
            "copy_bytes": 256 * MiB,
            "devices": "simulated:1x64GiB",
        }
        if args.simulate
        else {"layers": 8, "width": 8000, "batch": 256, "copy_bytes": 2 * GiB, "devices": "auto"}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)

    check = GpuCheck(args)
    claim_lock = threading.Lock()
    claimed: list[str] = []

    def claim(who: str) -> bool:
        """Only one of the main thread and the watchdog prints the summary."""
        with claim_lock:
            if claimed:
                return False
            claimed.append(who)
            return True

    def watchdog() -> None:
        if not claim("watchdog"):
            return
        check.log(
            f"!!! deadline of {args.deadline:.0f} s reached: printing what was measured and exiting"
        )
        check.kill_children()
        with contextlib.suppress(Exception):
            check.emit(
                check.finish(f"deadline of {args.deadline:.0f} s reached; the run was cut short")
            )
        sys.stdout.flush()
        shutil.rmtree(check.workdir, ignore_errors=True)
        os._exit(3)

    timer = threading.Timer(args.deadline, watchdog)
    timer.daemon = True
    timer.start()
    check.log(
        f"gpu_check ({'simulate' if args.simulate else 'GPU'}): workdir {check.workdir}, deadline "
        f"{args.deadline:.0f} s, state {args.layers} x Linear({args.width}, {args.width}) float32 + Adam"
    )
    try:
        asyncio.run(check.run_async())
    except BaseException as exc:  # never leave without a summary
        check.summary["errors"].append(
            {
                "step": "main",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-3000:],
            }
        )
    finally:
        check.kill_children()
        check.nvml.close()
    if not claim("main"):
        time.sleep(120)  # the watchdog is printing the summary and exits the process
    timer.cancel()
    summary = check.finish()
    check.emit(summary)
    shutil.rmtree(check.workdir, ignore_errors=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
