"""REST handlers of the pool: thin translations between HTTP and the pool (see .pool).

Every method is authenticated and authorized on the resource ``singularity`` (read for GET, write
for POST and PUT). The pool decides the rest. Actions an admin must do, namely changing quotas,
acting on another user's kernel and reading another user's usage, need an admin: with the pool
inside this server, one with ``write`` on ``singularity-admin`` (the default authorizer of a
single-user server allows it, a custom authorizer, JupyterHub's for example, decides); with a node
broker, one the broker's configuration names.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import TYPE_CHECKING, Any, NoReturn

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web

from ..broker import metrics
from ..broker.frontend import PoolError
from ..broker.ledger import day_start
from .pool import Pool, Requester

if TYPE_CHECKING:
    from .app import SingularityApp

AUTH_RESOURCE = "singularity"
_ANONYMOUS_ID = re.compile(r"[0-9a-f]{32}")
"""The username jupyter_server gives an anonymous user (a uuid4 hex)."""
ADMIN_RESOURCE = "singularity-admin"
SETTINGS_KEY = "singularity_app"
TIMELINE_HOURS = 6
"""The timeline's window when a request names none."""
_DAYS = re.compile(r"[0-9]{1,4}")


class ApiError(web.HTTPError):
    """An error answered as JSON ``{"message", "reason"}`` with the message exactly as given."""

    def __init__(self, status_code: int, message: str) -> None:
        # tornado %-formats log_message when it logs the error: escape, keep the raw text apart.
        super().__init__(status_code, message.replace("%", "%%"))
        self.message = message


class SingularityHandler(APIHandler):
    """Base of the pool's handlers: access to the extension, admin checks, JSON errors."""

    auth_resource = AUTH_RESOURCE

    @property
    def extension(self) -> SingularityApp:
        return self.settings[SETTINGS_KEY]

    @property
    def pool(self) -> Pool:
        return self.extension.pool

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        error = exc_info[1] if exc_info else None
        if not isinstance(error, ApiError):
            super().write_error(status_code, **kwargs)
            return
        self.log.warning("wrote error: %r", error.message)
        self.finish(json.dumps({"message": error.message, "reason": error.reason}))

    def fail(self, status_code: int, message: str) -> NoReturn:
        raise ApiError(status_code, message)

    async def is_admin(self) -> bool:
        return bool(
            await ensure_async(
                self.authorizer.is_authorized(self, self.current_user, "write", ADMIN_RESOURCE)
            )
        )

    def actor(self) -> str:
        """Who makes this request, as the pool's records name them: the signed-in user where the
        server knows users by name (JupyterHub), else the server's owner: with one shared token or
        password, jupyter_server only makes up an anonymous user for each session."""
        user = self.current_user
        username = getattr(user, "username", "") or ""
        if not username or (
            _ANONYMOUS_ID.fullmatch(username) and getattr(user, "name", "").startswith("Anonymous ")
        ):
            return self.pool.owner.user
        return username

    async def pool_call(self, op: str, **args: Any) -> Any:
        """Ask the pool; a refusal becomes this request's JSON error with the pool's status."""
        requester = Requester(admin=await self.is_admin(), actor=self.actor())
        try:
            return await self.pool.call(op, requester, **args)
        except PoolError as err:
            self.fail(err.status, err.message)

    def get_json_body(self) -> Any:
        """The request's JSON body (None when empty); 400 with the reason for a body that is not
        UTF-8 JSON, or that uses NaN or Infinity (which JSON does not have)."""
        if not self.request.body:
            return None
        try:
            text = self.request.body.decode("utf-8")
        except UnicodeDecodeError as err:
            self.fail(400, f"the body must be JSON in UTF-8: byte {err.start} is not UTF-8")
        try:
            return json.loads(text, parse_constant=_not_json)
        except ValueError as err:  # JSONDecodeError, and _not_json's
            self.fail(400, f"the body is not valid JSON: {err}")

    def number(self, name: str, default: float) -> float:
        """Query parameter ``name`` as epoch seconds (``default`` when absent); 400 otherwise."""
        raw = self.get_query_argument(name, None)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            self.fail(400, f"{name} must be epoch seconds (a number), not {raw!r}")
        return value

    def only_parameters(self, *names: str) -> None:
        """400 for a query parameter other than ``names``: a misspelt one would be ignored. A bare
        number without a value is JupyterLab's cache buster (``...&1795999227483``): let it be."""
        for name, values in self.request.query_arguments.items():
            if name not in names and not (name.isdigit() and values == [b""]):
                self.fail(400, f"unknown query parameter {name!r}: use {', '.join(names)}")

    def write_json(self, data: Any) -> None:
        # allow_nan=False: a non-finite number fails here, not in the client that parses the answer.
        self.finish(json.dumps(data, default=str, allow_nan=False))


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


class PoolHandler(SingularityHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        """Devices, kernels, queue and where the devices come from."""
        self.write_json(await self.pool_call("pool"))


class MeHandler(SingularityHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        """Who asks: the user whose kernels are "mine" here, who signed in, and whether an admin.

        ``user`` is the name the pool's kernel records and quota carry for this server's kernels
        (the server's owner), the one actions are checked against; ``username`` names who asks as
        the pool's records do (:meth:`actor`: the signed-in user under JupyterHub, else the owner);
        ``admin`` says whether the pool counts the request as an admin's, so the client offers
        admin actions only to an admin.
        """
        me = await self.pool_call("me")
        self.write_json({"user": me["user"], "username": self.actor(), "admin": me["admin"]})


class KernelHandler(SingularityHandler):
    @web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        """One kernel's record with its recent state changes."""
        self.write_json(await self.pool_call("kernel", kernel_id=kernel_id))


class KernelActionHandler(SingularityHandler):
    """POST .../offload, .../restore, .../pin."""

    @web.authenticated
    @authorized
    async def post(self, kernel_id: str, action: str) -> None:
        pinned = None
        if action == "pin":
            body = self.get_json_body()
            pinned = body.get("pinned") if isinstance(body, dict) else None
            if not isinstance(pinned, bool):
                self.fail(400, 'the body must be {"pinned": true} or {"pinned": false}')
        self.write_json(
            await self.pool_call("act", kernel_id=kernel_id, action=action, pinned=pinned)
        )


class QuotaHandler(SingularityHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        """The server owner's limits and usage."""
        self.write_json(await self.pool_call("quota"))


class QuotasHandler(SingularityHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        """The quota configuration in force, where it comes from, and the quota file's error
        (admin: it names every user's limits; anyone reads their own at ``/quota``)."""
        self.write_json(await self.pool_call("quotas"))

    @web.authenticated
    @authorized
    async def put(self) -> None:
        """Replace the quotas (admin): written to the quota file if one is configured."""
        body = self.get_json_body()
        if not isinstance(body, dict):
            self.fail(
                400,
                "the body must be a JSON object of quotas keyed 'default', 'user:NAME' or 'group:NAME'",
            )
        self.write_json(await self.pool_call("set_quotas", config=body))


class UsageHandler(SingularityHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        """GPU usage from the ledger between ``since`` and ``until`` (default: today so far).

        ``user`` selects one user; without it an admin sees every user and anyone else their own.
        """
        now = time.time()
        since = self.number("since", day_start(now))
        until = self.number("until", now)
        if since > until:
            self.fail(400, f"since ({since}) is after until ({until})")
        user = self.get_query_argument("user", None) or None
        self.write_json(await self.pool_call("usage", since=since, until=until, user=user))


class TimelineHandler(SingularityHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        """Leases and transfers of the pool between ``since`` and ``until`` (epoch seconds;
        default: the last 6 hours; at most 7 days), for the panel's timeline."""
        self.only_parameters("since", "until")
        until = self.number("until", time.time())
        since = self.number("since", until - TIMELINE_HOURS * 3600)
        self.write_json(await self.pool_call("timeline", since=since, until=until))


class GpuTimeHandler(SingularityHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        """GPU-seconds per day over the last ``days`` days (default 7): mine against my daily
        limit, and an admin's view of every user and group."""
        self.only_parameters("days")
        raw = self.get_query_argument("days", None)
        days = 7
        if raw:
            if not _DAYS.fullmatch(raw):
                self.fail(400, f"days must be a whole number of days, not {raw!r}")
            days = int(raw)
        self.write_json(await self.pool_call("gpu_time", days=days))


class MetricsHandler(SingularityHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        """Prometheus text exposition of the pool."""
        self.finish(await self.pool_call("metrics"), set_content_type=metrics.CONTENT_TYPE)


_KERNEL = r"(?P<kernel_id>[^/]+)"

default_handlers: list[tuple[str, type[SingularityHandler]]] = [
    (r"/singularity/api/pool", PoolHandler),
    (r"/singularity/api/me", MeHandler),
    (rf"/singularity/api/kernels/{_KERNEL}", KernelHandler),
    (rf"/singularity/api/kernels/{_KERNEL}/(?P<action>offload|restore|pin)", KernelActionHandler),
    (r"/singularity/api/quota", QuotaHandler),
    (r"/singularity/api/quotas", QuotasHandler),
    (r"/singularity/api/usage", UsageHandler),
    (r"/singularity/api/timeline", TimelineHandler),
    (r"/singularity/api/gpu-time", GpuTimeHandler),
    (r"/singularity/metrics", MetricsHandler),
]
