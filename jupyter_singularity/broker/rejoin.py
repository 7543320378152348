"""Kernels that join a restarted broker again: their reports rebuild the pool's bookings.

A node broker is a system service. When it restarts (a crash, kill -9, an upgrade), the kernels it
served live on with their GPU state: on a GPU, in their own host memory, in their spill files. Their
servers register them again, and each kernel then reports where its state is (:meth:`rejoin`); the
new run books what it reports.

Until the kernels that held GPU memory when the last run ended have rejoined (the ledger says which
ones, and on which GPU: :meth:`expect_rejoins`), their GPUs take no new grant, so that no cell is
given memory a rejoining kernel still holds. That lasts until they rejoin, leave, or the window
given at start closes (a kernel that died with the broker never reports). The registration of a
kernel expected back is recorded on the GPU it held memory on (:meth:`_registered`): should the
broker restart again before the kernel rejoined, the next run expects it too.

A report is a fact, not a request: a kernel that rejoins after the window, onto memory given away
meanwhile, is booked all the same (its GPU holds that state), and idle kernels there are offloaded
until the bookings fit again; no new grant lands on that GPU before.

A cell that was running when the broker went away runs on, under no lease of the new run: its
kernel rejoins *running*, is never asked to make room, and cells that need its memory wait for it
(as for a running lease); its release then ends it like a cell's (its remaining GPU time is not
charged: the new run never granted it).

Which GPUs take new grants at all is decided here too (:meth:`closed_devices`): besides those
waiting for rejoins, the ones the watchdog closed (:meth:`set_device_unavailable`).

A mixin of :class:`~.core.BrokerCore`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

from ..devices import DeviceInfo
from .model import Action, BrokerError, Kernel, KernelState, StateChanged


class Rejoin:
    """Rejoining after a broker restart, and closed GPUs (see the module docstring)."""

    devices: dict[int, DeviceInfo]
    kernels: dict[str, Kernel]
    unavailable: dict[int, str]
    _kernel: Callable[[str], Kernel]
    _move: Callable[[Kernel, int | None], None]
    _set_home: Callable[[Kernel, int | None], None]
    _hold_host: Callable[..., None]
    _set_state: Callable[[Kernel, KernelState, str, float], None]
    _settled_state: Callable[[Kernel], KernelState]
    _relieve_overcommit: Callable[[int | None, float], None]
    _set_footprint: Callable[[Kernel, int | None, int | None, float], None]
    _schedule: Callable[[float], None]
    _drain: Callable[[], list[Action]]
    _actions: list[Action]

    expected: dict[str, int]
    """Kernels of the previous run that held memory on a GPU (id -> GPU), until they rejoin."""
    expected_until: float

    def expect_rejoins(self, held: Mapping[str, int], now: float, until: float) -> list[Action]:
        """The kernels of the broker's previous run that held memory on a GPU when it ended (kernel
        id -> GPU); their GPUs take no new grant until they rejoin or leave, or until ``until``."""
        self.expected = {k: d for k, d in held.items() if d in self.devices}
        self.expected_until = until
        self._schedule(now)
        return self._drain()

    def rejoin(
        self,
        kernel_id: str,
        now: float,
        *,
        device: int | None = None,
        gpu_bytes: int = 0,
        host_bytes: int = 0,
        disk_bytes: int = 0,
        peak_bytes: int | None = None,
        running: bool = False,
    ) -> list[Action]:
        """The kernel, registered again after a broker restart, says where its GPU state is:
        ``gpu_bytes`` on ``device``, the GPU it last ran on (None: never granted one),
        ``host_bytes`` in its memory and ``disk_bytes`` in its spill files (offloaded, it is on
        that GPU only with ``gpu_bytes`` left there, a CUDA context); ``peak_bytes`` is its largest
        recent cell's, ``running`` whether a cell begun under the previous run still runs (it
        holds no lease in this one).

        Only a kernel this run knows nothing of yet (as registered: cold, never granted) is
        rebuilt from its report; for any other, the report changes nothing."""
        kernel = self._kernel(kernel_id)
        if device is not None and device not in self.devices:
            raise BrokerError(f"no device {device} in the pool")
        self._forget_expected(kernel_id)
        fresh = (
            kernel.state == KernelState.COLD
            and not kernel.used_gpu
            and kernel.lease is None
            and kernel.request is None
        )
        if not fresh:
            self._schedule(now)
            return self._drain()
        self._hold_host(kernel, host_bytes)
        kernel.disk_bytes = disk_bytes
        if device is not None:
            self._set_home(kernel, device)
            if gpu_bytes or not (host_bytes or disk_bytes):  # (offloaded: a context may stay)
                self._move(kernel, device)
                kernel.gpu_bytes = gpu_bytes
        kernel.used_gpu = device is not None or bool(host_bytes or disk_bytes)
        if peak_bytes:
            kernel.peaks = [peak_bytes]
        kernel.last_activity = now
        state = self._settled_state(kernel)
        if running and state == KernelState.RESIDENT:
            state = KernelState.RUNNING  # without a lease: see the module docstring
        self._set_state(kernel, state, "rejoined after a broker restart", now)
        self._relieve_overcommit(kernel.device, now)
        self._schedule(now)
        return self._drain()

    def _registered(self, kernel: Kernel, now: float) -> None:
        """The kernel joined the pool, cold. One expected back is recorded on the GPU where it held
        memory (the ledger's last record of a kernel names the GPU a next run waits for): the
        broker may die again before it rejoined, and it still holds that memory."""
        device = self.expected.get(kernel.kernel_id)
        reason = "registered" if device is None else "registered, expected to rejoin"
        self._actions.append(
            StateChanged(kernel.kernel_id, kernel.user, None, KernelState.COLD, device, reason, now)
        )

    def _last_run_cell_ended(
        self, kernel: Kernel, now: float, peak_bytes: int | None, gpu_bytes: int | None
    ) -> list[Action]:
        """The release of a cell begun under the broker's previous run (the kernel rejoined
        running, without a lease here): idle now, with the footprint the cell left."""
        if kernel.lease is not None or kernel.state != KernelState.RUNNING:
            return []
        self._set_footprint(kernel, peak_bytes, gpu_bytes, now)
        self._set_state(kernel, KernelState.RESIDENT, "cell finished", now)
        self._relieve_overcommit(kernel.device, now)
        self._schedule(now)
        return self._drain()

    def set_device_unavailable(self, device: int, reason: str | None, now: float) -> list[Action]:
        """No new grant on ``device`` while ``reason`` holds (a stalled kernel's lease there may
        still write to its memory), or usable again (None). Requests wait, saying why."""
        if device not in self.devices:
            raise BrokerError(f"no device {device} in the pool")
        if reason is None:
            self.unavailable.pop(device, None)
        else:
            self.unavailable[device] = reason
        self._schedule(now)
        return self._drain()

    def closed_devices(self) -> dict[int, str]:
        """Devices that take no new grant now, and why: unavailable ones (see
        :meth:`set_device_unavailable`) and those where kernels are expected to rejoin."""
        if not self.expected:
            return self.unavailable
        closed = dict(self.unavailable)
        for device, count in sorted(Counter(self.expected.values()).items()):
            closed.setdefault(
                device,
                f"waiting for {count} kernel(s) that held memory there to rejoin after a broker "
                "restart",
            )
        return closed

    def _forget_expected(self, kernel_id: str) -> None:
        self.expected.pop(kernel_id, None)

    def _expire_rejoins(self, now: float) -> None:
        """The window closed: kernels still expected are taken for gone with the last run."""
        if self.expected and now >= self.expected_until:
            self.expected.clear()
