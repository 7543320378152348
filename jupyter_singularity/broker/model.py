"""The pool's state and the actions the decision core returns: plain data, no decisions.

:mod:`.core` decides, :mod:`.placement` finds room for a request; both read and write these records,
and the service carries out the actions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

DAY = 86400.0
MiB = 1 << 20


class KernelState(str, Enum):
    COLD = "cold"
    QUEUED = "queued"
    RESTORING = "restoring"
    RUNNING = "running"
    RESIDENT = "resident"
    OFFLOADING = "offloading"
    OFFLOADED = "offloaded"
    SPILLED = "spilled"
    ERROR = "error"


LEASE_STATES = (KernelState.RUNNING, KernelState.RESTORING)
OFF_DEVICE_STATES = (KernelState.OFFLOADED, KernelState.SPILLED)
SPILLABLE_STATES = (*OFF_DEVICE_STATES, KernelState.QUEUED)
"""States in which a kernel's host copy lies idle, so it can move to disk (queued or not)."""


class BrokerError(Exception):
    """A request the core refuses outright (unknown kernel, wrong state), with a readable reason."""


@dataclass(frozen=True)
class Policy:
    """Tunable knobs of the decisions, all with defaults that suit an interactive machine."""

    idle_timeout: float = 0.0
    """Seconds before an idle resident kernel is offloaded without pressure; 0 = only under pressure."""
    margin_fraction: float = 0.10
    margin_bytes: int = 256 * MiB
    """A known kernel reserves its largest recent peak plus this much, so a slightly larger cell fits."""
    first_cell_memory: int = 0
    """What a kernel's first GPU cell books when it names no size (nothing is known of the kernel
    yet); 0: all of the device that can be made free, so that no first cell runs short of memory
    another kernel's idle state holds."""
    peak_history: int = 5
    migration: bool = True
    """Whether offloaded state may be restored onto another device of the same chip type."""
    fair_share_rate: float = 0.1
    fair_share_cap: float = 300.0
    """A request is queued as if it arrived ``min(cap, rate * GPU-seconds used today / priority)``
    seconds later: heavy users yield to light ones, but never by more than ``cap``, so none starves."""
    host_memory_limit: int = 0
    """Bytes of offloaded state kept in host memory, offloads in flight included: an offload keeps
    only the room left and writes the rest straight to disk. 0 = no limit."""
    lease_keep: float = 0.05
    """Seconds a kernel may keep its lease after a cell for its next one while no other request
    waits (back-to-back cells then skip a round trip each); 0 = a lease ends with its cell."""
    pinned_per_kernel: int = 0
    """Pinned host memory one kernel may keep for its offloads (0: none, offloads use pageable
    memory)."""
    pinned_total: int | None = None
    """Pinned host memory all kernels together may keep (None: only the per-kernel bound). Pinned
    memory cannot be swapped, and kernels keep their pools while resident, so on a busy machine
    the per-kernel bound alone could pin much of the host's memory."""


# ---------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Grant:
    kernel_id: str
    request_id: str
    device: int
    reservation: int
    restore: bool
    start: float
    hold: bool = True
    """False for an explicit restore: the kernel comes back resident, no cell holds a lease."""
    pool_allowance: int = 0
    """Pinned host memory the kernel may keep for its offloads (it never shrinks for a kernel)."""


@dataclass(frozen=True)
class Deny:
    kernel_id: str
    request_id: str
    reason: str


@dataclass(frozen=True)
class Wait:
    kernel_id: str
    request_id: str
    position: int
    reason: str


@dataclass(frozen=True)
class Offload:
    kernel_id: str
    device: int
    reason: str
    host_limit: int | None = None
    """Bytes of its state the kernel may keep in host memory (None: no limit); the rest goes
    straight to its spill directory. Reserved in the host budget until the offload is reported."""


@dataclass(frozen=True)
class LeaseEnded:
    kernel_id: str
    request_id: str
    user: str
    device: int
    end: float
    seconds: float
    peak_bytes: int | None


@dataclass(frozen=True)
class StateChanged:
    kernel_id: str
    user: str
    old: KernelState | None
    new: KernelState | None
    device: int | None
    reason: str
    time: float


@dataclass(frozen=True)
class Forget:
    """The kernel left the pool: release its host copies, spill files, channel and key."""

    kernel_id: str


@dataclass(frozen=True)
class Spill:
    """Move the kernel's host copy to disk: host memory is over its budget."""

    kernel_id: str
    reason: str


Action = Grant | Deny | Wait | Offload | Spill | LeaseEnded | StateChanged | Forget


# ------------------------------------------------------------------------------------------ state


@dataclass
class Lease:
    request_id: str
    device: int
    reservation: int
    start: float
    hold: bool


@dataclass
class Request:
    request_id: str
    kernel_id: str
    memory: int | None
    order: tuple[float, int]
    hold: bool
    claimed: int | None = None
    """The device it waits for, as the last pass that placed it found (it keeps it over
    devices that suit it alike: see ``Placement._ranked_on``)."""
    position: int = 0
    reason: str = ""
    device: int | None = None
    """The one device a cold kernel can use: something in it initialised CUDA already."""


@dataclass
class Kernel:
    kernel_id: str
    user: str
    groups: tuple[str, ...]
    notebook: str
    home: int | None
    last_activity: float
    state: KernelState = KernelState.COLD
    device: int | None = None
    gpu_bytes: int = 0
    host_bytes: int = 0
    disk_bytes: int = 0
    pinned: bool = False
    peaks: list[int] = field(default_factory=list)
    lease: Lease | None = None
    request: Request | None = None
    refused: str = ""
    """Why the kernel refused its last offload; it is not evicted again until its next cell ends."""
    used_gpu: bool = False
    """Whether the kernel ever held a lease: off the device it is then offloaded, not cold."""
    spilling: bool = False
    offload_asked: str = ""
    """Why someone asked to offload the kernel while a cell ran: done when the cell ends."""
    spill_refused: str = ""
    """Why the last spill failed; not retried until the kernel is restored."""
    host_reserved: int = 0
    """Host memory held for the kernel's offload in flight (its Offload's ``host_limit``)."""
    pool_allowance: int = 0
    """Pinned host memory the kernel may keep for its offloads (see Policy.pinned_total)."""
    stalled_since: float | None = None
    """When the kernel last answered the broker, if it stopped answering (stopped or hung)."""

    def booking(self) -> int:
        if self.device is None:
            return 0
        if self.lease is not None:
            return max(self.lease.reservation, self.gpu_bytes)
        return self.gpu_bytes

    def to_dict(self) -> dict:
        return {
            "kernel_id": self.kernel_id,
            "user": self.user,
            "notebook": self.notebook,
            "state": self.state.value,
            "device": self.device,
            "home": self.home,
            "gpu_bytes": self.gpu_bytes,
            "booked_bytes": self.booking(),
            "host_bytes": self.host_bytes,
            "host_reserved": self.host_reserved,
            "disk_bytes": self.disk_bytes,
            "pinned": self.pinned,
            "last_activity": self.last_activity,
            "peak_bytes": max(self.peaks) if self.peaks else None,
            "lease": None
            if self.lease is None
            else {
                "request_id": self.lease.request_id,
                "device": self.lease.device,
                "reservation": self.lease.reservation,
                "start": self.lease.start,
            },
            "offload_refused": self.refused or None,
            "pool_allowance": self.pool_allowance,
            "stalled_since": self.stalled_since,
        }


def _midnight(now: float) -> float:
    """UTC midnight of ``now``'s day, where daily GPU-time quotas reset (as the ledger's
    ``day_start``)."""
    return now - now % DAY


def _seconds_since(start: float, midnight: float, now: float) -> float:
    """The seconds of a lease begun at ``start`` that fall between ``midnight`` and ``now``."""
    return max(0.0, now - max(start, midnight))
