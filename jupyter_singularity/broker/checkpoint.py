"""Driver tier of eviction: the CUDA driver's process checkpoint API, called from outside a kernel.

After the tensor tier has moved a kernel's tensors to host memory, what is left on the GPU (the CUDA
context, cuBLAS workspaces, allocations of other frameworks, ~0.6 GB for torch) can only be freed
by the driver: ``cuCheckpointProcessLock`` + ``cuCheckpointProcessCheckpoint`` save it into host
memory the driver owns and release the GPU entirely, ``cuCheckpointProcessRestore`` +
``cuCheckpointProcessUnlock`` bring it back, optionally onto another GPU of the same chip (UUID
remap, used for migration). The caller needs ``cuInit`` in its own process and ptrace rights over
the kernel (same user, or CAP_SYS_PTRACE). Every call blocks for up to seconds: call from a worker
thread, never from the event loop.

Nothing here needs a GPU to import, and :func:`detect` never raises, so the broker starts on any
machine and says in one log line whether this tier is available.

ABI sources (all structs are 64 bytes on 64-bit Linux, the only platform the API exists on):

* Function semantics, ``CUprocessState`` and ``CUcheckpointLockArgs``: CUDA Driver API reference,
  section "CUDA Checkpointing" (docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__CHECKPOINT.html)
  and NVIDIA/cuda-checkpoint's README ("570 Features": the driver API needs driver >= 570).
* ``CUcheckpointRestoreArgs`` changed with the header generation; see :func:`restore_args_layout`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

CUDA_SUCCESS = 0

# cuDriverGetVersion() values: 1000 * major + 10 * minor.
FIRST_CHECKPOINT_DRIVER = 12080  # CUDA 12.8, driver 570: the cuCheckpointProcess* symbols appear
FIRST_REMAP_DRIVER = 13000  # CUDA 13.0, driver 580: CUcheckpointRestoreArgs gains gpuPairs

_BASE_SYMBOLS = ("cuInit", "cuDriverGetVersion", "cuGetErrorName", "cuGetErrorString")
_CHECKPOINT_SYMBOLS = (
    "cuCheckpointProcessGetState",
    "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",
)

#: States the driver passes through on its own: asked again until they settle.
_TRANSIENT_STATES = ("checkpointing", "restoring")

# CUprocessState. 0-3 are in every header since CUDA 12.8; 4 and 5 (transient) are listed by the
# newer cuda-python bindings (cuda.bindings driver ProcessState), so a newer driver may report them.
_PROCESS_STATES = {
    0: "running",
    1: "locked",
    2: "checkpointed",
    3: "failed",
    4: "checkpointing",
    5: "restoring",
}

# What a failed call usually means for whoever runs the broker; the driver's own text comes first.
_ADMIN_HINTS = {
    "CUDA_ERROR_INVALID_VALUE": "usually the driver does not know this pid as a CUDA process, "
    "or it rejected an argument such as a GPU UUID pair",
    "CUDA_ERROR_NOT_INITIALIZED": "cuInit has not run in the broker process",
    "CUDA_ERROR_NOT_PERMITTED": "the broker may not act on this process: run the broker as the "
    "kernel's user or give it CAP_SYS_PTRACE",
    "CUDA_ERROR_NOT_SUPPORTED": "the driver cannot checkpoint this process (for example it uses "
    "UVM/managed or IPC memory); the kernel keeps its GPU memory",
    "CUDA_ERROR_ILLEGAL_STATE": "the process is not in the state this step needs",
    "CUDA_ERROR_TIMEOUT": "the process could not be locked in time (long-running GPU work); "
    "it keeps running, try again later or with a longer lock timeout",
    "CUDA_ERROR_OUT_OF_MEMORY": "not enough memory to restore the process on the target GPU",
    "CUDA_ERROR_NO_DEVICE": "the driver sees no GPU (check nvidia-smi and the container's devices)",
    "CUDA_ERROR_STUB_LIBRARY": "the libcuda found is the CUDA toolkit's stub, not the driver's",
}

_NVML_GPU_UUID = re.compile(
    r"GPU-([0-9a-f]{8})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{4})-([0-9a-f]{12})", re.IGNORECASE
)

_POINTER = ctypes.sizeof(ctypes.c_void_p)
_UINT = ctypes.sizeof(ctypes.c_uint)


class CUuuid(ctypes.Structure):
    """``CUuuid_st { char bytes[16]; }``: the 16 bytes NVML prints as GPU-xxxxxxxx-...."""

    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class GpuPair(ctypes.Structure):
    """``CUcheckpointGpuPair`` (CUDA 13.0+): restore what ran on ``oldUuid`` onto ``newUuid``."""

    _fields_ = [("oldUuid", CUuuid), ("newUuid", CUuuid)]


class LockArgs(ctypes.Structure):
    """``CUcheckpointLockArgs``, unchanged from CUDA 12.8 to 13.4; timeoutMs 0 waits forever."""

    _fields_ = [
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class CheckpointArgs(ctypes.Structure):
    """``CUcheckpointCheckpointArgs``: ``cuuint64_t reserved[8]`` in CUDA 12.8-13.3.

    CUDA 13.4 names the first 8 bytes ``customStorageInfo_out`` (NULL: checkpoint to host
    memory), so the all-zero struct means the same thing to every driver.
    """

    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class UnlockArgs(ctypes.Structure):
    """``CUcheckpointUnlockArgs``: ``cuuint64_t reserved[8]`` in every header so far."""

    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class RestoreArgsCuda128(ctypes.Structure):
    """``CUcheckpointRestoreArgs`` of the CUDA 12.8 and 12.9 headers: reserved only, no remap.

    Source: cuda.h 12.8 / 12.9 as generated by cudarc (src/driver/sys/mod.rs, features cuda-12080
    and cuda-12090) and NVIDIA/cuda-python PR #2145 ("CUDA 12.9: reserved remains cuuint64_t[8]").
    """

    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class RestoreArgsCuda130(ctypes.Structure):
    """``CUcheckpointRestoreArgs`` of the CUDA 13.0, 13.1 and 13.2 headers.

    ``gpuPairs; gpuPairsCount; char reserved[52 - sizeof(CUcheckpointGpuPair *)];
    cuuint64_t reserved1;``. Source: the Driver API struct reference
    (docs.nvidia.com/cuda/cuda-driver-api/structCUcheckpointRestoreArgs.html), cudarc's bindgen
    output for features cuda-13000/13010/13020, and cuda-python PR #2145 ("CUDA 13.1/13.2").
    """

    _fields_ = [
        ("gpuPairs", ctypes.POINTER(GpuPair)),
        ("gpuPairsCount", ctypes.c_uint),
        ("reserved", ctypes.c_char * (52 - _POINTER)),
        ("reserved1", ctypes.c_uint64),
    ]


class RestoreArgsCuda133(ctypes.Structure):
    """``CUcheckpointRestoreArgs`` of the CUDA 13.3 header.

    ``gpuPairs; gpuPairsCount; char reserved[64 - sizeof(CUcheckpointGpuPair *) -
    sizeof(unsigned int)];``. Source: docs.nvidia.com/cuda/archive/13.3.0/cuda-driver-api/
    structCUcheckpointRestoreArgs.html and cuda-python PR #2145 ("CUDA 13.3").
    """

    _fields_ = [
        ("gpuPairs", ctypes.POINTER(GpuPair)),
        ("gpuPairsCount", ctypes.c_uint),
        ("reserved", ctypes.c_char * (64 - _POINTER - _UINT)),
    ]


class RestoreArgsCuda134(ctypes.Structure):
    """``CUcheckpointRestoreArgs`` of the CUDA 13.4 header (custom storage added).

    ``gpuPairs; gpuPairsCount; unsigned int padding0; CUcheckpointCustomStorageInfo
    **customStorageInfo_out; char reserved[64 - sizeof(CUcheckpointGpuPair*) - 2 * sizeof(unsigned
    int) - sizeof(CUcheckpointCustomStorageInfo**)];``. ``customStorageInfo_out`` stays NULL:
    restore from the driver's host copy. Source: docs.nvidia.com/cuda/developer-preview/13.4/
    cuda-driver-api/cuda_driver_api/structCUcheckpointRestoreArgs.html.
    """

    _fields_ = [
        ("gpuPairs", ctypes.POINTER(GpuPair)),
        ("gpuPairsCount", ctypes.c_uint),
        ("padding0", ctypes.c_uint),
        ("customStorageInfo_out", ctypes.c_void_p),
        ("reserved", ctypes.c_char * (64 - _POINTER - 2 * _UINT - _POINTER)),
    ]


def restore_args_layout(driver_version: int) -> type[ctypes.Structure]:
    """The ``CUcheckpointRestoreArgs`` layout of the header generation matching the driver.

    In every 13.x layout ``gpuPairs`` sits at offset 0 and ``gpuPairsCount`` at 8 and the rest
    must be zero, so a zeroed struct with only those two set reads the same to each of them; the
    layouts differ in what they reserve, which is why a driver is given its own generation's.
    Drivers newer than the newest known header get that newest layout.
    """
    if driver_version < FIRST_REMAP_DRIVER:
        return RestoreArgsCuda128
    if driver_version < 13030:
        return RestoreArgsCuda130
    if driver_version < 13040:
        return RestoreArgsCuda133
    return RestoreArgsCuda134


def gpu_uuid_to_cuuuid(text: str) -> CUuuid:
    """Convert an NVML UUID string ("GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx") to a CUuuid."""
    match = _NVML_GPU_UUID.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"not a GPU UUID: {text!r}; expected NVML's form 'GPU-' + 8-4-4-4-12 hex digits, "
            "as nvidia-smi -L prints it (MIG instance UUIDs cannot be remapped)"
        )
    uuid = CUuuid()
    uuid.bytes[:] = bytes.fromhex("".join(match.groups()))
    return uuid


def _lock_args(timeout_ms: int) -> LockArgs:
    """Lock arguments, refusing a timeout the C field cannot hold."""
    if not 0 <= timeout_ms < 2**32:
        raise ValueError(f"lock timeout must be 0..{2**32 - 1} ms, not {timeout_ms}")
    return LockArgs(timeoutMs=timeout_ms)


def _format_version(driver_version: int) -> str:
    """13000 -> "13.0", as CUDA names its versions."""
    return f"{driver_version // 1000}.{driver_version % 1000 // 10}"


class CheckpointError(Exception):
    """A driver-tier step failed; the message names the call, the CUresult and what it means.

    ``state`` is where a failed checkpoint left the process once the checkpointer tried to bring
    it back (see :meth:`DriverCheckpointer.checkpoint`): "running" when it runs on with its GPU
    state, anything else when it cannot use CUDA; None where nothing was asked of the driver."""

    def __init__(
        self, message: str, *, call: str = "", code: int | None = None, state: str | None = None
    ) -> None:
        super().__init__(message)
        self.call = call
        self.code = code
        self.state = state


class _Libcuda:
    """The loaded driver library; every CUDA call goes through :meth:`_call`."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._lib = library

    def has(self, symbol: str) -> bool:
        """Whether the library exports ``symbol`` (older drivers lack the checkpoint API)."""
        return hasattr(self._lib, symbol)

    def _call(self, name: str, *args: object) -> None:
        """Call ``name``; a CUresult other than CUDA_SUCCESS becomes a readable CheckpointError."""
        result = getattr(self._lib, name)(*args)
        if result == CUDA_SUCCESS:
            return
        error_name = self._error_text("cuGetErrorName", result) or f"CUresult {result}"
        description = self._error_text("cuGetErrorString", result)
        # Every cuCheckpointProcess* call takes the target pid first.
        target = f" for pid {args[0]}" if name.startswith("cuCheckpointProcess") else ""
        message = f"{name}{target} failed with {error_name}"
        if description:
            message += f" ({description})"
        hint = _ADMIN_HINTS.get(error_name)
        if hint:
            message += f": {hint}"
        raise CheckpointError(message, call=name, code=result)

    def _error_text(self, function: str, result: int) -> str:
        """The driver's name or description of ``result``; empty when it has none."""
        text = ctypes.c_char_p()
        if getattr(self._lib, function)(result, ctypes.byref(text)) != CUDA_SUCCESS:
            return ""
        return (text.value or b"").decode(errors="replace")


def _load(library: str | None) -> tuple[ctypes.CDLL | None, str, str]:
    """Open libcuda: the given path, else the driver's soname, else what ldconfig knows as cuda.

    ``libcuda.so.1`` comes first because a bare ``libcuda.so`` may be the toolkit's stub.
    Returns the library, the name that was opened, and on failure why not.
    """
    candidates = [library] if library else ["libcuda.so.1", ctypes.util.find_library("cuda")]
    names = [name for name in dict.fromkeys(candidates) if name]
    first_error = ""
    for name in names:
        try:
            return ctypes.CDLL(name), name, ""
        except OSError as exc:
            if "No such file" in str(exc):
                first_error = first_error or f"no NVIDIA driver ({name} not found)"
            else:
                first_error = first_error or f"no NVIDIA driver ({name} could not be loaded: {exc})"
    return None, "", first_error


@dataclass(frozen=True)
class DriverCapability:
    """Whether this machine's driver can checkpoint kernel processes, and migrate them."""

    available: bool
    migration: bool
    driver_version: int | None
    reason: str
    # The libcuda that detect() opened, so DriverCheckpointer uses the very same library
    # (empty: the driver's soname).
    library: str = ""

    def log_line(self) -> str:
        """One line for the broker's start-up log."""
        if not self.available:
            return (
                f"driver-tier checkpoint unavailable: {self.reason}; offloaded kernels keep "
                "their CUDA context (~0.6 GB) on the GPU"
            )
        version = _format_version(self.driver_version or 0)
        remap = (
            "yes"
            if self.migration
            else f"no, needs driver >= 580 (CUDA {_format_version(FIRST_REMAP_DRIVER)})"
        )
        return f"driver-tier checkpoint available (CUDA driver {version}, UUID remap for migration: {remap})"


def detect(library: str | None = None) -> DriverCapability:
    """Find out, without raising, whether the driver-tier checkpoint can run in this process.

    ``library`` overrides where libcuda is looked for (unusual installs, tests).
    """
    handle, name, why_not = _load(library)
    if handle is None:
        return DriverCapability(False, False, None, why_not)
    lib = _Libcuda(handle)
    missing = [symbol for symbol in _BASE_SYMBOLS if not lib.has(symbol)]
    if missing:
        reason = f"{name} is not a CUDA driver library (lacks {', '.join(missing)})"
        return DriverCapability(False, False, None, reason, name)
    version = ctypes.c_int()
    try:
        lib._call("cuDriverGetVersion", ctypes.byref(version))
    except CheckpointError as exc:
        return DriverCapability(False, False, None, str(exc), name)
    driver_version = version.value
    if not all(lib.has(symbol) for symbol in _CHECKPOINT_SYMBOLS):
        reason = (
            f"the driver (CUDA {_format_version(driver_version)}) lacks cuCheckpointProcess* "
            f"(needs driver >= 570, CUDA {_format_version(FIRST_CHECKPOINT_DRIVER)})"
        )
        return DriverCapability(False, False, driver_version, reason, name)
    try:
        lib._call("cuInit", 0)
    except CheckpointError as exc:
        return DriverCapability(False, False, driver_version, str(exc), name)
    return DriverCapability(True, driver_version >= FIRST_REMAP_DRIVER, driver_version, "", name)


class DriverCheckpointer:
    """Checkpoints and restores whole kernel processes through the driver.

    The lifecycle the driver enforces: running -lock-> locked -checkpoint-> checkpointed
    -restore-> locked -unlock-> running. :meth:`checkpoint` and :meth:`restore` each take a
    process across two steps and leave it running (on failure: as it was) where they can.
    """

    def __init__(self, capability: DriverCapability) -> None:
        self.capability = capability
        self._lib: _Libcuda | None = None
        if capability.available:
            try:
                self._lib = _Libcuda(ctypes.CDLL(capability.library or "libcuda.so.1"))
            except OSError as exc:
                raise CheckpointError(f"cannot reopen {capability.library}: {exc}") from exc
            # Restore needs cuInit in the calling process (or persistence mode); idempotent.
            self._lib._call("cuInit", 0)

    def _driver(self, pid: int) -> _Libcuda:
        """The library, once the tier is known to work and ``pid`` names a live process."""
        if self._lib is None:
            raise CheckpointError(f"driver-tier checkpoint unavailable: {self.capability.reason}")
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            # os.kill(0 or negative) would address process groups, never one kernel.
            raise ValueError(f"pid must be a positive integer, not {pid!r}")
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise CheckpointError(f"no process with pid {pid} (has the kernel exited?)") from None
        except PermissionError:
            pass  # another user's process: the driver decides whether CAP_SYS_PTRACE suffices
        return self._lib

    def state(self, pid: int) -> str:
        """The driver's view of ``pid``: "running", "locked", "checkpointed" or "failed"."""
        value = ctypes.c_int()
        self._driver(pid)._call("cuCheckpointProcessGetState", pid, ctypes.byref(value))
        return _PROCESS_STATES.get(value.value, f"unknown ({value.value})")

    def lock(self, pid: int, timeout_ms: int = 10_000) -> None:
        """Block the process's CUDA calls (pausing a running cell's GPU work); 0 waits forever.

        On timeout the driver leaves the process running.
        """
        args = _lock_args(timeout_ms)
        self._driver(pid)._call("cuCheckpointProcessLock", pid, ctypes.byref(args))

    def unlock(self, pid: int) -> None:
        """Let a locked process make CUDA calls again."""
        self._driver(pid)._call("cuCheckpointProcessUnlock", pid, ctypes.byref(UnlockArgs()))

    def checkpoint(self, pid: int, lock_timeout_ms: int = 10_000) -> float:
        """Lock, then move all of the process's GPU state to host memory; returns seconds taken.

        NVIDIA does not promise that a process is left in a good state after an error, so after
        any failure its state is asked and it is brought back where the driver allows
        (:meth:`recover`). The CheckpointError then says where it was left: its ``state`` is
        "running" when it runs on and keeps its GPU state (nothing is lost), anything else when
        its CUDA calls cannot work.
        """
        lock_args = _lock_args(lock_timeout_ms)
        lib = self._driver(pid)
        started = time.perf_counter()
        try:
            lib._call("cuCheckpointProcessLock", pid, ctypes.byref(lock_args))
            lib._call("cuCheckpointProcessCheckpoint", pid, ctypes.byref(CheckpointArgs()))
        except CheckpointError as exc:
            state = self.recover(pid, locked=exc.call != "cuCheckpointProcessLock")
            raise CheckpointError(
                f"{exc}; {_left_in(pid, state)}", call=exc.call, code=exc.code, state=state
            ) from exc
        return time.perf_counter() - started

    def recover(self, pid: int, locked: bool = True, settle_seconds: float = 10.0) -> str:
        """After a failed step: ask the driver where the process is, bring it back to running
        where it can (a locked one unlocked; a checkpointed one restored onto its own GPU and
        unlocked, when this step had locked it), and return the state it is left in: "running",
        or "locked", "checkpointed", "failed" when its CUDA calls cannot work.

        Transient states are waited out for up to ``settle_seconds``. Where the driver cannot
        report the state, ``locked`` (whether the failed step came after a successful lock)
        decides: a process whose lock was refused was not touched ("running"); one that was
        locked is taken as lost ("unknown: ...").
        """
        state = self._settled_state(pid, locked, settle_seconds)
        lib = self._lib
        assert lib is not None  # _driver() of the failed step checked it
        if state == "checkpointed" and locked:  # (before a refused lock it was so already)
            args = restore_args_layout(self.capability.driver_version or 0)()
            with contextlib.suppress(CheckpointError):
                lib._call("cuCheckpointProcessRestore", pid, ctypes.byref(args))
            state = self._settled_state(pid, locked, settle_seconds)
        if state == "locked":
            with contextlib.suppress(CheckpointError):
                lib._call("cuCheckpointProcessUnlock", pid, ctypes.byref(UnlockArgs()))
            state = self._settled_state(pid, locked, settle_seconds)
        return state

    def _settled_state(self, pid: int, locked: bool, settle_seconds: float) -> str:
        """The process's state once out of checkpointing/restoring (see :meth:`recover`)."""
        deadline = time.monotonic() + settle_seconds
        while True:
            try:
                state = self.state(pid)
            except (CheckpointError, ValueError) as exc:
                return f"unknown: {exc}" if locked else "running"
            if state not in _TRANSIENT_STATES or time.monotonic() > deadline:
                return state
            time.sleep(0.05)

    def restore(self, pid: int, gpu_pairs: Sequence[tuple[str, str]] = ()) -> float:
        """Bring a checkpointed process back onto a GPU and unlock it; returns seconds taken.

        ``gpu_pairs`` maps each GPU the process was checkpointed on (NVML UUID) to the GPU to
        restore onto, of the same chip, and must then name every such GPU; empty restores onto
        the same GPUs. Malformed UUIDs raise ValueError before the process is touched.
        """
        pairs = [
            GpuPair(gpu_uuid_to_cuuuid(old), gpu_uuid_to_cuuuid(new)) for old, new in gpu_pairs
        ]
        lib = self._driver(pid)
        driver_version = self.capability.driver_version or 0
        args = restore_args_layout(driver_version)()
        if pairs:
            if not self.capability.migration:
                raise CheckpointError(
                    f"cannot restore pid {pid} onto another GPU: the driver "
                    f"(CUDA {_format_version(driver_version)}) has no GPU UUID remap (needs "
                    f"driver >= 580, CUDA {_format_version(FIRST_REMAP_DRIVER)}); restore it "
                    "onto its own GPU"
                )
            array = (GpuPair * len(pairs))(*pairs)  # alive until the call returns
            args.gpuPairs = ctypes.cast(array, ctypes.POINTER(GpuPair))
            args.gpuPairsCount = len(pairs)
        started = time.perf_counter()
        try:
            lib._call("cuCheckpointProcessRestore", pid, ctypes.byref(args))
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc}{self._state_note(pid)}", call=exc.call, code=exc.code
            ) from exc
        try:
            lib._call("cuCheckpointProcessUnlock", pid, ctypes.byref(UnlockArgs()))
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc}; the GPU state is restored but the kernel's CUDA calls stay blocked "
                "until an unlock succeeds",
                call=exc.call,
                code=exc.code,
            ) from exc
        return time.perf_counter() - started

    def _state_note(self, pid: int) -> str:
        """ "; pid N is now 'x'" for an error message, or nothing when the state is unreadable."""
        try:
            return f"; pid {pid} is now {self.state(pid)!r}"
        except (CheckpointError, ValueError):
            return ""


def _left_in(pid: int, state: str) -> str:
    """What a failed checkpoint means for the kernel, by the state it left the process in."""
    if state == "running":
        return f"pid {pid} runs on and keeps its GPU state"
    return f"pid {pid} is left {state!r}: its CUDA calls cannot work until it is restarted"
