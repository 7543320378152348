"""The driver tier and NVML on a real GPU: a plain torch process checkpointed, restored, remapped.

Run by ``bench/gpu_check.py`` (``JUPYTER_SINGULARITY_GPU=require``); skipped on machines without a
GPU (see gpu_gate.py). The figures each test records go into the check's summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from gpu_gate import facts
from gpu_state import nvml_process_mib

from jupyter_singularity.broker.checkpoint import CheckpointError, DriverCheckpointer, detect

pytestmark = pytest.mark.gpu

# A kernel stand-in: holds a CUDA context and a tensor, says which GPU torch sees, then answers
# whether the tensor still holds what it held at the start each time it reads a line. With
# "managed" it also holds CUDA managed (UVM) memory, which the driver documents it cannot
# checkpoint.
_CUDA_CHILD = r"""
import ctypes, json, sys, torch
x = torch.arange(1 << 22, device="cuda", dtype=torch.float64)
expected = float(x.sum())
if "managed" in sys.argv:
    pointer = ctypes.c_uint64()
    rc = ctypes.CDLL("libcuda.so.1").cuMemAllocManaged(
        ctypes.byref(pointer), ctypes.c_size_t(64 << 20), ctypes.c_uint(1)
    )
    assert rc == 0, f"cuMemAllocManaged: {rc}"
props = torch.cuda.get_device_properties(0)
print(json.dumps({"uuid": str(props.uuid), "name": props.name}), flush=True)
for _ in sys.stdin:
    print("intact" if float(x.sum()) == expected else "changed", flush=True)
"""

#: No GPU has this UUID.
NO_SUCH_GPU = "GPU-00000000-0000-0000-0000-00000000abcd"


class Child:
    def __init__(self, gpu: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CUDA_CHILD, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, "the child could not start CUDA"
        self.seen = json.loads(line)
        self.pid = self.process.pid

    def ask(self) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("check\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def _hex(uuid: str) -> str:
    """A UUID's hex digits, whatever the prefix (NVML: GPU-/MIG-; torch: none or GPU-)."""
    for prefix in ("GPU-", "MIG-"):
        uuid = uuid.removeprefix(prefix)
    return uuid.replace("-", "").lower()


@pytest.fixture
def first_gpu() -> str:
    """The first GPU of the pool this machine's server would have."""
    return facts().uuids[0]


@pytest.fixture
def child(first_gpu: str) -> Iterator[Child]:
    process = Child(first_gpu)
    yield process
    process.close()


@pytest.fixture
def checkpointer() -> DriverCheckpointer:
    return DriverCheckpointer(detect())


def test_nvml_and_torch_name_the_same_gpu(record_property) -> None:
    """The pool names GPUs by NVML's UUID in each kernel's CUDA_VISIBLE_DEVICES; torch must then
    see exactly that GPU (compared with ``props.uuid``), for each GPU of the pool."""
    for uuid in facts().uuids[:2]:
        child = Child(uuid)
        try:
            assert _hex(child.seen["uuid"]) == _hex(uuid), (child.seen, uuid)
            record_property(f"gpu {uuid}", child.seen["name"])
        finally:
            child.close()


def test_checkpoint_frees_the_gpu_and_restore_keeps_the_data(
    child: Child, checkpointer: DriverCheckpointer, record_property
) -> None:
    assert checkpointer.state(child.pid) == "running"
    held = nvml_process_mib(child.pid)
    assert held, f"NVML does not list pid {child.pid} (another pid namespace?)"
    checkpointer.lock(child.pid)
    assert checkpointer.state(child.pid) == "locked"
    checkpointer.unlock(child.pid)

    seconds = checkpointer.checkpoint(child.pid)
    assert checkpointer.state(child.pid) == "checkpointed"
    assert not nvml_process_mib(child.pid)  # the whole context left the GPU
    back = checkpointer.restore(child.pid)
    assert checkpointer.state(child.pid) == "running"
    assert child.ask() == "intact"
    record_property("context_mib", held)
    record_property("checkpoint_seconds", seconds)
    record_property("restore_seconds", back)


@pytest.mark.gpu(remap=True)
def test_restore_with_an_identity_uuid_remap(
    child: Child, checkpointer: DriverCheckpointer, first_gpu: str
) -> None:
    checkpointer.checkpoint(child.pid)
    checkpointer.restore(child.pid, [(first_gpu, first_gpu)])
    assert checkpointer.state(child.pid) == "running"
    assert child.ask() == "intact"


@pytest.mark.gpu(remap=True)
def test_restore_with_a_wrong_uuid_pair_fails(
    child: Child, checkpointer: DriverCheckpointer, first_gpu: str, record_property
) -> None:
    """Proof that the driver reads the pairs at all: a pair naming a GPU that does not exist, on
    either side, must be refused, and the process must stay checkpointed, restorable as before."""
    checkpointer.checkpoint(child.pid)
    gpu = first_gpu
    for name, pairs in (("new", [(gpu, NO_SUCH_GPU)]), ("old", [(NO_SUCH_GPU, gpu)])):
        with pytest.raises(CheckpointError) as refused:
            checkpointer.restore(child.pid, pairs)
        record_property(f"wrong {name} uuid", str(refused.value))
        assert checkpointer.state(child.pid) == "checkpointed"
    checkpointer.restore(child.pid)
    assert child.ask() == "intact"


def test_a_failed_checkpoint_is_reported_where_it_left_the_process(
    first_gpu: str, checkpointer: DriverCheckpointer, record_property
) -> None:
    """Managed (UVM) memory, which NVIDIA documents the checkpoint does not support: whatever
    the driver does, the checkpointer says where the process is, and never leaves it locked."""
    child = Child(first_gpu, "managed")
    try:
        try:
            seconds = checkpointer.checkpoint(child.pid)
        except CheckpointError as err:
            record_property("managed memory", f"refused: {err}")
            assert err.state == checkpointer.state(child.pid)
            assert err.state != "locked"
            if err.state == "running":
                assert child.ask() == "intact"
        else:
            record_property("managed memory", f"checkpointed in {seconds:.2f} s")
            checkpointer.restore(child.pid)
            assert child.ask() == "intact"
    finally:
        child.close()
