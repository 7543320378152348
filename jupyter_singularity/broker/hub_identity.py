"""Identities in *jupyterhub* mode: each server presents its own hub token, the hub says whose.

Where the users' servers run in containers (DockerSpawner, KubeSpawner), uids do not tell users
apart, but each single-user server holds an API token the hub issued to it
(``JUPYTERHUB_API_TOKEN``). The broker, itself a hub service (``JUPYTERHUB_API_URL`` and its own
``JUPYTERHUB_API_TOKEN`` in its environment, as the hub gives a service it starts), asks the hub
whose token it is with jupyterhub's own :class:`~jupyterhub.services.auth.HubAuth`, which caches
the answers. Admins: the hub's admins, and the broker's ``admin_users`` and ``admin_groups``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from .frontend import PoolError
from .identity import Identity

#: Seconds the hub's answer for a token is kept (HubAuth's cache).
CACHE_SECONDS = 60


class HubIdentities:
    """Tokens to identities, through the hub (see the module docstring)."""

    def __init__(
        self, admin_users: Iterable[str], admin_groups: Iterable[str], log: logging.Logger
    ) -> None:
        from jupyterhub.services.auth import HubAuth

        self.admin_users = frozenset(admin_users)
        self.admin_groups = frozenset(admin_groups)
        self.log = log
        self.auth = HubAuth(cache_max_age=CACHE_SECONDS)
        if not self.auth.api_token:
            raise PoolError(
                500,
                "identity = 'jupyterhub' needs the broker to run as a JupyterHub service "
                "(JUPYTERHUB_API_TOKEN and JUPYTERHUB_API_URL in its environment)",
            )

    async def of_token(self, token: str | None) -> Identity:
        """The user whose server holds ``token``; PoolError 403 for none or an unknown one."""
        if not token:
            raise PoolError(
                403, "this broker tells users apart by their server's hub token: none came"
            )
        try:
            model = await self.auth.user_for_token(token, sync=False)
        except Exception as err:  # the hub unreachable, say: nobody can be told apart now
            self.log.warning("jupyter-singularity: the hub did not resolve a token: %s", err)
            raise PoolError(503, f"the hub could not be asked who this server is: {err}") from None
        if not model or model.get("kind", "user") != "user" or not model.get("name"):
            raise PoolError(403, "the hub does not know this server's token")
        groups = tuple(sorted(model.get("groups") or ()))
        admin = (
            bool(model.get("admin"))
            or model["name"] in self.admin_users
            or bool(self.admin_groups & set(groups))
        )
        return Identity(model["name"], groups, admin)
