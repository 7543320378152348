"""``jupyter singularity broker``: the node broker, one per machine, that every user's server joins.

It runs the same pool as a server's embedded broker (decision core, service, ledger, quotas, spill
directory, driver tier; settings of the same names, as ``SingularityBroker.<name>``), and serves it
on two Unix sockets in one directory: ``socket`` for the servers and the CLI (broker.control), and
``kernels.sock`` beside it for the kernels. Every local user may connect unless ``socket_group``
narrows it; who connects is told by the OS (unix mode) or by JupyterHub (jupyterhub mode), never by
a message. A server joins with ``c.SingularityApp.broker_url = "unix:///path/to/broker.sock"``.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import signal
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

from tornado import httpserver, web
from traitlets import CaselessStrEnum, List, Unicode, default
from traitlets.config import Application

from .control import ControlServer
from .frontend import PoolError
from .identity import Identity, PeerCredentials, UnixIdentities
from .metrics import CONTENT_TYPE
from .settings import ConfigError, OpenPool, PoolSettings

KERNEL_SOCKET = "kernels.sock"
#: Who reads the metrics endpoint (an admin's view: every user's kernels, no notebook paths).
METRICS_READER = Identity("metrics", admin=True)


class SingularityBroker(PoolSettings, Application):
    """The node's GPU pool broker (see the module docstring)."""

    name = "jupyter-singularity-broker"
    description = (
        "The node broker: one GPU pool per machine, which every user's Jupyter server joins."
    )
    try_command = "jupyter singularity broker"
    # A configuration file with an error stops the broker: running on defaults would be worse.
    raise_config_file_errors = True

    config_file = Unicode(
        "",
        help="""A Python or JSON configuration file (c.SingularityBroker.<setting> = ...), read
        before the command line, which wins.""",
    ).tag(config=True)

    socket = Unicode(
        "/run/jupyter-singularity/broker.sock",
        help="""Path of the broker's Unix socket for the users' servers; the kernels' socket,
        kernels.sock, is made beside it. Servers join with
        c.SingularityApp.broker_url = "unix://<this path>".""",
    ).tag(config=True)

    socket_group = Unicode(
        "",
        help="""A group that may connect to the broker's sockets; empty: every local user may
        (who connects is told by the OS or JupyterHub either way, never by a message).""",
    ).tag(config=True)

    identity = CaselessStrEnum(
        ["unix", "jupyterhub"],
        default_value="unix",
        help="""How the broker tells users apart: "unix" by each peer's uid, from the OS
        (SO_PEERCRED; users are Unix users); "jupyterhub" by each server's hub token, resolved by
        the hub (containers, where uids do not tell users apart).""",
    ).tag(config=True)

    admin_users = List(Unicode(), help="""Users who are admins of the pool.""").tag(config=True)

    admin_groups = List(Unicode(), help="""Groups whose members are admins of the pool.""").tag(
        config=True
    )

    metrics_address = Unicode(
        "127.0.0.1:9767",
        help="""host:port where the broker serves the node's Prometheus metrics at /metrics
        (and /health, for probes); empty: none. Localhost by default: the metrics name every
        user's usage.""",
    ).tag(config=True)

    node_name = Unicode(
        help="""The node's name in the ``node`` label of every metric, so that a Prometheus
        scraping every GPU node tells them apart. Default: the machine's hostname (in a
        container, set it to the node's name: the pod's hostname is the pod's).""",
    ).tag(config=True)

    @default("node_name")
    def _default_node_name(self) -> str:
        return socket.gethostname()

    @default("log_level")
    def _default_log_level(self) -> int:
        return logging.INFO

    @default("spill_dir")
    def _default_spill_dir(self) -> str:
        return "/var/lib/jupyter-singularity/spill"

    @default("db_url")
    def _default_db_url(self) -> str:
        return "sqlite:////var/lib/jupyter-singularity/ledger.sqlite"

    aliases = {
        "config": "SingularityBroker.config_file",
        "socket": "SingularityBroker.socket",
        "devices": "SingularityBroker.devices",
        "log-level": "Application.log_level",
    }

    pool: OpenPool
    control: ControlServer
    _metrics: httpserver.HTTPServer | None = None

    # ------------------------------------------------------------------------------- running

    def initialize(self, argv: Any = None) -> None:
        super().initialize(argv)
        if self.config_file:
            path = Path(self.config_file)
            if not path.is_file():
                self.log.critical(
                    "jupyter-singularity broker cannot start: the configuration file %s does not "
                    "exist",
                    path,
                )
                self.exit(1)
            try:
                self.load_config_file(path.name, path=str(path.parent))
            except ConfigError as err:
                self.log.critical("jupyter-singularity broker cannot start: %s", err)
                self.exit(1)
            except Exception as err:  # any error of the file's own Python, or reading it
                self.log.critical(
                    "jupyter-singularity broker cannot start: the configuration file %s: %s: %s",
                    path,
                    type(err).__name__,
                    err,
                )
                self.exit(1)
            self.update_config(self.cli_config)  # the command line wins

    def start(self) -> None:
        try:
            asyncio.run(self.serve())
        except ConfigError as err:
            self.log.critical("jupyter-singularity broker cannot start: %s", err)
            self.exit(1)

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Run until SIGTERM or SIGINT (or ``stop`` is set)."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await self.open()
        try:
            await stop.wait()
        finally:
            await self.close()

    async def open(self) -> None:
        """Check the settings, open the pool, bind the sockets: the broker serves from here on."""
        if self.identity == "jupyterhub":
            from .hub_identity import HubIdentities

            self._resolver: Any = HubIdentities(self.admin_users, self.admin_groups, self.log)
        else:
            self._resolver = UnixIdentities(self.admin_users, self.admin_groups)
        group = self._group()
        directory = Path(self.socket).parent
        self._make_socket_dir(directory, group)
        self.pool = self.open_pool(log=self.log, shared=True)
        service = self.pool.service
        service.node = True
        service.verify_peers = self.identity == "unix"
        hint = (
            "admins are named in the broker's admin_users and admin_groups"
            if self.identity == "unix"
            else "admins are named in the broker's admin_users or by the hub"
        )
        self.pool.frontend.admin_hint = hint
        self.pool.frontend.node_name = self.node_name
        self.control = ControlServer(self.pool.frontend, self._resolve, self.log)
        service.emit = self.control.emit
        await service.start(directory / KERNEL_SOCKET)
        Path(self.socket).unlink(missing_ok=True)  # left by a broker that was killed
        self.control.start(f"ipc://{self.socket}")
        for path in (Path(self.socket), directory / KERNEL_SOCKET):
            self._open_to(path, group)
        self.pool.quotas.start()
        self._metrics = self._serve_metrics()
        self.log.info(
            "jupyter-singularity broker: %d device(s) (%s), socket %s, identity %s, driver tier %s",
            len(self.pool.inventory.devices()),
            self.pool.inventory.kind,
            self.socket,
            self.identity,
            service.driver_capability.log_line(),
        )

    async def close(self) -> None:
        """Stop serving. The kernels go on: a broker started again is joined by them and their
        servers, so nothing they hold is ended in the ledger here."""
        if self._metrics is not None:
            self._metrics.stop()
        await self.control.stop()
        await self.pool.quotas.stop()
        await self.pool.service.stop()
        self.pool.close()
        Path(self.socket).unlink(missing_ok=True)
        self.log.info("jupyter-singularity broker: stopped")

    async def _resolve(self, peer: PeerCredentials | None, token: str | None) -> Identity:
        who = await self._user_of(peer, token)
        return who if peer is None or peer.pid <= 0 else replace(who, pid=peer.pid)

    async def _user_of(self, peer: PeerCredentials | None, token: str | None) -> Identity:
        if self.identity == "jupyterhub":
            return await self._resolver.of_token(token)
        if peer is None:
            raise PoolError(403, "the broker cannot tell who asks: no peer credentials")
        try:
            return self._resolver.of_uid(peer.uid)
        except KeyError:
            raise PoolError(403, f"uid {peer.uid} is no user of this machine") from None

    # ------------------------------------------------------------------------------ sockets

    def _group(self) -> int | None:
        if not self.socket_group:
            return None
        try:
            return grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            raise ConfigError(
                f"{self._name('socket_group')} = {self.socket_group!r}: no such group"
            ) from None

    def _make_socket_dir(self, directory: Path, group: int | None) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if group is not None:
                os.chown(directory, -1, group)
            directory.chmod(0o755 if group is None else 0o750)
        except OSError as err:
            raise ConfigError(
                f"{self._name('socket')} = {self.socket!r}: cannot prepare {directory} "
                f"({err.strerror or err})"
            ) from None

    @staticmethod
    def _open_to(path: Path, group: int | None) -> None:
        """Let every local user (or the group's members) connect to a socket."""
        if group is not None:
            os.chown(path, -1, group)
        path.chmod(0o666 if group is None else 0o660)

    def _serve_metrics(self) -> httpserver.HTTPServer | None:
        if not self.metrics_address:
            return None
        host, _, port = self.metrics_address.rpartition(":")
        try:
            number = int(port)
        except ValueError:
            raise ConfigError(
                f"{self._name('metrics_address')} = {self.metrics_address!r}: use host:port"
            ) from None
        frontend = self.pool.frontend

        class MetricsHandler(web.RequestHandler):
            def get(self) -> None:
                self.set_header("Content-Type", CONTENT_TYPE)
                self.finish(frontend.metrics(METRICS_READER))

        class HealthHandler(web.RequestHandler):
            """For liveness and readiness probes: served from the broker's event loop once its
            sockets are bound, so an answer means it serves; cheaper than a scrape (no ledger)."""

            def get(self) -> None:
                self.finish({"status": "ok", "devices": len(frontend.service.core.devices)})

        server = httpserver.HTTPServer(
            web.Application([(r"/metrics", MetricsHandler), (r"/health", HealthHandler)])
        )
        try:
            server.listen(number, host or "127.0.0.1")
        except OSError as err:
            raise ConfigError(
                f"{self._name('metrics_address')} = {self.metrics_address!r}: {err}"
            ) from None
        return server


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO)
    SingularityBroker.launch_instance(argv)
