"""Who asks the pool: an identity the OS or JupyterHub vouches for, never one a message claims.

- Embedded in a single-user server, the pool serves one user: the server's owner.
- A node broker in *unix* mode learns each peer's uid, gid and pid from the OS (``SO_PEERCRED`` on
  its Unix socket: ZeroMQ reports them as the message's ``Peer-Address``), and the user and groups
  from that uid.
- A node broker in *jupyterhub* mode (containers, where uids do not tell users apart) resolves the
  server's own hub token through the hub (see :mod:`.hub_identity`).

Admins are named in the broker's configuration (``admin_users``, ``admin_groups``) or, in
jupyterhub mode, by a hub scope.
"""

from __future__ import annotations

import contextlib
import getpass
import grp
import os
import pwd
import time
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    """A user of the pool: name, groups, whether an admin, (unix mode) the uid, and the pid of
    the process asking, in the broker's pid namespace, where the OS reports it (a node broker's
    Unix socket)."""

    user: str
    groups: tuple[str, ...] = ()
    admin: bool = False
    uid: int | None = None
    pid: int | None = None


@dataclass(frozen=True)
class PeerCredentials:
    """What the OS says of the process at the other end of a Unix socket."""

    uid: int
    gid: int
    pid: int


def peer_credentials(peer_address: str | None) -> PeerCredentials | None:
    """The credentials in ZeroMQ's ``Peer-Address`` of an ipc message (``host:uid:gid:pid``, as
    libzmq writes it where the OS has SO_PEERCRED); None where it carries none."""
    if not peer_address:
        return None
    parts = peer_address.rsplit(":", 3)
    if len(parts) != 4:
        return None
    try:
        uid, gid, pid = (int(part) for part in parts[1:])
    except ValueError:
        return None
    return PeerCredentials(uid, gid, pid)


def groups_of(user: str, primary_gid: int | None = None) -> tuple[str, ...]:
    """The groups of ``user`` in the system's group database (its primary group included)."""
    names = {g.gr_name for g in grp.getgrall() if user in g.gr_mem}
    if primary_gid is not None:
        with contextlib.suppress(KeyError):
            names.add(grp.getgrgid(primary_gid).gr_name)
    return tuple(sorted(names))


def server_owner() -> Identity:
    """The user of a single-user server: the JupyterHub user it runs for, else the OS user."""
    user = os.environ.get("JUPYTERHUB_USER") or getpass.getuser()
    try:
        groups = tuple(sorted({grp.getgrgid(g).gr_name for g in os.getgroups()}))
    except (KeyError, OSError):
        groups = ()
    return Identity(user, groups, uid=os.getuid())


class UnixIdentities:
    """Identities of local users by uid, with admins from the broker's configuration. Looked up
    again after ``ttl`` seconds, so a user added to an admin group is one soon after."""

    def __init__(
        self, admin_users: Iterable[str] = (), admin_groups: Iterable[str] = (), ttl: float = 60.0
    ) -> None:
        self.admin_users = frozenset(admin_users)
        self.admin_groups = frozenset(admin_groups)
        self.ttl = ttl
        self._cache: dict[int, tuple[float, Identity]] = {}

    def of_uid(self, uid: int) -> Identity:
        """Raises KeyError for a uid with no user (a process of a deleted user, say)."""
        now = time.monotonic()
        cached = self._cache.get(uid)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        entry = pwd.getpwuid(uid)
        groups = groups_of(entry.pw_name, entry.pw_gid)
        admin = (
            uid == 0 or entry.pw_name in self.admin_users or bool(self.admin_groups & set(groups))
        )
        identity = Identity(entry.pw_name, groups, admin, uid)
        self._cache[uid] = (now, identity)
        return identity
