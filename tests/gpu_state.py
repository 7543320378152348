"""A model with optimizer state, built and trained the same way in kernels and in plain processes,
with a digest of every byte of it: what the GPU tests offload, restore and compare.

The size comes from ``JUPYTER_SINGULARITY_GPU_STATE`` ("layers,width,batch"); ``bench/gpu_check.py``
sets a 12 GiB one. Each ``Linear(width, width)`` in float32 with Adam holds 16 bytes a parameter
(weights, gradients, two moments).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pynvml

STATE_VARIABLE = "JUPYTER_SINGULARITY_GPU_STATE"
#: Small enough for a quick run of the tests on any GPU, and on simulated devices.
DEFAULT_GPU_STATE = "2,4096,128"  # 0.54 GB
DEFAULT_SIMULATED_STATE = "4,1024,64"  # 67 MB
MiB = 1 << 20


@dataclass(frozen=True)
class StateSize:
    layers: int
    width: int
    batch: int

    @classmethod
    def from_env(cls, simulated: bool) -> StateSize:
        default = DEFAULT_SIMULATED_STATE if simulated else DEFAULT_GPU_STATE
        text = os.environ.get(STATE_VARIABLE) or default
        try:
            layers, width, batch = (int(part) for part in text.split(","))
        except ValueError:
            raise ValueError(
                f"{STATE_VARIABLE}={text!r}: expected 'layers,width,batch', e.g. '12,8192,256'"
            ) from None
        return cls(layers, width, batch)

    @property
    def nbytes(self) -> int:
        """Parameters, gradients and two Adam moments (16 B a parameter), plus data and target."""
        return 16 * self.layers * (self.width**2 + self.width) + 8 * self.batch * self.width


# __NAME__ tokens are replaced by ``code``.
STATE_CODE = r"""
import hashlib, json, os, time
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts: determinism
import torch
torch.use_deterministic_algorithms(True, warn_only=True)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
DEVICE = torch.device(__DEVICE__)
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
    losses.append(loss.item())


def state_tensors():
    tensors = [*model.parameters()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for _, v in sorted(s.items()) if torch.is_tensor(v)]
    return tensors + [data, target]


def state_bytes():
    return sum(t.untyped_storage().nbytes() for t in state_tensors() if t.device == DEVICE)


def state_digest():
    # Every byte counts: per chunk of 32-bit words, their sum and two position-weighted sums of
    # their 16-bit halves (exact in int64), all hashed in order; computed where the tensors are.
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
        "digest": state_digest(),
        "state_bytes": state_bytes(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    out.update(extra)
    print("RESULT " + json.dumps(out), flush=True)
"""

BUILD_CELL = (
    STATE_CODE
    + r"""
_t0 = time.perf_counter()
for _ in range(__STEPS__):
    train_step()
_sync()
report(seconds=time.perf_counter() - _t0)
"""
)

CONTINUE_CELL = r"""
_before = state_digest()
for _ in range(__STEPS__):
    train_step()
report(digest_before=_before)
"""

DIGEST_CELL = "report()"

#: A cell that does nothing: timed, it is what a restore costs the user.
PROBE_CELL = "_probe = 1"

#: A timed GPU loop, and the kernel's host pool before and after it: run while the pool is being
#: prepared (just after a cell) and again once it is, it shows what preparing costs a cell.
LOOP_CELL = r"""
from jupyter_singularity.kernel.runtime import Runtime as _Runtime
_engine = _Runtime.current.engine
_pool = [0 if _engine is None else _engine.pool_bytes]
_a = torch.randn(4096, 4096, device=DEVICE)
_sync()
_t = time.perf_counter()
for _ in range(__STEPS__):
    _a = _a @ _a
    _a /= _a.norm()
_sync()
_pool.append(0 if _engine is None else _engine.pool_bytes)
print("RESULT " + json.dumps({"loop_seconds": time.perf_counter() - _t, "pool_bytes": _pool}), flush=True)
del _a
"""

#: A plain process holding the same state (no kernel, no pool) for the driver tier alone: it
#: answers each "verify" line with whether its state still has the digest it started with.
HOLDER_CODE = (
    STATE_CODE
    + r"""
import sys
for _ in range(__STEPS__):
    train_step()
_sync()
torch.cuda.empty_cache()  # the driver would save cached free blocks too: give it the state only
_digest = state_digest()
print("READY " + json.dumps({"pid": os.getpid(), "state_bytes": state_bytes(), "digest": _digest}), flush=True)
for line in sys.stdin:
    print("VERIFY " + json.dumps({"intact": state_digest() == _digest}), flush=True)
"""
)


def code(template: str, *, device: str, size: StateSize, steps: int) -> str:
    values = {
        "DEVICE": repr(device),
        "LAYERS": size.layers,
        "WIDTH": size.width,
        "BATCH": size.batch,
        "STEPS": steps,
    }
    for key, value in values.items():
        template = template.replace(f"__{key}__", str(value))
    return template


def result_line(text: str, tag: str = "RESULT") -> dict:
    """The JSON of the last ``TAG {...}`` line in ``text``."""
    for line in reversed(text.splitlines()):
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1 :])
    raise AssertionError(f"no {tag} line in the output:\n{text[-3000:]}")


def nvml_process_mib(pid: int) -> int | None:
    """What NVML says ``pid`` holds on all GPUs (MiB), asked of NVML directly; None when NVML
    does not list it at all."""
    pynvml.nvmlInit()
    try:
        held = None
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if process.pid == pid:
                    held = (held or 0) + int(process.usedGpuMemory or 0) // MiB
        return held
    finally:
        pynvml.nvmlShutdown()


def nvml_gpu_of(pid: int) -> str | None:
    """The UUID of the GPU NVML lists ``pid`` on (None: not listed)."""
    pynvml.nvmlInit()
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            if any(p.pid == pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)):
                uuid = pynvml.nvmlDeviceGetUUID(handle)
                return uuid.decode() if isinstance(uuid, bytes) else uuid
        return None
    finally:
        pynvml.nvmlShutdown()
