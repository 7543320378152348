"""The jupyter_server extension: configuration, the embedded broker, REST handlers, events.

Configure it as ``c.SingularityApp.<trait>`` in ``jupyter_server_config.py`` or with
``--SingularityApp.<trait>=`` on the command line. A configuration error stops the server at start
with one line naming the setting and the bad value: a GPU pool that silently runs with other
settings than the admin wrote would be worse than no server.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

from jupyter_client.provisioning import KernelProvisionerFactory
from jupyter_core.paths import jupyter_data_dir, jupyter_runtime_dir
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.utils import ApiPath, to_os_path
from traitlets import Bool, Dict, Float, Int, TraitError, Unicode, Union, default
from traitlets.config import Config, DeferredConfig, LazyConfigValue

from ..broker.ledger import Ledger, LedgerError
from ..broker.model import Policy
from ..broker.quotas import QuotaError, Quotas
from ..broker.service import BrokerService
from ..devices import DeviceInventory, default_simulated_spec, open_inventory, usable_memory
from ..units import format_size, parse_size
from .events import register_schemas, schema_id
from .handlers import SETTINGS_KEY, default_handlers
from .quota_file import QuotaFile

PROVISIONER_NAME = "singularity-provisioner"
PROVISIONER_REF = "jupyter_singularity.server.provisioner:SingularityProvisioner"

MIN_HOST_MEMORY_LIMIT = 1 << 20
"""The smallest host_memory_limit: the kernel runtime moves GPU state in storages of 1 MiB and more,
so a smaller budget holds none of it, and since a bare number is bytes, a limit such as 1 or 512 is
a forgotten unit."""


class ConfigError(ValueError):
    """A setting of SingularityApp that cannot be used; the message names it and its value."""


class SingularityApp(ExtensionApp):
    """Pools the machine's GPUs so that the kernels of this server share them in time."""

    name = "jupyter_singularity"
    description = "Share the GPUs of a machine between Jupyter kernels in time."
    load_other_extensions = True

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
        /singularity/api/quotas rewrites it. It must exist and be valid when the server
        starts.""",
    ).tag(config=True)

    host_memory_limit = Union(
        [Unicode(), Int()],
        default_value="0",
        help="""Host memory for GPU state offloaded from kernels (e.g. "64GiB"), at least 1 MiB,
        held to at all times: an offload keeps the room left and writes the rest straight to
        spill_dir. "0" means half of the memory this server may use (the machine's RAM, or its
        container's limit when lower).""",
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
        help="""Directory for offloaded GPU state that exceeds host_memory_limit. Default: a
        singularity-spill folder in the Jupyter runtime directory.""",
    ).tag(config=True)

    db_url = Unicode(
        help="""Database of the usage ledger (every lease and kernel state change), as an
        SQLAlchemy URL. Default: sqlite:///<Jupyter data dir>/singularity.sqlite.""",
    ).tag(config=True)

    broker_url = Unicode(
        "",
        help="""Address of a standalone node broker shared by several servers (JupyterHub).
        Empty: the broker runs inside this server. A standalone broker is not available yet.""",
    ).tag(config=True)

    migration = Bool(
        True,
        help="""Whether an offloaded kernel may be restored onto another GPU of the same chip
        type (otherwise it waits for its own GPU).""",
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

    @default("spill_dir")
    def _default_spill_dir(self) -> str:
        return os.path.join(jupyter_runtime_dir(), "singularity-spill")

    @default("db_url")
    def _default_db_url(self) -> str:
        return "sqlite:///" + os.path.join(jupyter_data_dir(), "singularity.sqlite")

    # Set by initialize_settings.
    service: BrokerService
    inventory: DeviceInventory
    ledger: Ledger
    quota_watcher: QuotaFile | None = None
    host_memory_limit_bytes: int = 0
    _started = False
    _previous_provisioner: str | None = None

    # ------------------------------------------------------------------------ configuration

    @contextlib.contextmanager
    def _stop_on_config_error(self) -> Iterator[None]:
        """A ConfigError stops the server with its one line (the extension manager would log a
        traceback and serve on without the pool, or with half of its settings)."""
        try:
            yield
        except ConfigError as err:
            if self.serverapp is not None and self.serverapp.reraise_server_extension_failures:
                raise
            self.log.critical("jupyter-singularity cannot start: %s", err)
            raise SystemExit(1) from err

    def _link_jupyter_server_extension(self, serverapp: Any) -> None:
        with self._stop_on_config_error():
            super()._link_jupyter_server_extension(serverapp)

    def _load_config(
        self,
        cfg: Config,
        section_names: list[str] | None = None,
        traits: dict[str, Any] | None = None,
    ) -> None:
        """traitlets' loading, after checking each value's type on its own: traitlets stops at the
        first wrong one with some traits set and others not, and the extension manager then went
        on with that half-set app, which failed on another, unrelated setting."""
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
                    f"{type(self).__name__}.{name} = {value!r}: expected {trait.info()}"
                ) from None
        super()._load_config(cfg, section_names, traits)

    def initialize_settings(self) -> None:
        with self._stop_on_config_error():
            self._configure()

    def _configure(self) -> None:
        assert self.serverapp is not None
        if self.broker_url:
            raise ConfigError(
                f"SingularityApp.broker_url = {self.broker_url!r}: a standalone broker is not "
                "available yet; leave broker_url empty"
            )
        if not (math.isfinite(self.idle_timeout) and self.idle_timeout >= 0):
            raise ConfigError(
                f"SingularityApp.idle_timeout = {self.idle_timeout!r}: must be a number of "
                "seconds >= 0 (0 = offload only under memory pressure)"
            )
        for name in ("offload_timeout", "lease_stall_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(
                    f"SingularityApp.{name} = {value!r}: must be a number of seconds > 0"
                )
        self.host_memory_limit_bytes = self._host_memory_limit()
        pinned_limit = self._size_setting("pinned_memory_limit")
        pinned_total = self._size_setting("pinned_memory_total") or self.host_memory_limit_bytes
        quotas = self._initial_quotas()
        self._make_spill_dir()

        # Devices and database are opened only once the other settings passed.
        try:
            self.inventory = open_inventory(self.devices)
        except ValueError as err:
            raise ConfigError(f"SingularityApp.devices = {self.devices!r}: {err}") from None
        try:
            self.ledger = Ledger(self.db_url)
        except LedgerError as err:
            self.inventory.close()
            raise ConfigError(f"SingularityApp.db_url: {err}") from None

        # Fails at start, not at the first kernel, if the provisioner cannot be imported.
        from .provisioner import SingularityProvisioner  # noqa: F401

        register_schemas(self.serverapp.event_logger)
        self.service = BrokerService(
            self.inventory,
            self.ledger,
            quotas,
            Policy(
                idle_timeout=self.idle_timeout,
                migration=self.migration,
                host_memory_limit=self.host_memory_limit_bytes,
                pinned_per_kernel=pinned_limit,
                pinned_total=pinned_total,
            ),
            log=self.log,
            emit=self._emit,
            spill_dir=Path(self.spill_dir),
            offload_timeout=self.offload_timeout,
            lease_stall_timeout=self.lease_stall_timeout,
        )
        self.log.info(self._inventory_line())
        self.settings[SETTINGS_KEY] = self

    def _size_setting(self, name: str) -> int:
        value = getattr(self, name)
        try:
            return parse_size(value)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"SingularityApp.{name} = {value!r}: {err}") from None

    def _host_memory_limit(self) -> int:
        limit = self._size_setting("host_memory_limit")
        if 0 < limit < MIN_HOST_MEMORY_LIMIT:
            raise ConfigError(
                f"SingularityApp.host_memory_limit = {self.host_memory_limit!r}: at least "
                f"{format_size(MIN_HOST_MEMORY_LIMIT)} (the kernels move GPU state in pieces of "
                "1 MiB and more; a bare number is bytes: did you mean a unit, as in '16GiB'?)"
            )
        if limit:
            return limit
        memory = usable_memory()
        if memory is None:
            raise ConfigError(
                "SingularityApp.host_memory_limit = '0': the machine's RAM cannot be read here; "
                "set a size such as '32GiB'"
            )
        return memory // 2

    def _initial_quotas(self) -> Quotas:
        if self.quota_file:
            try:
                self.quota_watcher = QuotaFile(
                    self.quota_file, on_change=self._apply_quotas, log=self.log
                )
            except QuotaError as err:
                raise ConfigError(
                    f"SingularityApp.quota_file = {self.quota_file!r}: {err}"
                ) from None
            if self.quotas:
                self.log.warning(
                    "jupyter-singularity: SingularityApp.quotas is ignored because "
                    "SingularityApp.quota_file is set (%s)",
                    self.quota_watcher.path,
                )
            return self.quota_watcher.quotas
        try:
            return Quotas.parse(self.quotas)
        except QuotaError as err:
            raise ConfigError(f"SingularityApp.quotas: {err}") from None

    def _make_spill_dir(self) -> None:
        try:
            os.makedirs(self.spill_dir, mode=0o700, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                f"SingularityApp.spill_dir = {self.spill_dir!r}: cannot create it ({err.strerror or err})"
            ) from None
        if not os.access(self.spill_dir, os.W_OK | os.X_OK):
            raise ConfigError(f"SingularityApp.spill_dir = {self.spill_dir!r}: not writable")

    def _inventory_line(self) -> str:
        inventory = self.inventory
        devices = inventory.devices()
        if not devices:
            spec, _ = default_simulated_spec(usable_memory())
            return (
                f"jupyter-singularity: no NVIDIA GPU found ({inventory.reason or 'no reason given'});"
                f" the pool is empty. Try simulated devices: jupyter lab --SingularityApp.devices={spec}"
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
        return f"jupyter-singularity: pooling {len(devices)} NVIDIA GPU{'s' if len(devices) != 1 else ''}: {listed}"

    # ------------------------------------------------------------------------------- quotas

    @property
    def quota_source(self) -> str:
        return "config" if self.quota_watcher is None else self.quota_watcher.source

    @property
    def quota_error(self) -> str | None:
        return None if self.quota_watcher is None else self.quota_watcher.error

    async def replace_quotas(self, config: dict[str, Any]) -> None:
        """PUT /quotas: validate, then write the quota file if there is one, else keep in memory.

        Raises QuotaError (invalid, nothing changed) or OSError (the file cannot be written).
        """
        if self.quota_watcher is not None:
            await self.quota_watcher.write(config)
        else:
            self._apply_quotas(Quotas.parse(config))

    def _apply_quotas(self, quotas: Quotas) -> None:
        self.service.set_quotas(quotas)

    # ------------------------------------------------------------------------------ events

    def _emit(self, name: str, data: dict) -> None:
        """The service's emit callback; a bad event is logged, never raised into the broker."""
        assert self.serverapp is not None
        try:
            self.serverapp.event_logger.emit(schema_id=schema_id(name), data=data)
        except Exception:
            self.log.exception("jupyter-singularity: could not emit the %s event %r", name, data)

    @property
    def _contents_schema(self) -> str:
        """jupyter_server's contents event ("rename" with ``path`` and ``source_path``)."""
        assert self.serverapp is not None
        return self.serverapp.contents_manager.event_schema_id

    async def _on_contents_event(self, logger: Any, schema_id: str, data: dict) -> None:
        """A file or folder renamed or moved through the contents API (JupyterLab's file browser,
        a notebook's Rename): its kernels' notebook paths follow."""
        if data.get("action") == "rename" and data.get("source_path"):
            self.notebook_moved(data["source_path"], data["path"])

    def notebook_moved(self, old: str, new: str) -> None:
        """``old`` and ``new`` are API paths. A kernel started for a session records its notebook
        as jupyter_server's JPY_SESSION_NAME: the file's path on disk under the kernel manager's
        root_dir, or the API path itself for a session started without a name; both follow."""
        assert self.serverapp is not None
        root = self.serverapp.kernel_manager.root_dir
        self.service.notebook_renamed(old, new)
        self.service.notebook_renamed(
            to_os_path(ApiPath(old), root), to_os_path(ApiPath(new), root)
        )

    # ---------------------------------------------------------------------------- lifecycle

    def initialize_handlers(self) -> None:
        self.handlers.extend(default_handlers)

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        """Start the broker once the server's event loop runs; then kernels join the pool."""
        from .provisioner import SingularityProvisioner

        if not hasattr(self, "service"):
            return  # loading failed and was logged; kernels start outside the pool
        await self.service.start()
        self._started = True
        serverapp.event_logger.add_listener(
            schema_id=self._contents_schema, modified=False, listener=self._on_contents_event
        )
        if self.quota_watcher is not None:
            self.quota_watcher.start()
        factory = KernelProvisionerFactory.instance(parent=serverapp)
        if PROVISIONER_NAME not in factory.provisioners:
            # Running from a source tree without the package's entry point installed.
            factory.provisioners[PROVISIONER_NAME] = EntryPoint(
                name=PROVISIONER_NAME,
                value=PROVISIONER_REF,
                group=KernelProvisionerFactory.GROUP_NAME,
            )
        previous = factory.default_provisioner_name
        if previous not in ("local-provisioner", PROVISIONER_NAME):
            self.log.warning(
                "jupyter-singularity: the default kernel provisioner %r is replaced by %r, "
                "so that kernels join the GPU pool",
                previous,
                PROVISIONER_NAME,
            )
        self._previous_provisioner = previous
        factory.default_provisioner_name = PROVISIONER_NAME
        SingularityProvisioner.broker = self.service

    async def stop_extension(self) -> None:
        """Empty the pool (recorded in the ledger), stop the broker, release devices and database."""
        from .provisioner import SingularityProvisioner

        if self._previous_provisioner is not None:
            factory = KernelProvisionerFactory.instance()
            if factory.default_provisioner_name == PROVISIONER_NAME:
                factory.default_provisioner_name = self._previous_provisioner
            self._previous_provisioner = None
        if SingularityProvisioner.broker is getattr(self, "service", None):
            SingularityProvisioner.broker = None
        if self.quota_watcher is not None:
            await self.quota_watcher.stop()
        if self._started:
            self._started = False
            assert self.serverapp is not None
            self.serverapp.event_logger.remove_listener(
                schema_id=self._contents_schema, listener=self._on_contents_event
            )
            for kernel in self.service.pool()["kernels"]:
                self.service.unregister_kernel(kernel["kernel_id"], "server stopped")
            await self.service.stop()
        if hasattr(self, "service"):
            self.ledger.close()
            self.inventory.close()
