"""The pool's settings, shared by the server extension (``SingularityApp``, embedded broker) and the
node broker (``SingularityBroker``), and the pool they open: one definition, one validation.

A setting that cannot be used stops the program at start with one line naming it and its value:
a GPU pool that silently runs with other settings than the admin wrote would be worse than none.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from traitlets import Bool, Dict, Float, Int, TraitError, Unicode, Union
from traitlets.config import Config, Configurable, DeferredConfig, LazyConfigValue

from ..devices import DeviceInventory, default_simulated_spec, open_inventory, usable_memory
from ..units import format_size, parse_size
from .frontend import PoolFrontend
from .ledger import Ledger, LedgerError
from .model import Policy
from .quota_file import QuotaFile
from .quota_source import QuotaSource
from .quotas import QuotaError, Quotas
from .service import BrokerService, Emit

MAX_LEASE_KEEP = 0.5
"""The longest lease_keep: a kept lease is for cells run back to back, not for a person's next
cell (a kernel gives back any lease a second old when its cell ends)."""

MIN_HOST_MEMORY_LIMIT = 1 << 20
"""The smallest host_memory_limit: the kernel runtime moves GPU state in storages of 1 MiB and more,
so a smaller budget holds none of it, and since a bare number is bytes, a limit such as 1 or 512 is
a forgotten unit."""


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it and its value."""


@dataclass
class OpenPool:
    """A pool opened from the settings: devices, ledger, quotas, the service and its frontend."""

    inventory: DeviceInventory
    ledger: Ledger
    quotas: QuotaSource
    service: BrokerService
    frontend: PoolFrontend

    def close(self) -> None:
        """Release database and devices (after the service stopped)."""
        self.ledger.close()
        self.inventory.close()


class PoolSettings(Configurable):
    """The pool's settings (a mixin of both applications; see the module docstring)."""

    devices = Unicode(
        "auto",
        help="""Which GPUs form the pool: "auto" finds NVIDIA GPUs through NVML (an empty pool,
        with the reason logged, when there are none); "simulated:NxSIZE" (e.g.
        "simulated:2x16GiB") or "simulated:SIZE,SIZE,..." gives fake devices for machines
        without GPUs.""",
    ).tag(config=True)

    idle_timeout = Float(
        0.0,
        help="""Seconds after which an idle kernel's GPU state is offloaded even when no other
        kernel needs the room; 0 offloads only under memory pressure.""",
    ).tag(config=True)

    lease_keep = Float(
        0.05,
        help="""Seconds a kernel may keep its GPU lease after a cell ends, for its next cell, while
        no other kernel's request waits: cells run back to back (Run All, nbclient, papermill) then
        skip a round trip to the broker each. A waiting request gets kept leases back at once;
        kept time after a kernel's last cell is not charged. At most 0.5; 0 ends every lease
        with its cell.""",
    ).tag(config=True)

    quotas = Dict(
        help="""Quotas keyed "default", "user:NAME" or "group:NAME", each a mapping of resource to
        limit: gpu_memory (size, e.g. "16GiB"), gpu_hours_per_day or gpu_seconds_per_day,
        max_resident_kernels, host_memory (size) and priority (weight > 0). A user's limit is
        their user entry, else the most generous of their groups', else default, else unlimited.
        Ignored when quota_file is set.""",
    ).tag(config=True)

    quota_file = Unicode(
        "",
        help="""A YAML file with the same mapping as `quotas`. When set it replaces `quotas`
        entirely; it is reloaded when it changes (checked every 2 s), an invalid file keeps the
        previous quotas and the error is shown in GET /singularity/api/quotas, and PUT
        /singularity/api/quotas rewrites it. It must exist and be valid at start.""",
    ).tag(config=True)

    host_memory_limit = Union(
        [Unicode(), Int()],
        default_value="0",
        help="""Host memory for GPU state offloaded from kernels (e.g. "64GiB"), at least 1 MiB,
        held to at all times: an offload keeps the room left and writes the rest straight to
        spill_dir. "0" means half of the memory this process may use (the machine's RAM, or its
        container's limit when lower).""",
    ).tag(config=True)

    first_cell_memory = Union(
        [Unicode(), Int()],
        default_value="0",
        help="""GPU memory a kernel's first GPU cell books when it names no size (`%%singularity
        --memory`) and nothing is known of the kernel yet (e.g. "8GiB"). "0" books all of the GPU
        that can be made free: no first cell then runs short of memory that other kernels' idle
        state holds, but each new kernel's first cell has its GPU to itself while it runs. Where
        notebooks are known to stay under a size (a course's), setting it lets new kernels start
        side by side; a first cell that needs more may then run out of GPU memory while others'
        state is resident. Later cells book what the kernel's earlier cells used.""",
    ).tag(config=True)

    pinned_memory_limit = Union(
        [Unicode(), Int()],
        default_value="8GiB",
        help="""Pinned (page-locked) host memory each kernel keeps for its offloads, allocated once
        while it idles and reused: copies from pinned memory run at PCIe speed, and allocating it
        costs about 0.42 s/GiB. State beyond it is offloaded through ordinary memory.""",
    ).tag(config=True)

    pinned_memory_total = Union(
        [Unicode(), Int()],
        default_value="0",
        help="""Pinned host memory all kernels together may keep for their offloads (pinned memory
        cannot be swapped, and kernels keep it while resident); kernels granted the GPU once this
        is given out offload through ordinary memory. "0": host_memory_limit.""",
    ).tag(config=True)

    spill_dir = Unicode(
        help="""Directory for offloaded GPU state that exceeds host_memory_limit.""",
    ).tag(config=True)

    db_url = Unicode(
        help="""Database of the usage ledger (every lease and kernel state change), as an
        SQLAlchemy URL.""",
    ).tag(config=True)

    migration = Bool(
        False,
        help="""Whether an offloaded kernel may be restored onto another GPU of the same chip
        type (otherwise it waits for its own GPU). Off by default until a run on two real GPUs
        has checked it (bench/gpu_check.py runs one on a machine with two or more); on real
        GPUs it also needs the driver's UUID remap (driver >= 580).""",
    ).tag(config=True)

    offload_timeout = Float(
        300.0,
        help="""Seconds a kernel may take to answer a request to offload, spill or restore its GPU
        state before the broker gives up (the kernel then stays where it is, nothing is lost).
        Cells waiting for an unresponsive kernel do not wait this long where another GPU can take
        them: a kernel that misses two heartbeats (5 s apart) counts as stalled at once.""",
    ).tag(config=True)

    lease_stall_timeout = Float(
        120.0,
        help="""Seconds a kernel that holds a GPU lease may stop answering (stopped with SIGSTOP,
        hung) before its lease is revoked: where the CUDA driver's checkpoint API is available its
        process is checkpointed off the GPU, which others may then use, and it comes back when it
        answers again; otherwise its GPU takes no new work until it answers or ends, because it
        may still write to its memory (the reason is logged and shown in the pool view).""",
    ).tag(config=True)

    host_memory_limit_bytes: int = 0
    try_command = "jupyter lab"
    """How the program is started, for the line suggesting simulated devices on a machine without
    GPUs."""

    # ---------------------------------------------------------------------------- validation

    def _load_config(
        self,
        cfg: Config,
        section_names: list[str] | None = None,
        traits: dict[str, Any] | None = None,
    ) -> None:
        """traitlets' loading, after checking each value's type on its own: traitlets stops at the
        first wrong one with some traits set and others not, and the program then went on with
        that half-set configuration, which failed on another, unrelated setting."""
        checked = self.traits(config=True) if traits is None else traits
        for name, value in self._find_my_config(cfg).items():
            if name not in checked:
                continue
            trait = checked[name]
            if isinstance(value, LazyConfigValue):
                value = value.get_value(copy.deepcopy(getattr(self, name)))
            elif isinstance(value, DeferredConfig):  # from the command line or the environment
                value = value.get_value(trait)
            try:
                trait._validate(self, value)
            except TraitError:
                raise ConfigError(
                    f"{self._name(name)} = {value!r}: expected {trait.info()}"
                ) from None
        super()._load_config(cfg, section_names, traits)

    def _name(self, setting: str) -> str:
        return f"{type(self).__name__}.{setting}"

    def open_pool(self, *, log: Any, emit: Emit | None = None, shared: bool = False) -> OpenPool:
        """Check every setting, then open devices, ledger and quotas and make the service.

        ``shared``: the pool serves other users' kernels too (a node broker): its spill folders
        are made for them to write into. Raises ConfigError naming the first bad setting."""
        for name in ("offload_timeout", "lease_stall_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(
                    f"{self._name(name)} = {value!r}: must be a number of seconds > 0"
                )
        self.host_memory_limit_bytes = self._host_memory_limit()
        policy = self.core_policy(self.host_memory_limit_bytes)
        quotas = self.quota_source(log)
        self._make_spill_dir(shared)

        # Devices and database are opened only once the other settings passed.
        try:
            inventory = open_inventory(self.devices)
        except ValueError as err:
            raise ConfigError(f"{self._name('devices')} = {self.devices!r}: {err}") from None
        try:
            ledger = Ledger(self.db_url)
        except LedgerError as err:
            inventory.close()
            raise ConfigError(f"{self._name('db_url')}: {err}") from None
        service = BrokerService(
            inventory,
            ledger,
            quotas.quotas,
            policy,
            log=log,
            emit=emit,
            spill_dir=Path(self.spill_dir),
            offload_timeout=self.offload_timeout,
            lease_stall_timeout=self.lease_stall_timeout,
        )
        quotas.on_change = service.set_quotas
        log.info(inventory_line(inventory, f"{self.try_command} --{self._name('devices')}"))
        return OpenPool(inventory, ledger, quotas, service, PoolFrontend(service, quotas))

    def core_policy(self, host_memory_limit: int) -> Policy:
        """The decision core's policy from these settings, for a host-memory budget of
        ``host_memory_limit`` bytes (this machine's, or the one ``jupyter singularity simulate``
        models). Raises ConfigError naming a bad setting."""
        if not (math.isfinite(self.idle_timeout) and self.idle_timeout >= 0):
            raise ConfigError(
                f"{self._name('idle_timeout')} = {self.idle_timeout!r}: must be a number of "
                "seconds >= 0 (0 = offload only under memory pressure)"
            )
        if not (math.isfinite(self.lease_keep) and 0 <= self.lease_keep <= MAX_LEASE_KEEP):
            raise ConfigError(
                f"{self._name('lease_keep')} = {self.lease_keep!r}: must be a number of seconds "
                f"from 0 to {MAX_LEASE_KEEP:g} (0 = every lease ends with its cell)"
            )
        return Policy(
            idle_timeout=self.idle_timeout,
            lease_keep=self.lease_keep,
            migration=self.migration,
            first_cell_memory=self._size_setting("first_cell_memory"),
            host_memory_limit=host_memory_limit,
            pinned_per_kernel=self._size_setting("pinned_memory_limit"),
            pinned_total=self._size_setting("pinned_memory_total") or host_memory_limit,
        )

    def configured_host_memory_limit(self) -> int:
        """``host_memory_limit`` in bytes as configured (checked); 0 where it is "0", which
        means half of the memory of the machine the pool runs on."""
        limit = self._size_setting("host_memory_limit")
        if 0 < limit < MIN_HOST_MEMORY_LIMIT:
            raise ConfigError(
                f"{self._name('host_memory_limit')} = {self.host_memory_limit!r}: at least "
                f"{format_size(MIN_HOST_MEMORY_LIMIT)} (the kernels move GPU state in pieces of "
                "1 MiB and more; a bare number is bytes: did you mean a unit, as in '16GiB'?)"
            )
        return limit

    def _size_setting(self, name: str) -> int:
        value = getattr(self, name)
        try:
            return parse_size(value)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{self._name(name)} = {value!r}: {err}") from None

    def _host_memory_limit(self) -> int:
        limit = self.configured_host_memory_limit()
        if limit:
            return limit
        memory = usable_memory()
        if memory is None:
            raise ConfigError(
                f"{self._name('host_memory_limit')} = '0': the machine's RAM cannot be read here; "
                "set a size such as '32GiB'"
            )
        return memory // 2

    def quota_source(self, log: Any) -> QuotaSource:
        """The quotas of ``quota_file``, else of ``quotas``; raises ConfigError naming the bad
        one."""
        if self.quota_file:
            try:
                file = QuotaFile(self.quota_file, on_change=lambda quotas: None, log=log)
            except QuotaError as err:
                raise ConfigError(
                    f"{self._name('quota_file')} = {self.quota_file!r}: {err}"
                ) from None
            if self.quotas:
                log.warning(
                    "jupyter-singularity: %s is ignored because %s is set (%s)",
                    self._name("quotas"),
                    self._name("quota_file"),
                    file.path,
                )
            return QuotaSource(file.quotas, file)
        try:
            return QuotaSource(Quotas.parse(self.quotas))
        except QuotaError as err:
            raise ConfigError(f"{self._name('quotas')}: {err}") from None

    def _make_spill_dir(self, shared: bool) -> None:
        # Private to this user; a node broker's is entered by every user's kernels, each writing
        # only in its own folder (made for it, owned by its user).
        mode = 0o711 if shared else 0o700
        try:
            os.makedirs(self.spill_dir, mode=mode, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                f"{self._name('spill_dir')} = {self.spill_dir!r}: cannot create it "
                f"({err.strerror or err})"
            ) from None
        if not os.access(self.spill_dir, os.W_OK | os.X_OK):
            raise ConfigError(f"{self._name('spill_dir')} = {self.spill_dir!r}: not writable")
        if shared:
            os.chmod(self.spill_dir, mode)


def inventory_line(inventory: DeviceInventory, devices_option: str) -> str:
    """One log line at start: which devices form the pool (or why there are none, with the
    ``devices_option`` to try simulated ones)."""
    devices = inventory.devices()
    if not devices:
        spec, _ = default_simulated_spec(usable_memory())
        return (
            f"jupyter-singularity: no NVIDIA GPU found ({inventory.reason or 'no reason given'});"
            f" the pool is empty. Try simulated devices: {devices_option}={spec}"
        )
    if inventory.simulated:
        sizes = [format_size(d.total_bytes) for d in devices]
        if len(sizes) == 1:
            detail = sizes[0]
        elif len(set(sizes)) == 1:
            detail = f"{sizes[0]} each"
        else:
            detail = ", ".join(sizes)
        noun = "device" if len(devices) == 1 else "devices"
        return (
            f"jupyter-singularity: using {len(devices)} simulated {noun} ({detail}); "
            "no real GPU is used"
        )
    listed = "; ".join(f"{d.index}: {d.name} ({format_size(d.total_bytes)})" for d in devices)
    plural = "s" if len(devices) != 1 else ""
    left_out = f" ({inventory.reason})" if inventory.reason else ""
    return f"jupyter-singularity: pooling {len(devices)} NVIDIA GPU{plural}: {listed}{left_out}"
