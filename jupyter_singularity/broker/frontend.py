"""What users may do with the pool, decided in the broker for every request.

The server extension reaches these operations through one interface whether the broker runs inside
it (embedded) or is the node's broker (over its socket): every call names who asks, an
:class:`~.identity.Identity` that the OS or JupyterHub vouched for. A user acts on their own kernels;
admins on all. Everyone sees every kernel's owner, state and size; only its owner and admins see
its notebook path.
"""

from __future__ import annotations

import inspect
import math
import re
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import history, metrics
from .identity import Identity, groups_of
from .ledger import day_start
from .model import BrokerError
from .processes import launched_pid
from .quotas import QuotaError
from .spill_dirs import KernelIdError

if TYPE_CHECKING:
    from .quota_source import QuotaSource
    from .service import BrokerService

ACTIONS = ("offload", "restore", "pin")
_KEY = re.compile(r"[0-9a-f]{64}")


class PoolError(Exception):
    """A request the pool refuses: ``status`` is its HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class PoolFrontend:
    """The pool's operations, each checked against who asks (see the module docstring)."""

    def __init__(self, service: BrokerService, quotas: QuotaSource, admin_hint: str = "") -> None:
        self.service = service
        self.quota_source = quotas
        self.admin_hint = admin_hint
        """Who the admins are, said with a refusal (where they are named differs by mode)."""
        self.node_name = socket.gethostname()
        """The node's name in the metrics' ``node`` label (a node broker's ``node_name``)."""

    # ------------------------------------------------------------ kernels (a server's provisioner)

    def register_kernel(
        self, who: Identity, kernel_id: str, notebook: str = "", key: str | None = None
    ) -> dict:
        """Admit ``who``'s kernel about to start; returns the environment it must start with.
        ``key`` is the kernel's signing key if its server chose it (64 hex digits)."""
        known = self.service.core.kernels.get(kernel_id)
        if known is not None and known.user != who.user:
            raise PoolError(409, f"kernel id {kernel_id} belongs to another user's kernel")
        if key is not None and not _KEY.fullmatch(key):
            raise PoolError(400, "register_kernel: a kernel key is 64 hexadecimal digits")
        try:
            launch = self.service.register_kernel(
                kernel_id, who, notebook=notebook, key=None if key is None else key.encode()
            )
        except KernelIdError as err:
            raise PoolError(400, str(err)) from None
        return {"env": launch.env, "home": None if launch.home is None else launch.home.index}

    def kernel_started(self, who: Identity, kernel_id: str, pid: int | None) -> None:
        """``pid`` is the server's view of the process it started: in a container, a pid of the
        container's namespace, found here among the server's own descendants."""
        self._own(who, kernel_id, "report on")
        if pid is not None and who.pid is not None:
            pid = launched_pid(pid, who.pid)
        self.service.kernel_started(kernel_id, pid)

    def kernel_stopping(self, who: Identity, kernel_id: str, reason: str) -> bool:
        if kernel_id not in self.service.core.kernels:
            return False
        self._own(who, kernel_id, "stop")
        return self.service.kernel_stopping(kernel_id, reason)

    def unregister_kernel(self, who: Identity, kernel_id: str, reason: str) -> None:
        if kernel_id not in self.service.core.kernels:
            return
        self._own(who, kernel_id, "remove")
        self.service.unregister_kernel(kernel_id, reason)

    def notebook_renamed(self, who: Identity, old: str, new: str) -> list[str]:
        """A notebook or folder of ``who`` moved: only ``who``'s kernels follow it."""
        return self.service.notebook_renamed(old, new, user=who.user)

    # ------------------------------------------------------------------------------------ views

    def pool(self, who: Identity) -> dict:
        pool = self.service.pool()
        for kernel in pool["kernels"]:
            self._redact(who, kernel)
        return pool

    def kernel(self, who: Identity, kernel_id: str) -> dict:
        try:
            record = self.service.kernel(kernel_id)
        except KeyError:
            raise PoolError(404, f"no kernel {kernel_id} in the GPU pool") from None
        return self._redact(who, record)

    def me(self, who: Identity) -> dict:
        return {"user": who.user, "groups": list(who.groups), "admin": who.admin}

    def quota(self, who: Identity) -> dict:
        return self.service.quota(who.user, who.groups)

    def usage(self, who: Identity, since: float, until: float, user: str | None) -> dict:
        """GPU usage from the ledger: ``user``'s, or everyone's (``None``) for an admin; anyone
        else reads their own."""
        if user is None and not who.admin:
            user = who.user
        elif user is not None and user != who.user:
            self._admin(who, "read another user's usage")
        return self.service.usage(since, until, user)

    def timeline(self, who: Identity, since: float, until: float) -> dict:
        """Leases and transfers of every kernel between ``since`` and ``until`` (at most a week):
        everyone sees who used which device when; only owners and admins see notebooks."""
        error = history.window_error(since, until)
        if error:
            raise PoolError(400, error)
        answer = history.timeline(
            self.service.ledger,
            since=since,
            until=until,
            now=self.service.clock(),
            devices=self.service.core.devices.values(),
            kernels=self.service.core.kernels,
        )
        for kernel in answer["kernels"].values():
            self._redact(who, kernel)
        return answer

    def gpu_time(self, who: Identity, days: int) -> dict:
        """``who``'s GPU-seconds on each of the last ``days`` days against their daily limit; for
        an admin also every user's, and every group's the quotas name, today and over the days."""
        error = history.days_error(days)
        if error:
            raise PoolError(400, error)
        limits = self.service.quota(who.user, who.groups)["limits"]
        groups = [
            key.split(":", 1)[1]
            for key in self.service.quotas().entries
            if key.startswith("group:")
        ]
        return history.gpu_time(
            self.service.ledger,
            user=who.user,
            days=days,
            now=self.service.clock(),
            limit=limits["gpu_seconds_per_day"],
            everyone=who.admin,
            groups=groups,
            groups_of=self._groups_of,
        )

    def metrics(self, who: Identity) -> str:
        """The pool in Prometheus' text format (kernels by user: no notebook paths in it)."""
        pool = self.service.pool()
        now = pool.get("time") or time.time()
        gpu_seconds = self.service.ledger.gpu_seconds_by_user(day_start(now), now)
        return metrics.render(pool, gpu_seconds, self.service.meter, self.node_name)

    # ------------------------------------------------------------------------------ actions

    def act(
        self,
        who: Identity,
        kernel_id: str,
        action: str,
        pinned: bool | None = None,
        by: str | None = None,
    ) -> dict:
        """Offload, restore or pin a kernel: its owner may, an admin may. ``by`` names who clicked
        in the kernel's history (default: ``who``)."""
        if action not in ACTIONS:
            raise PoolError(400, f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")
        record = self.kernel(who, kernel_id)
        if record["user"] != who.user:
            self._admin(who, f"{action} another user's kernel")
        try:
            if action == "offload":
                return self._redact(who, self.service.offload(kernel_id))
            if action == "restore":
                return self._redact(who, self.service.restore(kernel_id))
            if not isinstance(pinned, bool):
                raise PoolError(400, 'the body must be {"pinned": true} or {"pinned": false}')
            return self._redact(who, self.service.pin(kernel_id, pinned, by=by or who.user))
        except KeyError:
            raise PoolError(404, f"no kernel {kernel_id} in the GPU pool") from None
        except BrokerError as err:
            raise PoolError(409, str(err)) from None

    def quotas(self, who: Identity) -> dict:
        """Every user's limits, where they come from and the quota file's error (admins)."""
        self._admin(who, "read every user's quotas")
        return self._quotas_model()

    async def set_quotas(self, who: Identity, config: Any) -> dict:
        """Replace the quotas (admins): written to the quota file if one is configured; in force
        for every user of the pool at once."""
        self._admin(who, "change quotas")
        if not isinstance(config, Mapping):
            raise PoolError(
                400,
                "the body must be a JSON object of quotas keyed 'default', 'user:NAME' or "
                "'group:NAME'",
            )
        try:
            await self.quota_source.replace(dict(config))
        except QuotaError as err:
            raise PoolError(400, str(err)) from None
        except OSError as err:
            raise PoolError(500, f"cannot write the quota file: {err}") from None
        return self._quotas_model()

    # ---------------------------------------------------------------------------- internals

    def _quotas_model(self) -> dict:
        return {
            "quotas": self.service.quotas().to_dict(),
            "source": self.quota_source.source,
            "error": self.quota_source.error,
        }

    def _own(self, who: Identity, kernel_id: str, what: str) -> None:
        kernel = self.service.core.kernels.get(kernel_id)
        if kernel is not None and kernel.user != who.user and not who.admin:
            raise PoolError(403, f"{who.user} may not {what} kernel {kernel_id} of {kernel.user}")

    def _admin(self, who: Identity, what: str) -> None:
        if not who.admin:
            hint = f" ({self.admin_hint})" if self.admin_hint else ""
            raise PoolError(403, f"only an admin may {what}{hint}")

    def _groups_of(self, user: str) -> tuple[str, ...]:
        """A user's groups as their kernels in the pool were admitted with (what the OS or
        JupyterHub vouched for), else as the system's group database says."""
        for kernel in self.service.core.kernels.values():
            if kernel.user == user:
                return kernel.groups
        return groups_of(user)

    @staticmethod
    def _redact(who: Identity, record: dict) -> dict:
        """Another user's kernel, seen by a user who is no admin: without its notebook path."""
        if record.get("user") != who.user and not who.admin:
            record["notebook"] = ""
        return record


# ------------------------------------------------------------------- operations by name

#: Each operation a server may ask for, with its arguments and their types: a server's request
#: names one, whether it comes from the server itself (embedded) or over the broker's socket.
OPERATIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "register_kernel": {"kernel_id": str, "notebook": str, "key": (str, type(None))},
    "kernel_started": {"kernel_id": str, "pid": (int, type(None))},
    "kernel_stopping": {"kernel_id": str, "reason": str},
    "unregister_kernel": {"kernel_id": str, "reason": str},
    "notebook_renamed": {"old": str, "new": str},
    "pool": {},
    "kernel": {"kernel_id": str},
    "me": {},
    "quota": {},
    "usage": {"since": (int, float), "until": (int, float), "user": (str, type(None))},
    "timeline": {"since": (int, float), "until": (int, float)},
    "gpu_time": {"days": int},
    "metrics": {},
    "act": {"kernel_id": str, "action": str, "pinned": (bool, type(None)), "by": (str, type(None))},
    "quotas": {},
    "set_quotas": {"config": dict},
}
_OPTIONAL = {"notebook": "", "pinned": None, "by": None, "user": None, "pid": None, "key": None}


async def call(frontend: PoolFrontend, who: Identity, op: str, args: Mapping[str, Any]) -> Any:
    """Run operation ``op`` for ``who`` with ``args``, each checked against OPERATIONS (a bool is no
    number, a number no string); raises PoolError for anything else."""
    params = OPERATIONS.get(op)
    if params is None:
        raise PoolError(400, f"unknown operation {op!r}")
    unknown = set(args) - set(params)
    if unknown:
        raise PoolError(400, f"{op}: unknown argument(s) {', '.join(sorted(map(str, unknown)))}")
    checked: dict[str, Any] = {}
    for name, kind in params.items():
        if name not in args:
            if name not in _OPTIONAL:
                raise PoolError(400, f"{op}: missing argument {name!r}")
            checked[name] = _OPTIONAL[name]
            continue
        value = args[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise PoolError(400, f"{op}: argument {name!r} has the wrong type: {value!r:.60}")
        if isinstance(value, float) and not math.isfinite(value):
            raise PoolError(400, f"{op}: argument {name!r} must be a finite number")
        checked[name] = value
    result = getattr(frontend, op)(who, **checked)
    return await result if inspect.isawaitable(result) else result
