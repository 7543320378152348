"""A lease kept for the kernel's next cell, while no other kernel waits.

Giving the lease back at the end of every cell and asking for it again at the top of the next
one costs a round trip to the broker and two decisions there per cell: on the development
machine about 1 ms of a trivial cell's 5 (``bench/cell_overhead.py``). Cells that run back to
back (Run All, a notebook run by nbclient or papermill) need not pay it. So when a cell ends the
kernel keeps its lease if

* the grant allowed it (``keep_seconds`` > 0: the broker's ``lease_keep``, 0 when another
  request was waiting),
* the broker has not asked for it back (``lease_wanted``), and
* the lease is younger than :data:`KEEP_AGE`: a run of short cells still asks again, and is
  checked against quotas, at least that often.

The next gated cell that starts within ``keep_seconds`` takes it over without a message. Else
the keeper thread gives it back at the end of that window, with ``idle_seconds``, the time since
the last cell ended, which the broker does not charge: a kept lease is charged from its grant to
the end of its last cell. The broker asks for a kept lease back as soon as another request
waits or an offload is asked for: given back at once when no cell holds it, else when its cell
ends. A cell the gate leaves alone (made only of ``%singularity`` line magics) and a
``%%singularity`` cell, which books its own reservation, give a kept lease back before they run,
so that what they show or ask for sees the kernel idle.

A mixin of :class:`~.runtime.Runtime`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .membership import Membership

if TYPE_CHECKING:
    from .runtime import Lease

log = logging.getLogger(__name__)

#: A lease this old (seconds since its grant) is given back when its cell ends, kept or not.
KEEP_AGE = 1.0


class Keeper:
    """The thread that gives a kept lease back when its window ends.

    :meth:`arm` moves the deadline; it wakes the thread only when no deadline was set, so a run
    of back-to-back cells costs no thread switch per cell (the thread, asleep until an earlier
    deadline, finds the later one when it wakes)."""

    def __init__(self, expire: Callable[[], None]) -> None:
        self._expire = expire
        self._cv = threading.Condition()
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def arm(self, deadline: float) -> None:
        with self._cv:
            unset, self._deadline = self._deadline is None, deadline
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="singularity-keeper", daemon=True
                )
                self._thread.start()
            elif unset:
                self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _run(self) -> None:
        with self._cv:
            while not self._closed:
                if self._deadline is None:
                    self._cv.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cv.wait(left)
                    continue
                self._deadline = None
                self._cv.release()
                try:
                    self._expire()
                except Exception:  # (the next window must still end: the thread goes on)
                    log.exception("jupyter-singularity: giving a kept lease back failed")
                finally:
                    self._cv.acquire()


class KeptLease:
    """Keeping the lease between cells (see the module docstring)."""

    lease: Lease | None
    membership: Membership
    _keeper: Keeper
    _keep_lock: threading.Lock
    release: Callable[[Lease, float], None]

    def _cell_ended(self, lease: Lease) -> None:
        """The cell holding ``lease`` ended: keep the lease for the next cell, or give it back.

        A kept lease is measured (its peak, the bytes on the device) when it is given back, off
        the cell's path: torch's peak counts every cell since the grant; on simulated devices,
        which have no allocator to ask, the bytes left by each cell but the last go unseen."""
        now = time.monotonic()
        if lease.keep > 0 and not lease.wanted and now - lease.granted_at < KEEP_AGE:
            with self._keep_lock:
                if not lease.wanted:  # (asked back meanwhile: given back below)
                    lease.kept_at = now
                    self._keeper.arm(now + lease.keep)
                    return
        self.release(lease, 0.0)

    def _claim_kept(self) -> bool:
        """A gated cell starts: whether the kernel holds a lease it may run under (a kept one
        is now the cell's; one kept from a broker run the kernel has left is given back)."""
        with self._keep_lock:
            lease = self.lease
            if lease is None:
                return False
            if lease.kept_at is None:
                return True
            if lease.generation == self.membership.generation:
                lease.kept_at = None
                return True
            self._give_back_kept(lease)
            return False

    def _hand_back_kept(self) -> None:
        """Give a kept lease back now (a cell that must see the kernel idle is about to run)."""
        with self._keep_lock:
            lease = self.lease
            if lease is not None and lease.kept_at is not None:
                self._give_back_kept(lease)

    def _kept_window_ended(self) -> None:
        """(keeper thread) Give the kept lease back if no cell took it over, nor ended since."""
        with self._keep_lock:
            lease = self.lease
            kept_at = None if lease is None else lease.kept_at
            if (
                lease is not None
                and kept_at is not None
                and time.monotonic() - kept_at >= lease.keep
            ):
                self._give_back_kept(lease)

    def on_lease_wanted(self, body: dict) -> dict | None:
        """(push) The broker wants the lease back: now if kept, else when its cell ends."""
        with self._keep_lock:
            lease = self.lease
            if lease is not None and lease.request_id == body.get("request_id"):
                lease.wanted = True
                if lease.kept_at is not None:
                    self._give_back_kept(lease)
        return None

    def _give_back_kept(self, lease: Lease) -> None:
        assert lease.kept_at is not None
        self.release(lease, max(0.0, time.monotonic() - lease.kept_at))

    def _close_keeper(self) -> None:
        self._hand_back_kept()
        self._keeper.close()
