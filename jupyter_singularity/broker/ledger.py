"""The usage ledger: every lease and kernel state change, kept in a database.

The ledger outlives the server, so daily GPU-second quotas and the usage CLI
see the same history across restarts. It uses SQLAlchemy Core so that
``db_url`` may point at any database SQLAlchemy speaks; SQLite is the default.
"""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import SQLAlchemyError

__all__ = ["Ledger", "LedgerError", "day_start"]

_DAY = 86400.0

# Double, not Float: epoch seconds need more than a 32-bit float (MySQL FLOAT).
# BigInteger: GPU memory sizes exceed 2**31.
_metadata = sa.MetaData()

_leases = sa.Table(
    "leases",
    _metadata,
    sa.Column("lease_id", sa.Text, primary_key=True),
    sa.Column("kernel_id", sa.Text, nullable=False),
    sa.Column("user", sa.Text, nullable=False),
    sa.Column("device_index", sa.Integer, nullable=False),
    sa.Column("device_uuid", sa.Text, nullable=False),
    sa.Column("reservation_bytes", sa.BigInteger, nullable=False),
    sa.Column("start", sa.Double, nullable=False),
    sa.Column("end", sa.Double, nullable=True),
    sa.Column("gpu_seconds", sa.Double, nullable=True),
    sa.Column("peak_bytes", sa.BigInteger, nullable=True),
    sa.Index("ix_leases_user_start", "user", "start"),
)

_state_changes = sa.Table(
    "state_changes",
    _metadata,
    # Integer (not BigInteger) so SQLite makes it a rowid alias that autoincrements.
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", sa.Double, nullable=False),
    sa.Column("kernel_id", sa.Text, nullable=False),
    sa.Column("user", sa.Text, nullable=False),
    sa.Column("old_state", sa.Text, nullable=True),
    sa.Column("new_state", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("device_index", sa.Integer, nullable=True),
    sa.Column("nbytes", sa.BigInteger, nullable=True),
    sa.Column("duration", sa.Double, nullable=True),
    sa.Index("ix_state_changes_kernel_time", "kernel_id", "time"),
)

# Every broker that wrote to the ledger, and which broker each kernel belonged to: several brokers
# may share one ledger (two servers of one user on the default file), so a broker that starts ends
# only the records of brokers whose process is gone, never those of one still running.
_brokers = sa.Table(
    "brokers",
    _metadata,
    sa.Column("broker_id", sa.Text, primary_key=True),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    # Tells a reused pid apart (the process's start time, where the OS says it).
    sa.Column("process_start", sa.Text, nullable=True),
    sa.Column("started", sa.Double, nullable=False),
    sa.Column("stopped", sa.Double, nullable=True),
)

_kernel_brokers = sa.Table(
    "kernel_brokers",
    _metadata,
    sa.Column("kernel_id", sa.Text, primary_key=True),
    sa.Column("broker_id", sa.Text, nullable=False),
)

#: The state a kernel's records end with once it left the pool.
GONE = "gone"


# Ends an open lease, charging ``end - start`` (nothing if the wall clock stepped back). Only an
# open lease is touched, so a duplicate release cannot charge twice.
_backwards = _leases.c.start > sa.bindparam("end_at")
_END_LEASE = (
    _leases.update()
    .where(_leases.c.lease_id == sa.bindparam("lid"), _leases.c.end.is_(None))
    .values(
        end=sa.case((_backwards, _leases.c.start), else_=sa.bindparam("end_at")),
        gpu_seconds=sa.case((_backwards, 0.0), else_=sa.bindparam("end_at") - _leases.c.start),
        peak_bytes=sa.bindparam("peak"),
    )
)


class LedgerError(RuntimeError):
    """The ledger database cannot be opened or created."""


def day_start(now: float) -> float:
    """UTC midnight of ``now``'s day: daily quotas reset there.

    POSIX time has no leap seconds, so every UTC day is exactly 86400 s and
    the remainder is exact.
    """
    return now - now % _DAY


def _sqlite_file(url: URL) -> Path | None:
    """The file path of a file-backed SQLite URL, else None."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _make_private(path: Path) -> None:
    """Create the ledger's file readable by its owner only, or make an existing one (and its
    -wal and -shm files) so: it names every user's kernels, notebooks and usage. SQLite gives the
    -wal and -shm files it creates the database file's permissions."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            mode = stat.S_IMODE(file.stat().st_mode)
            if mode & 0o077:
                file.chmod(mode & 0o700)


class Ledger:
    """Records leases and kernel state changes; answers usage questions.

    Writes come from the broker's event loop and are buffered until
    :meth:`flush` (every read flushes first, so reads see every write). Reads (e.g. from the CLI, or another thread) go through the
    engine's connection pool; for SQLite, WAL mode keeps readers from blocking
    the server.
    """

    def __init__(self, db_url: str) -> None:
        self._new_leases: list[dict[str, Any]] = []
        self._new_changes: list[dict[str, Any]] = []
        self._ended_leases: list[dict[str, Any]] = []
        self._new_kernels: list[str] = []
        self.broker_id = ""
        shown = db_url
        try:
            url = sa.make_url(db_url)
            shown = url.render_as_string(hide_password=True)
            path = _sqlite_file(url)
            connect_args: dict[str, Any] = {}
            if url.get_backend_name() == "sqlite":
                connect_args["check_same_thread"] = False
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                _make_private(path)
            self._engine: Engine = sa.create_engine(url, connect_args=connect_args)
            if path is not None:
                # WAL with synchronous=NORMAL never corrupts the file and skips the fsync per
                # commit; a power cut may lose the last moments of usage, not the ledger. Lease
                # records sit on every GPU cell's path, so this is the difference between ~0.4 ms
                # and ~0.05 ms a write.
                sa.event.listen(self._engine, "connect", _relaxed_sync)
                # Persistent in the file: setting it once covers later connections.
                with self._engine.connect() as conn:
                    conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            _metadata.create_all(self._engine)
        except (SQLAlchemyError, ImportError, OSError) as exc:
            reason = getattr(exc, "orig", None) or exc
            raise LedgerError(f"cannot open the usage ledger at {shown!r}: {reason}") from exc

    # -- writes -----------------------------------------------------------------

    def lease_started(
        self,
        *,
        lease_id: str,
        kernel_id: str,
        user: str,
        device_index: int,
        device_uuid: str,
        reservation_bytes: int,
        start: float,
    ) -> None:
        """Record a granted lease; it stays open until `lease_ended`."""
        self._new_leases.append(
            {
                "lease_id": lease_id,
                "kernel_id": kernel_id,
                "user": user,
                "device_index": device_index,
                "device_uuid": device_uuid,
                "reservation_bytes": reservation_bytes,
                "start": start,
            }
        )

    def lease_ended(self, lease_id: str, end: float, peak_bytes: int | None) -> None:
        """Close an open lease and charge it ``end - start`` GPU-seconds.

        Unknown or already ended leases are left alone, so a duplicate release
        cannot re-charge a lease. An ``end`` before the start (wall clock
        stepped back) charges nothing rather than a negative amount.
        """
        self._ended_leases.append({"lid": lease_id, "end_at": end, "peak": peak_bytes})

    def close_dangling_leases(self, at: float, keep: Iterable[str] = ()) -> int:
        """End leases left open by a crash, but those of the kernels in ``keep`` (still running
        under a live broker); returns how many were ended.

        How long they really ran is unknown, so each is charged only what was
        observed: it ends at the latest state change of its kernel after its
        start (or at its start if there is none), never after ``at``.
        """
        kept = set(keep)
        self.flush()
        latest = (
            sa.select(sa.func.max(_state_changes.c.time))
            .where(
                _state_changes.c.kernel_id == _leases.c.kernel_id,
                _state_changes.c.time >= _leases.c.start,
            )
            .scalar_subquery()
        )
        with self._engine.begin() as conn:
            dangling = [
                (lease_id, start, seen)
                for lease_id, kernel_id, start, seen in conn.execute(
                    sa.select(
                        _leases.c.lease_id, _leases.c.kernel_id, _leases.c.start, latest
                    ).where(_leases.c.end.is_(None))
                )
                if kernel_id not in kept
            ]
            if dangling:
                conn.execute(
                    _END_LEASE,
                    [
                        {
                            "lid": lease_id,
                            "end_at": min(at, start if seen is None else seen),
                            "peak": None,
                        }
                        for lease_id, start, seen in dangling
                    ],
                )
        return len(dangling)

    def attach(self, *, at: float, me: dict[str, Any], alive: Callable[[dict], bool]) -> dict:
        """Join the ledger as a broker described by ``me`` (host, pid, process_start) and end what
        brokers that died left open: their leases (charged only the time observed) and their
        kernels' records (a last state change to ``gone``). ``alive(broker_row)`` says whether
        another broker's process still runs; kernels of live brokers are left alone.

        Returns what was closed: ``{"leases": n, "kernels": [ids], "devices": {id: GPU}}``,
        ``devices`` naming the GPU of each closed kernel last recorded on one (a node broker's
        kernels outlive it: they rejoin the next run with what they hold there).
        """
        self.flush()
        with self._engine.begin() as conn:
            running = conn.execute(sa.select(_brokers).where(_brokers.c.stopped.is_(None))).all()
            live = {row.broker_id for row in running if alive(dict(row._mapping))}
            dead = [row.broker_id for row in running if row.broker_id not in live]
            if dead:
                conn.execute(
                    _brokers.update().where(_brokers.c.broker_id.in_(dead)).values(stopped=at)
                )
            live_kernels = {
                row.kernel_id
                for row in conn.execute(
                    sa.select(_kernel_brokers.c.kernel_id).where(
                        _kernel_brokers.c.broker_id.in_(live)
                    )
                )
            }
            last = (
                sa.select(sa.func.max(_state_changes.c.id))
                .group_by(_state_changes.c.kernel_id)
                .scalar_subquery()
            )
            open_kernels = conn.execute(
                sa.select(
                    _state_changes.c.kernel_id,
                    _state_changes.c.user,
                    _state_changes.c.new_state,
                    _state_changes.c.device_index,
                ).where(_state_changes.c.id.in_(last), _state_changes.c.new_state != GONE)
            ).all()
            ended = [row for row in open_kernels if row.kernel_id not in live_kernels]
            if ended:
                conn.execute(
                    _state_changes.insert(),
                    [
                        {
                            "time": at,
                            "kernel_id": row.kernel_id,
                            "user": row.user,
                            "old_state": row.new_state,
                            "new_state": GONE,
                            "reason": "its server or broker stopped without ending it "
                            "(found at the next start)",
                            "device_index": row.device_index,
                            "nbytes": None,
                            "duration": None,
                        }
                        for row in ended
                    ],
                )
            self.broker_id = uuid.uuid4().hex
            conn.execute(
                _brokers.insert(),
                {**me, "broker_id": self.broker_id, "started": at, "stopped": None},
            )
        leases = self.close_dangling_leases(at, keep=live_kernels)
        return {
            "leases": leases,
            "kernels": [row.kernel_id for row in ended],
            "devices": {
                row.kernel_id: row.device_index for row in ended if row.device_index is not None
            },
        }

    def detach(self, at: float) -> None:
        """This broker stops: records of its kernels are complete."""
        if not self.broker_id:
            return
        self.flush()
        with self._engine.begin() as conn:
            conn.execute(
                _brokers.update().where(_brokers.c.broker_id == self.broker_id).values(stopped=at)
            )

    def kernel_joined(self, kernel_id: str) -> None:
        """Remember that ``kernel_id`` belongs to this broker (see :meth:`attach`)."""
        self._new_kernels.append(kernel_id)

    def state_changed(
        self,
        *,
        time: float,
        kernel_id: str,
        user: str,
        old: str | None,
        new: str,
        reason: str = "",
        device_index: int | None = None,
        nbytes: int | None = None,
        duration: float | None = None,
    ) -> None:
        """Record one kernel state transition (also evidence the kernel was alive)."""
        self._new_changes.append(
            {
                "time": time,
                "kernel_id": kernel_id,
                "user": user,
                "old_state": old,
                "new_state": new,
                "reason": reason,
                "device_index": device_index,
                "nbytes": nbytes,
                "duration": duration,
            }
        )

    @property
    def pending(self) -> bool:
        """Whether records wait for :meth:`flush`."""
        return bool(
            self._new_leases or self._new_changes or self._ended_leases or self._new_kernels
        )

    def flush(self) -> None:
        """Write the buffered records in one transaction.

        Writes are buffered because they sit on every GPU cell's path: the broker answers the
        kernel first and flushes a moment later. On failure (a full disk) the records stay
        buffered for the next flush and :class:`LedgerError` says why.
        """
        if not self.pending:
            return
        batches = (self._new_leases, self._new_changes, self._ended_leases, self._new_kernels)
        self._new_leases, self._new_changes, self._ended_leases, self._new_kernels = [], [], [], []
        leases, changes, ended, kernels = batches
        try:
            with self._engine.begin() as conn:
                if kernels:
                    # A restarted kernel keeps its id: it now belongs to this broker.
                    ids = sorted(set(kernels))
                    conn.execute(
                        _kernel_brokers.delete().where(_kernel_brokers.c.kernel_id.in_(ids))
                    )
                    conn.execute(
                        _kernel_brokers.insert(),
                        [{"kernel_id": k, "broker_id": self.broker_id} for k in ids],
                    )
                if leases:
                    conn.execute(_leases.insert(), leases)
                if changes:
                    conn.execute(_state_changes.insert(), changes)
                if ended:
                    conn.execute(_END_LEASE, ended)
        except SQLAlchemyError as exc:
            (
                self._new_leases[:0],
                self._new_changes[:0],
                self._ended_leases[:0],
                self._new_kernels[:0],
            ) = batches
            reason = getattr(exc, "orig", None) or exc
            raise LedgerError(f"cannot write the usage ledger: {reason}") from exc

    # -- reads ------------------------------------------------------------------

    @staticmethod
    def _overlapping(since: float, until: float) -> sa.ColumnElement[bool]:
        """Leases that overlap ``[since, until]``; open ones extend to ``until``."""
        return sa.and_(
            _leases.c.start < until,
            sa.or_(_leases.c.end.is_(None), _leases.c.end > since),
        )

    @staticmethod
    def _clipped_seconds(since: float, until: float) -> sa.ColumnElement[float]:
        """A lease's seconds inside ``[since, until]`` (CASE, not LEAST/GREATEST, for
        portability across databases)."""
        end = sa.func.coalesce(_leases.c.end, until)
        clipped_end = sa.case((end > until, until), else_=end)
        clipped_start = sa.case((_leases.c.start < since, since), else_=_leases.c.start)
        return clipped_end - clipped_start

    def usage(self, *, since: float, until: float, user: str | None = None) -> list[dict]:
        """Per user (or just ``user``): GPU-seconds, lease and kernel counts in the window.

        Each lease is clipped to ``[since, until]`` and an open lease counts up
        to ``until``. Users without leases in the window are absent. Sorted by user.
        """
        return self._usage_by(_leases.c.user.label("user"), _leases, since, until, user)

    def usage_by_node(self, *, since: float, until: float) -> list[dict]:
        """As :meth:`usage`, per node: the host of the broker each lease's kernel belonged to
        (several node brokers may share one database). Sorted by node."""
        leases_and_brokers = _leases.outerjoin(
            _kernel_brokers, _kernel_brokers.c.kernel_id == _leases.c.kernel_id
        ).outerjoin(_brokers, _brokers.c.broker_id == _kernel_brokers.c.broker_id)
        node = sa.func.coalesce(_brokers.c.host, "").label("node")
        return self._usage_by(node, leases_and_brokers, since, until)

    def _usage_by(
        self,
        key: sa.Label,
        source: sa.FromClause,
        since: float,
        until: float,
        user: str | None = None,
    ) -> list[dict]:
        stmt = (
            sa.select(
                key,
                sa.func.sum(self._clipped_seconds(since, until)).label("gpu_seconds"),
                sa.func.count().label("leases"),
                sa.func.count(sa.distinct(_leases.c.kernel_id)).label("kernels"),
            )
            .select_from(source)
            .where(self._overlapping(since, until))
            .group_by(key)
            .order_by(key)
        )
        if user is not None:
            stmt = stmt.where(_leases.c.user == user)
        self.flush()
        with self._engine.connect() as conn:
            return [
                {
                    key.name: row[0],
                    "gpu_seconds": float(row.gpu_seconds),
                    "leases": row.leases,
                    "kernels": row.kernels,
                }
                for row in conn.execute(stmt)
            ]

    def gpu_seconds_by_user(self, since: float, now: float) -> dict[str, float]:
        """GPU-seconds per user in ``[since, now]``: what daily quotas are checked against."""
        return {row["user"]: row["gpu_seconds"] for row in self.usage(since=since, until=now)}

    def leases(
        self, *, since: float, until: float, user: str | None = None, limit: int = 1000
    ) -> list[dict]:
        """Leases overlapping ``[since, until]`` as dicts, newest start first."""
        stmt = (
            sa.select(_leases)
            .where(self._overlapping(since, until))
            .order_by(_leases.c.start.desc(), _leases.c.lease_id.desc())
            .limit(limit)
        )
        if user is not None:
            stmt = stmt.where(_leases.c.user == user)
        self.flush()
        with self._engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(stmt)]

    def events(self, *, kernel_id: str | None = None, limit: int = 50) -> list[dict]:
        """State changes (all, or one kernel's) as dicts, newest first."""
        stmt = (
            sa.select(_state_changes)
            .order_by(_state_changes.c.time.desc(), _state_changes.c.id.desc())
            .limit(limit)
        )
        if kernel_id is not None:
            stmt = stmt.where(_state_changes.c.kernel_id == kernel_id)
        self.flush()
        with self._engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(stmt)]

    def state_changes(
        self,
        *,
        since: float,
        until: float,
        states: Iterable[str] | None = None,
        limit: int = 1000,
    ) -> list[dict]:
        """State changes in ``[since, until]`` as dicts, newest first; with ``states``, only those
        leaving or entering one of them (the transfers a timeline marks, say)."""
        stmt = (
            sa.select(_state_changes)
            .where(_state_changes.c.time >= since, _state_changes.c.time <= until)
            .order_by(_state_changes.c.time.desc(), _state_changes.c.id.desc())
            .limit(limit)
        )
        if states is not None:
            wanted = sorted(set(states))
            stmt = stmt.where(
                sa.or_(
                    _state_changes.c.old_state.in_(wanted), _state_changes.c.new_state.in_(wanted)
                )
            )
        self.flush()
        with self._engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(stmt)]

    def close(self) -> None:
        """Write what is buffered, then release pooled connections (and SQLite file handles)."""
        try:
            self.flush()
        finally:
            self._engine.dispose()


def _relaxed_sync(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")
