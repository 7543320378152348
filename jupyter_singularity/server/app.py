"""The jupyter_server extension: configuration, the pool (embedded or the node's), REST handlers,
events.

Configure it as ``c.SingularityApp.<trait>`` in ``jupyter_server_config.py`` or with
``--SingularityApp.<trait>=`` on the command line. Without ``broker_url`` the broker runs inside the
server with the pool settings below (one user's pool); with it, the server joins the node's broker,
which owns the GPUs, quotas, ledger and spill directory of the machine. A configuration error stops
the server at start with one line naming the setting and the bad value.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from typing import Any

from jupyter_client.provisioning import KernelProvisionerFactory
from jupyter_core.paths import jupyter_data_dir, jupyter_runtime_dir
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.utils import ApiPath, to_os_path
from traitlets import Bool, Unicode, default

from ..broker.frontend import PoolError
from ..broker.quota_file import QuotaFile
from ..broker.service import BrokerService
from ..broker.settings import ConfigError, PoolSettings
from .events import register_schemas, schema_id
from .handlers import SETTINGS_KEY, default_handlers
from .pool import EmbeddedPool, Pool

PROVISIONER_NAME = "singularity-provisioner"
PROVISIONER_REF = "jupyter_singularity.server.provisioner:SingularityProvisioner"
#: A spawner (JupyterHub's Spawner.environment) may point servers at the node broker this way.
BROKER_URL_ENV = "JUPYTER_SINGULARITY_BROKER_URL"

__all__ = ["ConfigError", "SingularityApp"]


class SingularityApp(PoolSettings, ExtensionApp):
    """Pools the machine's GPUs so that the kernels of this server share them in time."""

    name = "jupyter_singularity"
    description = "Share the GPUs of a machine between Jupyter kernels in time."
    load_other_extensions = True

    broker_url = Unicode(
        help=f"""Address of the node broker that every user's server of this machine joins
        (JupyterHub), such as "unix:///run/jupyter-singularity/broker.sock". Empty: the broker
        runs inside this server, with the pool settings of this class. Default: the environment
        variable {BROKER_URL_ENV} (set it in JupyterHub's Spawner.environment), else empty.""",
    ).tag(config=True)

    require_broker = Bool(
        True,
        help="""With broker_url: when the node broker cannot be reached, kernels still start but
        their GPU cells wait, saying why, until it can (True); or kernels start outside the pool
        and use the GPU unaccounted (False).""",
    ).tag(config=True)

    @default("broker_url")
    def _default_broker_url(self) -> str:
        return os.environ.get(BROKER_URL_ENV, "")

    @default("spill_dir")
    def _default_spill_dir(self) -> str:
        return os.path.join(jupyter_runtime_dir(), "singularity-spill")

    @default("db_url")
    def _default_db_url(self) -> str:
        return "sqlite:///" + os.path.join(jupyter_data_dir(), "singularity.sqlite")

    pool: Pool
    """Set by initialize_settings."""
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

    def initialize_settings(self) -> None:
        with self._stop_on_config_error():
            self._configure()

    def _configure(self) -> None:
        assert self.serverapp is not None
        # Fails at start, not at the first kernel, if the provisioner cannot be imported.
        from .provisioner import SingularityProvisioner  # noqa: F401

        register_schemas(self.serverapp.event_logger)
        if self.broker_url:
            from .node_pool import NodePool

            self.pool = NodePool.for_url(
                self.broker_url, self._name("broker_url"), self.log, self.require_broker
            )
        else:
            self.pool = EmbeddedPool(self.open_pool(log=self.log))
        self.pool.listeners.append(self._emit)
        self.settings[SETTINGS_KEY] = self

    @property
    def service(self) -> BrokerService:
        """The broker inside this server (none when the server joins a node broker)."""
        if not isinstance(self.pool, EmbeddedPool):
            raise AttributeError("this server joins a node broker: it runs no broker service")
        return self.pool.opened.service

    @property
    def quota_watcher(self) -> QuotaFile | None:
        """The quota file the pool inside this server watches, if one is configured."""
        return self.pool.opened.quotas.file if isinstance(self.pool, EmbeddedPool) else None

    # ------------------------------------------------------------------------------ events

    def _emit(self, name: str, data: dict) -> None:
        """The pool's state changes, for the browser; a bad event is logged, never raised."""
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
            await self.notebook_moved(data["source_path"], data["path"])

    async def notebook_moved(self, old: str, new: str) -> None:
        """``old`` and ``new`` are API paths. A kernel started for a session records its notebook
        as jupyter_server's JPY_SESSION_NAME: the file's path on disk under the kernel manager's
        root_dir, or the API path itself for a session started without a name; both follow."""
        assert self.serverapp is not None
        root = self.serverapp.kernel_manager.root_dir
        try:
            await self.pool.call("notebook_renamed", old=old, new=new)
            await self.pool.call(
                "notebook_renamed",
                old=to_os_path(ApiPath(old), root),
                new=to_os_path(ApiPath(new), root),
            )
        except PoolError as err:
            self.log.warning("jupyter-singularity: %s", err)

    # ---------------------------------------------------------------------------- lifecycle

    def initialize_handlers(self) -> None:
        self.handlers.extend(default_handlers)

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        """Start the pool once the server's event loop runs; then kernels join it."""
        from .provisioner import SingularityProvisioner

        if not hasattr(self, "pool"):
            return  # loading failed and was logged; kernels start outside the pool
        await self.pool.start()
        self._started = True
        self.log.info("jupyter-singularity: the GPU pool's broker runs %s", self.pool.description)
        serverapp.event_logger.add_listener(
            schema_id=self._contents_schema, modified=False, listener=self._on_contents_event
        )
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
        SingularityProvisioner.pool = self.pool

    async def stop_extension(self) -> None:
        """Leave the pool: stop the broker inside this server, or leave the node broker."""
        from .provisioner import SingularityProvisioner

        if self._previous_provisioner is not None:
            factory = KernelProvisionerFactory.instance()
            if factory.default_provisioner_name == PROVISIONER_NAME:
                factory.default_provisioner_name = self._previous_provisioner
            self._previous_provisioner = None
        if SingularityProvisioner.pool is getattr(self, "pool", None):
            SingularityProvisioner.pool = None
        if self._started:
            self._started = False
            assert self.serverapp is not None
            self.serverapp.event_logger.remove_listener(
                schema_id=self._contents_schema, listener=self._on_contents_event
            )
            await self.pool.stop()
        elif hasattr(self, "pool"):
            self.pool.close()  # configured, never started
