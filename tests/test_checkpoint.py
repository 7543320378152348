"""Driver-tier checkpoint: detection, ABI layouts, the call sequence and the broker's use of it.

Without a GPU the real driver cannot run, so most tests load a small fake libcuda compiled here
from C. It declares the checkpoint structs the way the CUDA headers do, so the C compiler (not
our ctypes code) decides where each field lies, and it enforces the documented contract: the
lock/checkpoint/restore/unlock state machine and "reserved fields must be zero". The tests at the
end drive the broker's service with the fake standing in for the GPU; the same calls on a real
driver and GPU are in test_gpu_driver.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from jupyter_singularity.broker.checkpoint import (
    CheckpointArgs,
    CheckpointError,
    DriverCapability,
    DriverCheckpointer,
    GpuPair,
    LockArgs,
    RestoreArgsCuda128,
    RestoreArgsCuda130,
    RestoreArgsCuda133,
    RestoreArgsCuda134,
    UnlockArgs,
    detect,
    gpu_uuid_to_cuuuid,
    restore_args_layout,
)
from jupyter_singularity.broker.identity import Identity, server_owner
from jupyter_singularity.broker.ledger import Ledger
from jupyter_singularity.broker.model import Policy
from jupyter_singularity.broker.processes import kernel_pid
from jupyter_singularity.broker.quotas import Quotas
from jupyter_singularity.broker.service import BrokerService
from jupyter_singularity.devices import DeviceInfo, DeviceInventory
from jupyter_singularity.kernel.client import BrokerClient
from jupyter_singularity.protocol import ENV_BROKER_URL, ENV_KERNEL_KEY

REPO = Path(__file__).resolve().parent.parent
GPU_A = "GPU-6f1c2a3b-4d5e-6f70-8192-a3b4c5d6e7f8"
GPU_B = "GPU-00112233-4455-6677-8899-aabbccddeeff"

# The fake driver. Struct declarations follow the CUDA headers named in checkpoint.py; the
# fake reads restore arguments with the layout of the header generation it pretends to be.
FAKE_LIBCUDA = r"""
#include <stddef.h>
#include <string.h>

typedef int CUresult;
typedef unsigned long long cuuint64_t;
typedef struct { char bytes[16]; } CUuuid;
typedef struct { CUuuid oldUuid; CUuuid newUuid; } CUcheckpointGpuPair;
typedef struct { unsigned int timeoutMs; unsigned int reserved0; cuuint64_t reserved1[7]; } Lock;
typedef struct { cuuint64_t reserved[8]; } Reserved64;
typedef struct {
    CUcheckpointGpuPair *gpuPairs; unsigned int gpuPairsCount;
    char reserved[52 - sizeof(CUcheckpointGpuPair *)]; cuuint64_t reserved1;
} Restore130;
typedef struct {
    CUcheckpointGpuPair *gpuPairs; unsigned int gpuPairsCount;
    char reserved[64 - sizeof(CUcheckpointGpuPair *) - sizeof(unsigned int)];
} Restore133;
typedef struct {
    CUcheckpointGpuPair *gpuPairs; unsigned int gpuPairsCount; unsigned int padding0;
    void **customStorageInfo_out;
    char reserved[64 - sizeof(CUcheckpointGpuPair *) - 2 * sizeof(unsigned int) - sizeof(void **)];
} Restore134;

/* What the C compiler makes of the declarations above: size, then field offsets. */
size_t fake_layout_lock[] = {sizeof(Lock), offsetof(Lock, timeoutMs), offsetof(Lock, reserved0),
                             offsetof(Lock, reserved1)};
size_t fake_layout_pair[] = {sizeof(CUcheckpointGpuPair), offsetof(CUcheckpointGpuPair, oldUuid),
                             offsetof(CUcheckpointGpuPair, newUuid)};
size_t fake_layout_130[] = {sizeof(Restore130), offsetof(Restore130, gpuPairs),
                            offsetof(Restore130, gpuPairsCount), offsetof(Restore130, reserved),
                            offsetof(Restore130, reserved1)};
size_t fake_layout_133[] = {sizeof(Restore133), offsetof(Restore133, gpuPairs),
                            offsetof(Restore133, gpuPairsCount), offsetof(Restore133, reserved)};
size_t fake_layout_134[] = {sizeof(Restore134), offsetof(Restore134, gpuPairs),
                            offsetof(Restore134, gpuPairsCount), offsetof(Restore134, padding0),
                            offsetof(Restore134, customStorageInfo_out),
                            offsetof(Restore134, reserved)};

int fake_driver_version = 13000;
int fake_init_rc = 0;
int fake_checkpoint_rc = 0;
int fake_restore_rc = 0;
int fake_unlock_rc = 0;
int fake_lock_rc = 0;
int fake_state_rc = 0;      /* cuCheckpointProcessGetState fails with this */
int fake_error_state = -1;  /* the state a failing lock or checkpoint leaves (-1: unchanged) */
int fake_unlock_failures = 0;  /* the next unlocks that fail with CUDA_ERROR_TIMEOUT */
int fake_pid = 0;          /* the one pid this driver knows as a CUDA process */
int fake_state = 0;        /* CUprocessState of fake_pid */
unsigned int fake_lock_timeout = 0;
unsigned int fake_pair_count = 0;
CUcheckpointGpuPair fake_pairs[4];
char fake_calls[512];

CUresult cuInit(unsigned int flags) { return flags ? 1 : fake_init_rc; }
CUresult cuDriverGetVersion(int *v) { *v = fake_driver_version; return 0; }

CUresult cuGetErrorName(CUresult e, const char **s) {
    switch (e) {
    case 1: *s = "CUDA_ERROR_INVALID_VALUE"; return 0;
    case 100: *s = "CUDA_ERROR_NO_DEVICE"; return 0;
    case 401: *s = "CUDA_ERROR_ILLEGAL_STATE"; return 0;
    case 801: *s = "CUDA_ERROR_NOT_SUPPORTED"; return 0;
    case 909: *s = "CUDA_ERROR_TIMEOUT"; return 0;
    default: *s = 0; return 1;
    }
}

CUresult cuGetErrorString(CUresult e, const char **s) {
    switch (e) {
    case 1: *s = "invalid argument"; return 0;
    case 100: *s = "no CUDA-capable device is detected"; return 0;
    case 401: *s = "operation not permitted in current state"; return 0;
    case 801: *s = "operation not supported"; return 0;
    case 909: *s = "the operation timed out"; return 0;
    default: *s = 0; return 1;
    }
}

#ifndef NO_CHECKPOINT
static void note(const char *name) {
    strncat(fake_calls, name, sizeof fake_calls - strlen(fake_calls) - 1);
    strncat(fake_calls, ",", sizeof fake_calls - strlen(fake_calls) - 1);
}

static int zero(const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) if (b[i]) return 0;
    return 1;
}

CUresult cuCheckpointProcessGetState(int pid, int *state) {
    note("state");
    if (pid != fake_pid) return 1;
    if (fake_state_rc) return fake_state_rc;
    *state = fake_state;
    return 0;
}

CUresult cuCheckpointProcessLock(int pid, Lock *args) {
    note("lock");
    if (pid != fake_pid || !args || args->reserved0 || !zero(args->reserved1, sizeof args->reserved1))
        return 1;
    if (fake_state != 0) return 401;
    if (fake_lock_rc) {
        if (fake_error_state >= 0) fake_state = fake_error_state;
        return fake_lock_rc;
    }
    fake_lock_timeout = args->timeoutMs;
    fake_state = 1;
    return 0;
}

CUresult cuCheckpointProcessCheckpoint(int pid, Reserved64 *args) {
    note("checkpoint");
    if (pid != fake_pid || !args || !zero(args, sizeof *args)) return 1;
    if (fake_state != 1) return 401;
    if (fake_checkpoint_rc) {
        if (fake_error_state >= 0) fake_state = fake_error_state;
        return fake_checkpoint_rc;
    }
    fake_state = 2;
    return 0;
}

static int take_pairs(CUcheckpointGpuPair *pairs, unsigned int count) {
    if (count > 4 || (count && !pairs)) return 0;
    fake_pair_count = count;
    memcpy(fake_pairs, pairs, count * sizeof *pairs);
    return 1;
}

CUresult cuCheckpointProcessRestore(int pid, void *args) {
    int ok;
    note("restore");
    if (pid != fake_pid || !args) return 1;
    if (fake_driver_version < 13000) {
        ok = zero(args, sizeof(Reserved64));
    } else if (fake_driver_version < 13030) {
        Restore130 *a = args;
        ok = zero(a->reserved, sizeof a->reserved) && !a->reserved1
             && take_pairs(a->gpuPairs, a->gpuPairsCount);
    } else if (fake_driver_version < 13040) {
        Restore133 *a = args;
        ok = zero(a->reserved, sizeof a->reserved) && take_pairs(a->gpuPairs, a->gpuPairsCount);
    } else {
        Restore134 *a = args;
        ok = !a->padding0 && !a->customStorageInfo_out && zero(a->reserved, sizeof a->reserved)
             && take_pairs(a->gpuPairs, a->gpuPairsCount);
    }
    if (!ok) return 1;
    if (fake_state != 2) return 401;
    if (fake_restore_rc) return fake_restore_rc;
    fake_state = 1;
    return 0;
}

CUresult cuCheckpointProcessUnlock(int pid, Reserved64 *args) {
    note("unlock");
    if (pid != fake_pid || !args || !zero(args, sizeof *args)) return 1;
    if (fake_state != 1) return 401;
    if (fake_unlock_rc) return fake_unlock_rc;
    if (fake_unlock_failures > 0) {
        fake_unlock_failures--;
        return 909;
    }
    fake_state = 0;
    return 0;
}
#endif
"""

_CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(_CC is None, reason="needs a C compiler to build the fake libcuda")


def _compile(directory: Path, name: str, *flags: str) -> Path:
    source = directory / "fake_libcuda.c"
    source.write_text(FAKE_LIBCUDA)
    library = directory / name
    subprocess.run(
        [_CC, "-shared", "-fPIC", "-std=c99", "-Wall", "-Werror", *flags, "-o", library, source],
        check=True,
    )
    return library


@pytest.fixture(scope="session")
def fake_libraries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("fake_libcuda")
    return {
        "checkpoint": _compile(directory, "libcuda_checkpoint.so"),
        "old": _compile(directory, "libcuda_old.so", "-DNO_CHECKPOINT"),
    }


class Fake:
    """The fake driver's globals, shared with the library detect() opens (same path, same handle)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.lib = ctypes.CDLL(self.path)

    def __getattr__(self, name: str) -> int:
        return ctypes.c_int.in_dll(self.lib, f"fake_{name}").value

    def set(self, **values: int) -> None:
        for name, value in values.items():
            ctypes.c_int.in_dll(self.lib, f"fake_{name}").value = value

    def calls(self) -> list[str]:
        return (ctypes.c_char * 512).in_dll(self.lib, "fake_calls").value.decode().split(",")[:-1]

    def lock_timeout(self) -> int:
        return ctypes.c_uint.in_dll(self.lib, "fake_lock_timeout").value

    def pairs(self) -> list[tuple[bytes, bytes]]:
        count = ctypes.c_uint.in_dll(self.lib, "fake_pair_count").value
        stored = (GpuPair * 4).in_dll(self.lib, "fake_pairs")
        return [(bytes(p.oldUuid.bytes), bytes(p.newUuid.bytes)) for p in stored[:count]]

    def layout(self, name: str, count: int) -> list[int]:
        return list((ctypes.c_size_t * count).in_dll(self.lib, f"fake_layout_{name}"))


@pytest.fixture
def fake(fake_libraries: dict[str, Path]) -> Iterator[Fake]:
    """The fake driver at CUDA 13.0, knowing this test process as its one CUDA process."""
    driver = Fake(fake_libraries["checkpoint"])
    driver.set(
        driver_version=13000,
        init_rc=0,
        checkpoint_rc=0,
        restore_rc=0,
        unlock_rc=0,
        lock_rc=0,
        state_rc=0,
        error_state=-1,
        unlock_failures=0,
        pid=os.getpid(),
        state=0,
    )
    ctypes.memset((ctypes.c_char * 512).in_dll(driver.lib, "fake_calls"), 0, 512)
    ctypes.c_uint.in_dll(driver.lib, "fake_pair_count").value = 0
    yield driver


def _checkpointer(fake: Fake, driver_version: int = 13000) -> DriverCheckpointer:
    fake.set(driver_version=driver_version)
    capability = detect(fake.path)
    assert capability.available, capability.reason
    return DriverCheckpointer(capability)


def _libcuda_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


# --- detection ------------------------------------------------------------------------------


@pytest.mark.skipif(_libcuda_present(), reason="this machine has an NVIDIA driver")
def test_detect_without_driver_says_so_and_does_not_raise() -> None:
    capability = detect()
    assert capability == DriverCapability(
        available=False,
        migration=False,
        driver_version=None,
        reason="no NVIDIA driver (libcuda.so.1 not found)",
    )
    assert capability.log_line() == (
        "driver-tier checkpoint unavailable: no NVIDIA driver (libcuda.so.1 not found); "
        "offloaded kernels keep their CUDA context (~0.6 GB) on the GPU"
    )


def test_detect_names_a_missing_library(tmp_path: Path) -> None:
    missing = str(tmp_path / "libcuda.so.1")
    capability = detect(missing)
    assert not capability.available
    assert capability.reason == f"no NVIDIA driver ({missing} not found)"


def test_detect_rejects_a_library_that_is_not_libcuda() -> None:
    capability = detect(ctypes.util.find_library("c") or "libc.so.6")
    assert not capability.available
    assert "is not a CUDA driver library (lacks cuInit" in capability.reason


@needs_cc
def test_detect_old_driver_without_checkpoint_api(fake_libraries: dict[str, Path]) -> None:
    old = Fake(fake_libraries["old"])
    old.set(driver_version=12040)
    capability = detect(old.path)
    assert (capability.available, capability.migration, capability.driver_version) == (
        False,
        False,
        12040,
    )
    assert capability.reason == (
        "the driver (CUDA 12.4) lacks cuCheckpointProcess* (needs driver >= 570, CUDA 12.8)"
    )


@needs_cc
def test_detect_reports_a_failing_cuinit(fake: Fake) -> None:
    fake.set(init_rc=100)
    capability = detect(fake.path)
    assert not capability.available
    assert capability.driver_version == 13000
    assert capability.reason.startswith(
        "cuInit failed with CUDA_ERROR_NO_DEVICE (no CUDA-capable device is detected): "
        "the driver sees no GPU"
    )


@needs_cc
@pytest.mark.parametrize(
    ("version", "migration", "line"),
    [
        (
            12080,
            False,
            "driver-tier checkpoint available (CUDA driver 12.8, UUID remap for migration: "
            "no, needs driver >= 580 (CUDA 13.0))",
        ),
        (
            12090,
            False,
            "driver-tier checkpoint available (CUDA driver 12.9, UUID remap for migration: "
            "no, needs driver >= 580 (CUDA 13.0))",
        ),
        (
            13000,
            True,
            "driver-tier checkpoint available (CUDA driver 13.0, UUID remap for migration: yes)",
        ),
        (
            13030,
            True,
            "driver-tier checkpoint available (CUDA driver 13.3, UUID remap for migration: yes)",
        ),
    ],
)
def test_detect_available_and_migration_by_version(
    fake: Fake, version: int, migration: bool, line: str
) -> None:
    fake.set(driver_version=version)
    capability = detect(fake.path)
    assert capability.available
    assert capability.migration is migration
    assert capability.driver_version == version
    assert capability.reason == ""
    assert capability.log_line() == line


def test_unavailable_capability_raises_its_reason_on_use() -> None:
    reason = "no NVIDIA driver (libcuda.so.1 not found)"
    checkpointer = DriverCheckpointer(DriverCapability(False, False, None, reason))
    for use in (
        lambda: checkpointer.state(os.getpid()),
        lambda: checkpointer.checkpoint(os.getpid()),
        lambda: checkpointer.restore(os.getpid()),
        lambda: checkpointer.lock(os.getpid()),
        lambda: checkpointer.unlock(os.getpid()),
    ):
        with pytest.raises(CheckpointError, match=re.escape(f"unavailable: {reason}")):
            use()


# --- UUIDs ----------------------------------------------------------------------------------


def test_gpu_uuid_becomes_the_16_bytes_nvml_prints() -> None:
    cuuuid = gpu_uuid_to_cuuuid(GPU_A)
    assert ctypes.sizeof(cuuuid) == 16
    assert bytes(cuuuid.bytes) == bytes.fromhex("6f1c2a3b4d5e6f708192a3b4c5d6e7f8")
    assert "GPU-" + str(uuid.UUID(bytes=bytes(cuuuid.bytes))) == GPU_A
    assert bytes(gpu_uuid_to_cuuuid(GPU_A.upper()).bytes) == bytes(cuuuid.bytes)


@pytest.mark.parametrize(
    "text",
    [
        "6f1c2a3b-4d5e-6f70-8192-a3b4c5d6e7f8",  # no prefix
        "MIG-6f1c2a3b-4d5e-6f70-8192-a3b4c5d6e7f8",
        "GPU-6f1c2a3b4d5e6f708192a3b4c5d6e7f8",  # no dashes
        "GPU-6f1c2a3b-4d5e-6f70-8192-a3b4c5d6e7f",  # one digit short
        "GPU-6f1c2a3b-4d5e-6f70-8192-a3b4c5d6e7fg",
        "",
    ],
)
def test_malformed_gpu_uuid_is_rejected_readably(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a GPU UUID: .*expected NVML's form 'GPU-'"):
        gpu_uuid_to_cuuuid(text)


# --- ABI layouts ----------------------------------------------------------------------------


def _offsets(layout: type[ctypes.Structure]) -> dict[str, tuple[int, int]]:
    return {
        name: (getattr(layout, name).offset, getattr(layout, name).size)
        for name, *_ in layout._fields_
    }


def test_layouts_match_the_headers_on_64_bit() -> None:
    assert ctypes.sizeof(ctypes.c_void_p) == 8, "the checkpoint API exists on 64-bit Linux only"
    # CUDA 12.8-13.4 cuda.h: CUcheckpointLockArgs {timeoutMs; reserved0; cuuint64_t reserved1[7]}
    assert ctypes.sizeof(LockArgs) == 64
    assert _offsets(LockArgs) == {"timeoutMs": (0, 4), "reserved0": (4, 4), "reserved1": (8, 56)}
    # CUDA 12.8-13.3 cuda.h: checkpoint and unlock args are cuuint64_t reserved[8]
    assert ctypes.sizeof(CheckpointArgs) == ctypes.sizeof(UnlockArgs) == 64
    # CUDA 13.0+ cuda.h: CUcheckpointGpuPair {CUuuid oldUuid; CUuuid newUuid}
    assert ctypes.sizeof(GpuPair) == 32
    assert _offsets(GpuPair) == {"oldUuid": (0, 16), "newUuid": (16, 16)}
    # CUDA 12.8 / 12.9 cuda.h: CUcheckpointRestoreArgs {cuuint64_t reserved[8]}
    assert ctypes.sizeof(RestoreArgsCuda128) == 64
    assert _offsets(RestoreArgsCuda128) == {"reserved": (0, 64)}
    # CUDA 13.0-13.2 cuda.h: gpuPairs; gpuPairsCount; char reserved[52 - 8]; cuuint64_t reserved1
    assert ctypes.sizeof(RestoreArgsCuda130) == 64
    assert _offsets(RestoreArgsCuda130) == {
        "gpuPairs": (0, 8),
        "gpuPairsCount": (8, 4),
        "reserved": (12, 44),
        "reserved1": (56, 8),
    }
    # CUDA 13.3 cuda.h: gpuPairs; gpuPairsCount; char reserved[64 - 8 - 4]
    assert ctypes.sizeof(RestoreArgsCuda133) == 64
    assert _offsets(RestoreArgsCuda133) == {
        "gpuPairs": (0, 8),
        "gpuPairsCount": (8, 4),
        "reserved": (12, 52),
    }
    # CUDA 13.4 cuda.h: gpuPairs; gpuPairsCount; padding0; customStorageInfo_out; reserved[40]
    assert ctypes.sizeof(RestoreArgsCuda134) == 64
    assert _offsets(RestoreArgsCuda134) == {
        "gpuPairs": (0, 8),
        "gpuPairsCount": (8, 4),
        "padding0": (12, 4),
        "customStorageInfo_out": (16, 8),
        "reserved": (24, 40),
    }


@needs_cc
def test_layouts_match_what_a_c_compiler_makes_of_the_header_declarations(fake: Fake) -> None:
    def ours(layout: type[ctypes.Structure]) -> list[int]:
        return [ctypes.sizeof(layout), *(getattr(layout, n).offset for n, *_ in layout._fields_)]

    assert fake.layout("lock", 4) == ours(LockArgs)
    assert fake.layout("pair", 3) == ours(GpuPair)
    assert fake.layout("130", 5) == ours(RestoreArgsCuda130)
    assert fake.layout("133", 4) == ours(RestoreArgsCuda133)
    assert fake.layout("134", 6) == ours(RestoreArgsCuda134)


@pytest.mark.parametrize(
    ("version", "layout"),
    [
        (12080, RestoreArgsCuda128),
        (12090, RestoreArgsCuda128),
        (13000, RestoreArgsCuda130),
        (13020, RestoreArgsCuda130),
        (13030, RestoreArgsCuda133),
        (13040, RestoreArgsCuda134),
        (14000, RestoreArgsCuda134),
    ],
)
def test_restore_layout_follows_the_driver_generation(
    version: int, layout: type[ctypes.Structure]
) -> None:
    assert restore_args_layout(version) is layout


# --- the call sequence against the fake driver ------------------------------------------------


@needs_cc
def test_checkpoint_then_restore_walks_the_driver_state_machine(fake: Fake) -> None:
    checkpointer = _checkpointer(fake)
    pid = os.getpid()
    assert checkpointer.state(pid) == "running"
    assert checkpointer.checkpoint(pid) >= 0
    assert checkpointer.state(pid) == "checkpointed"
    assert fake.lock_timeout() == 10_000
    assert checkpointer.restore(pid) >= 0
    assert checkpointer.state(pid) == "running"
    assert fake.calls() == [
        "state",
        "lock",
        "checkpoint",
        "state",
        "restore",
        "unlock",
        "state",
    ]
    assert fake.pairs() == []


@needs_cc
def test_lock_and_unlock_expose_the_locked_state(fake: Fake) -> None:
    checkpointer = _checkpointer(fake)
    pid = os.getpid()
    checkpointer.lock(pid, timeout_ms=250)
    assert (checkpointer.state(pid), fake.lock_timeout()) == ("locked", 250)
    checkpointer.unlock(pid)
    assert checkpointer.state(pid) == "running"
    with pytest.raises(ValueError, match=re.escape("lock timeout must be 0..4294967295 ms")):
        checkpointer.lock(pid, timeout_ms=-1)


@needs_cc
@pytest.mark.parametrize("version", [13000, 13020, 13030, 13040])
def test_restore_passes_uuid_pairs_in_each_13x_layout(fake: Fake, version: int) -> None:
    checkpointer = _checkpointer(fake, version)
    pid = os.getpid()
    checkpointer.checkpoint(pid)
    checkpointer.restore(pid, [(GPU_A, GPU_B), (GPU_B, GPU_A)])
    a, b = (bytes(gpu_uuid_to_cuuuid(u).bytes) for u in (GPU_A, GPU_B))
    assert fake.pairs() == [(a, b), (b, a)]
    assert checkpointer.state(pid) == "running"


@needs_cc
def test_restore_refuses_remap_where_the_driver_has_none(fake: Fake) -> None:
    checkpointer = _checkpointer(fake, 12090)
    pid = os.getpid()
    checkpointer.checkpoint(pid)
    with pytest.raises(CheckpointError, match=r"CUDA 12.9\) has no GPU UUID remap"):
        checkpointer.restore(pid, [(GPU_A, GPU_A)])
    assert "restore" not in fake.calls()
    checkpointer.restore(pid)  # onto its own GPU: the all-zero 12.x struct
    assert checkpointer.state(pid) == "running"


@needs_cc
def test_malformed_pair_touches_nothing(fake: Fake) -> None:
    checkpointer = _checkpointer(fake)
    pid = os.getpid()
    checkpointer.checkpoint(pid)
    with pytest.raises(ValueError, match="not a GPU UUID"):
        checkpointer.restore(pid, [(GPU_A, "GPU-1")])
    assert checkpointer.state(pid) == "checkpointed"


@needs_cc
def test_failed_checkpoint_unlocks_again(fake: Fake) -> None:
    checkpointer = _checkpointer(fake)
    pid = os.getpid()
    fake.set(checkpoint_rc=801)
    with pytest.raises(CheckpointError) as raised:
        checkpointer.checkpoint(pid)
    message = str(raised.value)
    assert message.startswith(
        f"cuCheckpointProcessCheckpoint for pid {pid} failed with CUDA_ERROR_NOT_SUPPORTED "
        "(operation not supported): the driver cannot checkpoint this process"
    )
    assert message.endswith(f"; pid {pid} runs on and keeps its GPU state")
    assert (raised.value.call, raised.value.code) == ("cuCheckpointProcessCheckpoint", 801)
    assert raised.value.state == "running"
    # Asked where the process is after the failure, unlocked, and asked again.
    assert fake.calls() == ["lock", "checkpoint", "state", "unlock", "state"]
    assert checkpointer.state(pid) == "running"


@needs_cc
def test_failed_checkpoint_and_unlock_says_the_kernel_stays_blocked(fake: Fake) -> None:
    checkpointer = _checkpointer(fake)
    fake.set(checkpoint_rc=801, unlock_rc=909)
    with pytest.raises(
        CheckpointError,
        match=r"CUDA_ERROR_NOT_SUPPORTED.*; pid \d+ is left 'locked': its CUDA calls cannot "
        r"work until it is restarted$",
    ) as raised:
        checkpointer.checkpoint(os.getpid())
    assert raised.value.state == "locked"


# (what the failing call returns, the state it leaves, GetState's result, unlocks that fail)
# -> the state the checkpointer leaves the process in, and the driver calls made.
FAILURES = {
    "lock times out, process untouched": (
        dict(lock_rc=909),
        "running",
        ["lock", "state"],
    ),
    "lock fails, leaves it locked": (
        dict(lock_rc=909, error_state=1),
        "running",
        ["lock", "state", "unlock", "state"],
    ),
    "lock fails, leaves it failed": (
        dict(lock_rc=909, error_state=3),
        "failed",
        ["lock", "state"],
    ),
    "lock refused, state unreadable": (
        dict(lock_rc=1, state_rc=1),
        "running",
        ["lock", "state"],
    ),
    "checkpoint fails, leaves it failed": (
        dict(checkpoint_rc=801, error_state=3),
        "failed",
        ["lock", "checkpoint", "state"],
    ),
    "checkpoint reports an error, yet checkpointed": (
        dict(checkpoint_rc=801, error_state=2),
        "running",
        ["lock", "checkpoint", "state", "restore", "state", "unlock", "state"],
    ),
    "checkpoint fails, unlock fails once": (
        dict(checkpoint_rc=801, unlock_failures=1),
        "locked",
        ["lock", "checkpoint", "state", "unlock", "state"],
    ),
    "checkpoint fails, state unreadable": (
        dict(checkpoint_rc=801, state_rc=1),
        "unknown",
        ["lock", "checkpoint", "state"],
    ),
}


@needs_cc
@pytest.mark.parametrize("case", list(FAILURES))
def test_a_failed_checkpoint_asks_where_the_process_is_and_brings_it_back(
    fake: Fake, case: str
) -> None:
    """NVIDIA does not promise a good state after an error: every failure is followed by the
    process's state, and a process that can be brought back is."""
    settings, left, calls = FAILURES[case]
    checkpointer = _checkpointer(fake)
    pid = os.getpid()
    fake.set(**settings)
    with pytest.raises(CheckpointError) as raised:
        checkpointer.checkpoint(pid)
    assert (raised.value.state or "").split(":")[0] == left
    assert fake.calls() == calls
    if left == "running":
        assert str(raised.value).endswith(f"pid {pid} runs on and keeps its GPU state")
        assert fake.state == 0
    else:
        assert f"pid {pid} is left '{left}" in str(raised.value)


@needs_cc
def test_failed_restore_reports_where_the_process_is(fake: Fake) -> None:
    checkpointer = _checkpointer(fake)
    pid = os.getpid()
    checkpointer.checkpoint(pid)
    fake.set(restore_rc=801)
    with pytest.raises(CheckpointError, match=r"CUDA_ERROR_NOT_SUPPORTED.*is now 'checkpointed'$"):
        checkpointer.restore(pid)
    fake.set(restore_rc=0, unlock_rc=909)
    with pytest.raises(CheckpointError, match="restored but the kernel's CUDA calls stay blocked"):
        checkpointer.restore(pid)
    assert checkpointer.state(pid) == "locked"


@needs_cc
def test_lock_of_a_checkpointed_process_is_an_illegal_state(fake: Fake) -> None:
    checkpointer = _checkpointer(fake)
    pid = os.getpid()
    checkpointer.checkpoint(pid)
    with pytest.raises(CheckpointError, match="CUDA_ERROR_ILLEGAL_STATE") as raised:
        checkpointer.checkpoint(pid)
    # Nothing to undo: the lock itself failed, and the process stays as the first one left it.
    assert fake.calls()[-2:] == ["lock", "state"]
    assert (raised.value.code, raised.value.state) == (401, "checkpointed")


@needs_cc
def test_unknown_cuda_result_is_still_named(fake: Fake) -> None:
    checkpointer = _checkpointer(fake)
    checkpointer.checkpoint(os.getpid())
    fake.set(restore_rc=12345)
    with pytest.raises(CheckpointError, match=r"failed with CUresult 12345"):
        checkpointer.restore(os.getpid())


@needs_cc
def test_process_the_driver_does_not_know(fake: Fake) -> None:
    checkpointer = _checkpointer(fake)
    parent = os.getppid()
    with pytest.raises(
        CheckpointError,
        match=rf"cuCheckpointProcessGetState for pid {parent} failed with "
        r"CUDA_ERROR_INVALID_VALUE \(invalid argument\): usually the driver does not know",
    ):
        checkpointer.state(parent)


@needs_cc
def test_pid_that_does_not_exist(fake: Fake) -> None:
    checkpointer = _checkpointer(fake)
    # No pid exceeds pid_max, so this one cannot exist.
    missing = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    with pytest.raises(CheckpointError, match=rf"no process with pid {missing} \(has the kernel"):
        checkpointer.checkpoint(missing)
    assert fake.calls() == []
    for bad in (0, -1):
        with pytest.raises(ValueError, match="pid must be a positive integer"):
            checkpointer.state(bad)


# --- the broker service drives the tier (the fake driver stands in for the GPU) --------------


class TwoGpusOfOneChip(DeviceInventory):
    """What NVML lists on a node with two GPUs of one chip."""

    def __init__(self) -> None:
        super().__init__(kind="nvml")
        #: What NVML says each pid holds, on every device.
        self.held: dict[int, int] = {}

    def devices(self) -> list[DeviceInfo]:
        return [
            DeviceInfo(i, uuid, "NVIDIA H100", "H100", 16 << 30)
            for i, uuid in enumerate((GPU_A, GPU_B))
        ]

    def process_memory(self, index: int) -> dict[int, int]:
        return dict(self.held) if index == 0 else {}

    def close(self) -> None:
        pass


async def _until(predicate, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := predicate()):
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)
    return value


GiB = 1 << 30
#: What the fake kernels' tensor tier moves to host memory, and leaves on the GPU (its context).
STATE, CONTEXT = 12 * GiB, 600 << 20


class Pool:
    """A broker service over two GPUs of one chip whose driver is the fake one, and kernels
    (clients in this process, so the fake knows their pid) answering as the tensor tier would."""

    def __init__(self, service: BrokerService) -> None:
        self.service = service
        self.clients: list[BrokerClient] = []

    async def kernel(
        self, kernel_id: str, identity: Identity | None = None, **handlers: Any
    ) -> BrokerClient:
        """A registered kernel that said hello; its tensor tier moves STATE, leaves CONTEXT."""
        env = self.service.register_kernel(kernel_id, identity or server_owner()).env
        client = BrokerClient(env[ENV_BROKER_URL], kernel_id, env[ENV_KERNEL_KEY].encode())
        client.on("offload", lambda body: {"host_bytes": STATE, "gpu_bytes": CONTEXT})
        for type, handler in handlers.items():
            client.on(type, handler)
        client.start()
        self.clients.append(client)
        await self.ask(client, "hello", {"pid": os.getpid()})  # the one process the fake knows
        return client

    @staticmethod
    async def ask(client: BrokerClient, type: str, body: dict) -> dict:
        return await asyncio.to_thread(client.request, type, body, 10)

    async def run_cell(self, client: BrokerClient, kernel_id: str, request_id: str) -> dict:
        """A cell of STATE bytes on the GPU; returns its grant once the lease is back."""
        grant = await self.ask(client, "acquire", {"request_id": request_id, "memory": STATE})
        client.send("release", {"request_id": request_id, "peak_bytes": STATE, "gpu_bytes": STATE})
        await _until(lambda: self.service.kernel(kernel_id)["state"] == "resident")
        return grant


@contextlib.asynccontextmanager
async def fake_driver_pool(
    fake: Fake, tmp_path: Path, policy: Policy, **settings: Any
) -> AsyncIterator[Pool]:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    service = BrokerService(
        TwoGpusOfOneChip(),
        ledger,
        Quotas({}),
        policy,
        log=logging.getLogger("test"),
        spill_dir=tmp_path / "spill",
        driver=_checkpointer(fake),
        **settings,
    )
    await service.start()
    pool = Pool(service)
    try:
        yield pool
    finally:
        for client in pool.clients:
            client.close()
        await service.stop()
        ledger.close()


@needs_cc
async def test_service_checkpoints_the_context_after_the_tensors_and_restores_it_first(
    fake: Fake, tmp_path: Path
) -> None:
    spills: list[dict] = []

    def spill(body: dict) -> dict:
        """Told its process is frozen, the kernel keeps its 8 GiB pinned pool, spills the rest."""
        spills.append(body)
        return {"host_bytes": 8 * GiB, "disk_bytes": 4 * GiB}

    policy = Policy(host_memory_limit=13 * GiB, pinned_per_kernel=8 * GiB, pinned_total=10 * GiB)
    async with fake_driver_pool(fake, tmp_path, policy) as pool:
        service, ask = pool.service, pool.ask
        one, two = await pool.kernel("k1", spill=spill), await pool.kernel("k2", spill=spill)
        grant = await pool.run_cell(one, "k1", "r1")
        assert grant["device"]["uuid"] == GPU_A
        assert grant["pool_allowance"] == 8 * GiB  # the pinned pool it may keep: its own bound
        # Offloaded: the tensor tier first, then the driver takes the context; 0 bytes left.
        # The driver keeps the context in host memory: it counts with the kernel's host copy.
        service.offload("k1")
        record = await _until(lambda: (r := service.kernel("k1"))["state"] == "offloaded" and r)
        assert record["gpu_bytes"] == 0 and record["device"] is None, record
        assert record["host_bytes"] == 12 * GiB + (600 << 20)
        assert service.core.host_held == 12 * GiB + (600 << 20)
        assert record["context"]["checkpointed"] is True, record["context"]
        assert fake.calls() == ["lock", "checkpoint"] and fake.state == 2
        # Over the user's host quota: the frozen process is asked to spill without CUDA calls,
        # once; the driver's copy stays in memory with the pinned pool it keeps.
        service.set_quotas(Quotas.parse({"default": {"host_memory": "10GiB"}}))
        await _until(lambda: spills)
        assert spills[0]["cuda_frozen"] is True
        record = await _until(lambda: (r := service.kernel("k1"))["disk_bytes"] and r)
        assert record["host_bytes"] == 8 * GiB + (600 << 20)

        # GPU A is taken; kernel 1's next cell migrates to GPU B: the driver restores its
        # context there (UUID remap) before the cell hears its grant.
        grant = await ask(
            two, "acquire", {"request_id": "r2", "memory": 16 * GiB, "bound_uuid": GPU_A}
        )
        assert grant["pool_allowance"] == 2 * GiB  # what kernel 1 left of the pinned total
        grant = await ask(one, "acquire", {"request_id": "r3"})
        assert (grant["device"]["uuid"], grant["restore"], grant["pool_allowance"]) == (
            GPU_B,
            True,
            8 * GiB,
        )
        assert fake.calls()[-2:] == ["restore", "unlock"] and fake.state == 0
        one.send("restored", {"gpu_bytes": 12 * GiB})  # its tensors, back by the tensor tier
        await _until(lambda: service.kernel("k1")["state"] == "running")
        a, b = (bytes(gpu_uuid_to_cuuuid(u).bytes) for u in (GPU_A, GPU_B))
        assert fake.pairs() == [(a, b)]
        assert service.kernel("k1")["context"]["checkpointed"] is False
        assert len(spills) == 1  # a partial spill is not asked again before the kernel ran

        # Shutting down: a kernel the driver holds checkpointed must be ended at once.
        one.send("release", {"request_id": "r3", "peak_bytes": 12 * GiB, "gpu_bytes": 12 * GiB})
        await _until(lambda: service.kernel("k1")["state"] == "resident")
        service.set_quotas(Quotas.parse({}))  # room for the driver's copy again
        service.offload("k1")
        await _until(lambda: service.kernel("k1")["context"]["checkpointed"])
        assert service.kernel_stopping("k1", "shut down") is True
        assert service.kernel_stopping("k2", "shut down") is False


@needs_cc
async def test_a_swap_brings_a_checkpointed_kernel_back_first_and_gives_it_room_meanwhile(
    fake: Fake, tmp_path: Path
) -> None:
    """A kernel whose process the driver tier holds checkpointed restores early in a swap too:
    the driver brings the process back onto its GPU first (its context booked there), then the
    kernel gets the room no booking holds, and what the victim frees as it offloads."""
    rooms: list[dict] = []
    let_go = threading.Event()

    def victim_offload(body: dict) -> dict:
        assert body["room"] is True  # paired with the checkpointed kernel's swap
        let_go.wait(10)
        victim.send("freed", {"bytes": STATE})
        return {"host_bytes": STATE, "gpu_bytes": CONTEXT}

    policy = Policy(host_memory_limit=64 * GiB, migration=False)  # both stay on GPU A
    async with fake_driver_pool(fake, tmp_path, policy) as pool:
        service, ask = pool.service, pool.ask
        incoming = await pool.kernel("k1", room=lambda body: rooms.append(body) or None)
        await pool.run_cell(incoming, "k1", "r1")
        service.offload("k1")
        await _until(lambda: service.kernel("k1")["context"]["checkpointed"])
        assert fake.calls() == ["lock", "checkpoint"]
        victim = await pool.kernel("k2", offload=victim_offload)
        await ask(victim, "acquire", {"request_id": "r1", "memory": STATE, "bound_uuid": GPU_A})
        victim.send("release", {"request_id": "r1", "peak_bytes": STATE, "gpu_bytes": STATE})
        await _until(lambda: service.kernel("k2")["state"] == "resident")

        cell = asyncio.ensure_future(ask(incoming, "acquire", {"request_id": "r2"}))
        # 16 GiB, 12 booked by the victim: the context comes back out of the 4 GiB free, and
        # the rest of that room goes to the kernel while the victim has freed nothing yet.
        await _until(lambda: rooms == [{"bytes": 4 * GiB - CONTEXT}])
        assert fake.calls()[-2:] == ["restore", "unlock"]
        record = service.kernel("k1")
        assert record["context"]["checkpointed"] is False, record["context"]
        assert (record["device"], record["gpu_bytes"]) == (0, CONTEXT), record
        let_go.set()
        await _until(lambda: rooms[-1] == {"bytes": STATE})
        grant = await cell
        assert grant["granted"] and grant["restore"] and grant["device"]["uuid"] == GPU_A
        assert fake.calls().count("restore") == 1  # not again at the grant
        incoming.send("restored", {"gpu_bytes": STATE})
        await _until(lambda: service.kernel("k1")["state"] == "running")


@dataclasses.dataclass
class Waking:
    """Kernel k1 checkpointed off GPU A, k2 resident there with STATE: k1's next request evicts
    k2, whose offload waits for ``let_go``, and the driver brings k1 back for the swap, its
    restore begun (``restoring``) and held until ``restore_may_end``."""

    incoming: BrokerClient
    let_go: threading.Event = dataclasses.field(default_factory=threading.Event)
    restoring: threading.Event = dataclasses.field(default_factory=threading.Event)
    restore_may_end: threading.Event = dataclasses.field(default_factory=threading.Event)


async def _waking(pool: Pool, monkeypatch: pytest.MonkeyPatch, **handlers: Any) -> Waking:
    service = pool.service
    waking = Waking(await pool.kernel("k1", **handlers))
    await pool.run_cell(waking.incoming, "k1", "r1")
    service.offload("k1")
    await _until(lambda: service.kernel("k1")["context"]["checkpointed"])

    def victim_offload(body: dict) -> dict:
        waking.let_go.wait(10)
        return {"host_bytes": STATE, "gpu_bytes": 0}  # (the fake knows one process: k1's)

    victim = await pool.kernel("k2", offload=victim_offload)
    await pool.ask(victim, "acquire", {"request_id": "r1", "memory": STATE, "bound_uuid": GPU_A})
    victim.send("release", {"request_id": "r1", "peak_bytes": STATE, "gpu_bytes": STATE})
    await _until(lambda: service.kernel("k2")["state"] == "resident")
    driver_restore = service._driver.restore

    def held_restore(pid: int, pairs: Any = ()) -> float:
        waking.restoring.set()
        waking.restore_may_end.wait(10)
        return driver_restore(pid, pairs)

    monkeypatch.setattr(service._driver, "restore", held_restore)
    return waking


@needs_cc
async def test_a_kernel_whose_request_ends_while_a_swap_wakes_it_goes_back_to_the_driver(
    fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver brings a checkpointed kernel back for a swap, and its request ends meanwhile
    (the cell was interrupted): the driver takes the process back, as it was before the swap,
    rather than leave its context on the GPU with no booking; its next grant restores it."""
    rooms: list[dict] = []
    policy = Policy(host_memory_limit=64 * GiB, migration=False)
    async with fake_driver_pool(fake, tmp_path, policy) as pool:
        service, ask = pool.service, pool.ask
        waking = await _waking(pool, monkeypatch, room=lambda body: rooms.append(body) or None)
        incoming = waking.incoming
        cell = asyncio.ensure_future(ask(incoming, "acquire", {"request_id": "r2"}))
        await _until(waking.restoring.is_set)
        incoming.send("cancel", {"request_id": "r2"})
        assert (await cell)["granted"] is False
        waking.let_go.set()
        await _until(lambda: service.kernel("k2")["state"] == "offloaded")
        waking.restore_may_end.set()
        await _until(lambda: fake.calls()[-4:] == ["restore", "unlock", "lock", "checkpoint"])
        record = await _until(lambda: (r := service.kernel("k1"))["context"]["checkpointed"] and r)
        assert (record["state"], record["device"], record["gpu_bytes"]) == ("offloaded", None, 0)
        assert record["host_bytes"] == STATE + CONTEXT  # the driver's copy, beside the tensors'
        assert rooms == []  # no room while the process was not the kernel's to use
        grant = await ask(incoming, "acquire", {"request_id": "r3"})
        assert grant["granted"] and grant["restore"] and fake.calls()[-2:] == ["restore", "unlock"]


@needs_cc
async def test_a_kernel_placed_on_another_gpu_while_a_swap_wakes_it_migrates_there(
    fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver brings a checkpointed kernel back onto GPU A for a swap, and meanwhile GPU B
    frees up and its request is granted there: the driver takes the process back once it is
    done, and the grant then brings it onto B (a UUID remap), not leaving it on A."""
    async with fake_driver_pool(fake, tmp_path, Policy(host_memory_limit=64 * GiB)) as pool:
        service, ask = pool.service, pool.ask
        waking = await _waking(pool, monkeypatch)
        busy = await pool.kernel("k3")  # runs a cell on B: the incoming kernel claims A
        await ask(busy, "acquire", {"request_id": "r1", "memory": STATE, "bound_uuid": GPU_B})
        cell = asyncio.ensure_future(ask(waking.incoming, "acquire", {"request_id": "r2"}))
        await _until(waking.restoring.is_set)  # onto A
        assert not fake.pairs()
        service.unregister_kernel("k3")  # B is free: the request is granted there at once
        await _until(lambda: (service.kernel("k1")["lease"] or {}).get("device") == 1)
        waking.restore_may_end.set()
        grant = await cell
        assert grant["granted"] and grant["device"]["uuid"] == GPU_B
        assert fake.calls()[-6:] == ["restore", "unlock", "lock", "checkpoint", "restore", "unlock"]
        a, b = (bytes(gpu_uuid_to_cuuuid(u).bytes) for u in (GPU_A, GPU_B))
        assert fake.pairs() == [(a, b)]
        waking.let_go.set()


@needs_cc
async def test_a_grant_over_a_context_a_swap_is_waking_waits_until_the_driver_took_it_back(
    fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver brings a checkpointed kernel back for a swap, into room no booking holds; a
    request of a user with no GPU time today overtakes it, and is granted too much of the GPU
    for that context beside it. That grant is told only once the driver has taken the context
    back off the GPU: the device never holds both."""
    policy = Policy(host_memory_limit=64 * GiB, migration=False, fair_share_rate=1e9)
    async with fake_driver_pool(fake, tmp_path, policy) as pool:
        service, ask = pool.service, pool.ask
        waking = await _waking(pool, monkeypatch)
        other = await pool.kernel("q", Identity("quinn", (), uid=os.getuid()))
        incoming_cell = asyncio.ensure_future(ask(waking.incoming, "acquire", {"request_id": "r2"}))
        await _until(waking.restoring.is_set)  # out of the 4 GiB free
        big = {"request_id": "r1", "memory": 16 * GiB - CONTEXT // 2, "bound_uuid": GPU_A}
        other_cell = asyncio.ensure_future(ask(other, "acquire", big))
        await _until(lambda: service.kernel("q")["state"] == "queued")
        waking.let_go.set()  # the victim is off the GPU: quinn goes first
        await _until(lambda: (service.kernel("q")["lease"] or {}).get("device") == 0)
        await asyncio.sleep(0.3)
        assert not other_cell.done()  # granted in the core, not told while the context lands
        waking.restore_may_end.set()
        assert (await other_cell)["granted"]
        assert fake.calls()[-4:] == ["restore", "unlock", "lock", "checkpoint"]
        assert service.kernel("k1")["context"]["checkpointed"] is True
        other.send("release", {"request_id": "r1", "peak_bytes": GiB, "gpu_bytes": GiB})
        assert (await incoming_cell)["granted"]
        assert fake.calls()[-2:] == ["restore", "unlock"]


@needs_cc
async def test_a_kernel_brought_back_for_a_swap_and_not_granted_goes_back_to_the_driver(
    fake: Fake, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver brought a checkpointed kernel back for a swap (its context booked on the GPU)
    and its cell then stops waiting: once it gave back the room it restored into, the driver
    takes its process back, rather than leave its context on the GPU until its next cell."""
    rooms: list[dict] = []
    policy = Policy(host_memory_limit=64 * GiB, migration=False)
    async with fake_driver_pool(fake, tmp_path, policy) as pool:
        service, ask = pool.service, pool.ask
        waking = await _waking(pool, monkeypatch, room=lambda body: rooms.append(body) or None)
        waking.restore_may_end.set()  # (the driver brings it back at once)
        incoming = waking.incoming
        cell = asyncio.ensure_future(ask(incoming, "acquire", {"request_id": "r2"}))
        await _until(lambda: rooms == [{"bytes": 4 * GiB - CONTEXT}])
        record = service.kernel("k1")
        assert (record["device"], record["gpu_bytes"], record["host_bytes"]) == (0, CONTEXT, STATE)
        incoming.send("cancel", {"request_id": "r2"})
        assert (await cell)["granted"] is False
        await asyncio.sleep(0.2)
        assert fake.calls()[-2:] == ["restore", "unlock"]  # its early restore may still be on
        incoming.send("room_returned", {})  # undone
        await _until(lambda: fake.calls()[-2:] == ["lock", "checkpoint"])
        record = await _until(lambda: (r := service.kernel("k1"))["device"] is None and r)
        assert record["context"]["checkpointed"] is True
        assert (record["gpu_bytes"], record["booked_bytes"]) == (0, 0)
        assert record["host_bytes"] == STATE + CONTEXT
        waking.let_go.set()
        grant = await ask(incoming, "acquire", {"request_id": "r3"})
        assert grant["granted"] and grant["restore"] and fake.calls()[-2:] == ["restore", "unlock"]


@needs_cc
async def test_state_the_tensor_tier_refuses_goes_whole_with_the_driver_tier(
    fake: Fake, tmp_path: Path
) -> None:
    """CUDA graphs or memory torch does not own: the tensor tier moves nothing, and the driver
    tier takes the whole process instead (its device addresses kept). Where it cannot, the
    kernel stays resident, and its record says both reasons."""
    graphs = "1 live CUDA graph(s): they replay fixed device addresses"
    refused = {"host_bytes": 0, "disk_bytes": 0, "gpu_bytes": STATE, "tensor_refused": graphs}
    async with fake_driver_pool(fake, tmp_path, Policy(host_memory_limit=64 * GiB)) as pool:
        service = pool.service
        client = await pool.kernel("k1", offload=lambda body: refused)
        await pool.run_cell(client, "k1", "r1")
        service.offload("k1")
        record = await _until(lambda: (r := service.kernel("k1"))["state"] == "offloaded" and r)
        assert (record["gpu_bytes"], record["host_bytes"], record["device"]) == (0, STATE, None)
        assert record["context"]["checkpointed"] is True and fake.calls() == ["lock", "checkpoint"]
        grant = await pool.ask(client, "acquire", {"request_id": "r2"})
        assert grant["restore"] is True and fake.calls()[-2:] == ["restore", "unlock"]
        client.send("restored", {"gpu_bytes": STATE})
        client.send("release", {"request_id": "r2", "peak_bytes": STATE, "gpu_bytes": STATE})
        await _until(lambda: service.kernel("k1")["state"] == "resident")
        fake.set(checkpoint_rc=801)  # this time the driver cannot (the process runs on)
        service.offload("k1")
        record = await _until(lambda: (r := service.kernel("k1"))["offload_refused"] and r)
        assert record["state"] == "resident" and record["gpu_bytes"] == STATE
        assert record["offload_refused"].startswith(
            f"{graphs}; the driver tier could not move the whole process instead: "
            "cuCheckpointProcessCheckpoint"
        ), record["offload_refused"]


def _states(service: BrokerService, kernel_id: str) -> list[str]:
    """The states a kernel's history went through, oldest first."""
    return [e["new_state"] for e in reversed(service.kernel(kernel_id)["events"])]


@needs_cc
async def test_a_failed_checkpoint_that_leaves_the_process_running_keeps_the_context(
    fake: Fake, tmp_path: Path
) -> None:
    async with fake_driver_pool(fake, tmp_path, Policy(host_memory_limit=64 * GiB)) as pool:
        client = await pool.kernel("k1")
        await pool.run_cell(client, "k1", "r1")
        fake.set(checkpoint_rc=801)  # not supported; the process is unlocked again
        pool.service.offload("k1")
        record = await _until(
            lambda: (r := pool.service.kernel("k1"))["state"] == "offloaded" and r
        )
        assert (record["gpu_bytes"], record["host_bytes"], record["device"]) == (CONTEXT, STATE, 0)
        assert record["context"]["checkpointed"] is False
        assert record["context"]["note"].endswith("runs on and keeps its GPU state")
        assert fake.state == 0
        assert pool.service.core.host_held == STATE  # no room held for a copy the driver lacks
        grant = await pool.ask(client, "acquire", {"request_id": "r2"})
        assert grant["granted"] is True


@needs_cc
@pytest.mark.parametrize(
    ("settings", "left"),
    [
        (dict(checkpoint_rc=801, error_state=3), "failed"),
        (dict(checkpoint_rc=801, unlock_rc=909), "locked"),
        (dict(checkpoint_rc=801, state_rc=1), "unknown"),
    ],
    ids=["failed", "still-locked", "state-unknown"],
)
async def test_a_failed_checkpoint_that_leaves_the_process_unusable_is_reported_not_offloaded(
    fake: Fake, tmp_path: Path, settings: dict, left: str
) -> None:
    async with fake_driver_pool(fake, tmp_path, Policy(host_memory_limit=64 * GiB)) as pool:
        service = pool.service
        client = await pool.kernel("k1")
        await pool.run_cell(client, "k1", "r1")
        fake.set(**settings)
        service.offload("k1")
        record = await _until(lambda: (r := service.kernel("k1"))["state"] == "error" and r)
        assert "offloaded" not in _states(service, "k1")
        why = record["events"][0]["reason"]
        assert why.startswith(
            f"the CUDA driver left this kernel's process '{left}' after a failed checkpoint, "
            "so its GPU state cannot come back: restart the kernel"
        )
        # It keeps what it holds where it is: its context booked on the GPU, its host copy.
        assert (record["device"], record["gpu_bytes"], record["host_bytes"]) == (0, CONTEXT, STATE)
        # Its user is told why at the next GPU cell, which does not run.
        denied = await pool.ask(client, "acquire", {"request_id": "r2"})
        assert (denied["granted"], denied["reason"]) == (False, why)


@needs_cc
async def test_without_host_room_for_the_drivers_copy_the_context_stays_on_the_gpu(
    fake: Fake, tmp_path: Path
) -> None:
    """host_memory_limit holds at all times: the driver's copy of the context is host memory."""
    policy = Policy(host_memory_limit=STATE + (100 << 20))
    async with fake_driver_pool(fake, tmp_path, policy) as pool:
        client = await pool.kernel("k1")
        await pool.run_cell(client, "k1", "r1")
        pool.service.offload("k1")
        record = await _until(
            lambda: (r := pool.service.kernel("k1"))["state"] == "offloaded" and r
        )
        assert fake.calls() == []
        assert (record["gpu_bytes"], record["host_bytes"]) == (CONTEXT, STATE)
        assert record["context"]["note"].startswith(
            "host memory has no room for the driver's copy of the CUDA context (600.0 MiB)"
        )
        assert pool.service.core.host_held == STATE


@needs_cc
@pytest.mark.parametrize("settings", [dict(checkpoint_rc=801, error_state=3), dict()])
async def test_a_stalled_lease_holder_left_unusable_by_its_checkpoint_is_reported(
    fake: Fake, tmp_path: Path, settings: dict
) -> None:
    """The watchdog checkpoints stalled lease holders: the same rule for a failed checkpoint."""
    policy = Policy(host_memory_limit=64 * GiB)
    async with fake_driver_pool(fake, tmp_path, policy, ping_interval=3600.0) as pool:
        service = pool.service
        client = await pool.kernel("k1")
        grant = await pool.ask(client, "acquire", {"request_id": "r1", "memory": STATE})
        assert grant["granted"] is True
        service._connections["k1"].stalled_since = service.clock() - 2 * service.lease_stall_timeout
        fake.set(**settings)
        service._check_stalled_leases()
        if not settings:  # the checkpoint worked: the lease is revoked, the state kept
            record = await _until(lambda: (r := service.kernel("k1"))["state"] == "offloaded" and r)
            assert record["context"]["checkpointed"] is True and fake.state == 2
            assert service.core.host_held == STATE  # room for the driver's copy of it
            return
        record = await _until(lambda: (r := service.kernel("k1"))["state"] == "error" and r)
        assert "'failed' after a failed checkpoint" in record["events"][0]["reason"]
        assert record["lease"] is None
        assert 0 in service.core.unavailable  # what it may still write stays its own
        assert service.core.host_held == 0  # no room kept for a copy the driver never took
        denied = await pool.ask(client, "acquire", {"request_id": "r2"})
        assert denied["granted"] is False and "restart the kernel" in denied["reason"]


# --- which process: the kernel's own, verified with the OS ------------------------------------


@pytest.fixture
def wrapper() -> Iterator[subprocess.Popen]:
    """A live process that is not the kernel: what a provisioner sees when it starts the kernel
    through a wrapper (conda run, a shell script)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


@needs_cc
async def test_the_driver_tier_and_nvml_use_the_kernels_own_pid_not_the_launched_one(
    fake: Fake, tmp_path: Path, wrapper: subprocess.Popen
) -> None:
    """The provisioner's pid may reach the broker after the kernel's hello: it must not replace
    the kernel's own, which the OS confirmed."""
    async with fake_driver_pool(fake, tmp_path, Policy(host_memory_limit=64 * GiB)) as pool:
        service = pool.service
        service.inventory.held = {os.getpid(): 5 * GiB, wrapper.pid: 7 * GiB}
        client = await pool.kernel("k1")  # says hello from this process, the fake's one
        service.kernel_started("k1", wrapper.pid)
        await pool.run_cell(client, "k1", "r1")
        kernel = next(k for k in service.pool()["kernels"] if k["kernel_id"] == "k1")
        assert kernel["process_gpu_bytes"] == 5 * GiB  # NVML asked about the kernel itself
        service.offload("k1")
        record = await _until(lambda: (r := service.kernel("k1"))["state"] == "offloaded" and r)
        assert record["context"]["checkpointed"] is True, record["context"]
        # The wrapper's end is not the kernel's: the kernel's own pid is the one watched.
        wrapper.kill()
        wrapper.wait()
        service._reap_dead_processes()
        assert "k1" in service.core.kernels


def _nspid(pid: int) -> list[int]:
    """The pids of a process, outermost namespace first, as /proc/<pid>/status lists them."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(part) for part in line.split()[1:]]
    raise AssertionError("no NSpid line")


def _in_own_pid_namespace(code: str) -> subprocess.Popen[str]:
    """``python -c code`` as pid 1 of a new pid namespace, under ``unshare``."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a pid namespace here: {probe.stderr.decode().strip()}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        ["unshare", "--pid", "--fork", sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_a_kernel_in_its_own_pid_namespace_is_found_by_its_nspid() -> None:
    """Without peer credentials, the kernel's claim (pid 1 there) is looked for below the
    process the provisioner started, by the pid each one has in its own namespace."""
    inner = _in_own_pid_namespace(
        "import os, sys; print(os.getpid(), flush=True); sys.stdin.read()"
    )
    try:
        assert inner.stdout is not None
        assert inner.stdout.readline().strip() == "1"
        found = kernel_pid(1, None, inner.pid)
        assert found is not None and found != inner.pid  # unshare's child, the kernel itself
        assert _nspid(found) == [found, 1]
        # Told by the OS which process speaks, its own view of its pid must be the claim.
        assert kernel_pid(1, found, None) == found
        with pytest.raises(ValueError, match=rf"is pid {os.getpid()} in its own namespace, not 1"):
            kernel_pid(1, os.getpid(), None)
        assert kernel_pid(2, None, inner.pid) is None  # no such process below the launched one
        assert kernel_pid(1, None, None) is None  # nothing to look below: not confirmed
    finally:
        inner.kill()
        inner.wait()


async def test_the_broker_keeps_the_pid_of_a_kernel_in_its_own_pid_namespace(
    tmp_path: Path,
) -> None:
    """Through the kernel channel: the OS gives the broker the kernel's pid as the broker sees it
    (not the 1 the kernel knows itself by), confirmed by its NSpid."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    service = BrokerService(
        TwoGpusOfOneChip(),
        ledger,
        Quotas({}),
        Policy(),
        log=logging.getLogger("test"),
        driver=DriverCheckpointer(DriverCapability(False, False, None, "not needed here")),
    )
    await service.start()
    env = service.register_kernel("kn", server_owner()).env
    hello = (
        "import os, sys\n"
        "from jupyter_singularity.kernel.client import BrokerClient\n"
        f"c = BrokerClient({env[ENV_BROKER_URL]!r}, 'kn', {env[ENV_KERNEL_KEY]!r}.encode())\n"
        "c.start()\n"
        "c.request('hello', {'pid': os.getpid()}, 10)\n"
        "print(os.getpid(), flush=True)\n"
        "sys.stdin.read()\n"
    )
    inner = _in_own_pid_namespace(hello)
    try:
        assert inner.stdout is not None
        line = await asyncio.to_thread(inner.stdout.readline)
        assert line.strip() == "1"
        pid = service._connections["kn"].pid
        assert pid is not None and pid not in (1, inner.pid)
        assert _nspid(pid) == [pid, 1]
    finally:
        inner.kill()
        inner.wait()
        await service.stop()
        ledger.close()


# --- migration: after the driver moved a kernel, it names its new GPU ---------------------------


def test_after_a_move_the_kernel_and_what_it_starts_name_its_new_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CUDA in the kernel runs on the new GPU once the driver restored it there with a UUID
    remap; CUDA_VISIBLE_DEVICES must say so for its child processes and NVML lookups."""
    from jupyter_singularity.kernel.client import BrokerClient
    from jupyter_singularity.kernel.runtime import Runtime
    from jupyter_singularity.protocol import generate_key

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", GPU_A)
    cuda = SimpleNamespace(is_initialized=lambda: True)  # CUDA started on GPU A long ago
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    client = BrokerClient("tcp://127.0.0.1:9", "k1", generate_key())  # never started: no broker
    runtime = Runtime(client, simulated=False)

    def child_sees() -> str:
        code = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()

    runtime._granted("r1", {"device": {"index": 1, "uuid": GPU_B}, "reservation": GiB})
    assert os.environ["CUDA_VISIBLE_DEVICES"] == GPU_B and child_sees() == GPU_B
    # An explicit restore (no cell) that moved it is heard the same way.
    runtime.lease = None
    runtime.on_restore({"device": {"index": 0, "uuid": GPU_A}})
    assert os.environ["CUDA_VISIBLE_DEVICES"] == GPU_A and child_sees() == GPU_A
