"""``jupyter singularity usage``: the ledger's GPU-hours per user, group or node, for admins who
bill or report.

It reads the node broker's ledger (``db_url`` of its configuration file, or ``--db-url``), never
the broker itself: it works while the broker is down, and over a database several node brokers
share. A lease counts for its seconds inside the window; one still running counts up to now.
Groups come from the system's group database (the broker's ``unix`` identity; the hub's groups of
``jupyterhub`` identity are not there): a user in several groups counts in each, so the groups'
hours may add up to more than the total.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

import sqlalchemy as sa

from .broker.ledger import Ledger, LedgerError

BY = ("user", "group", "node")
FORMATS = ("table", "csv")
#: Where the broker's configuration file is, as docs/deploy installs it.
DEFAULT_CONFIG = "/etc/jupyter-singularity/broker_config.py"
NO_GROUP = "(no group)"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([mhdw])")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TIME_HELP = "a duration back from now (30m, 12h, 7d, 2w), 'today' (since UTC midnight) or a UTC date or time (2026-11-01, 2026-11-01T08:00)"


class UsageError(Exception):
    """A bad option or a ledger that cannot be read: one line for the admin."""


def parse_time(value: str, option: str, now: float) -> float:
    """Epoch seconds of ``value`` (see ``_TIME_HELP``); UsageError naming ``option`` if bad."""
    text = value.strip()
    duration = _DURATION.fullmatch(text)
    if duration:
        return now - float(duration.group(1)) * _UNITS[duration.group(2)]
    if text == "today":
        return now - now % 86400
    if text == "now":
        return now
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{option} {value!r}: use {_TIME_HELP}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


def configured_db_url(config: str | None) -> str:
    """The node broker's ``db_url``: from its configuration file (``config``, else the usual one
    where it exists), else the broker's default."""
    from .broker.app import SingularityBroker

    broker = SingularityBroker()
    path = Path(config or DEFAULT_CONFIG)
    if config is not None and not path.is_file():
        raise UsageError(f"--config {config}: no such file")
    if path.is_file():
        try:
            broker.load_config_file(path.name, path=str(path.parent))
        except Exception as err:  # the file's own Python, or a bad setting in it
            raise UsageError(f"the broker's configuration file {path}: {err}") from None
    return broker.db_url


def open_ledger(db_url: str, source: str) -> Ledger:
    """The ledger at ``db_url`` for reading; a missing SQLite file is an error, not a new
    ledger (Ledger would create one). ``source`` says where the URL came from."""
    try:
        url = sa.make_url(db_url)
    except sa.exc.ArgumentError:
        raise UsageError(f"{source} {db_url!r}: not a database URL") from None
    database = url.database or ""
    if url.get_backend_name() == "sqlite" and database and not database.startswith(":memory:"):
        path = Path(database)
        if not path.is_file():
            raise UsageError(
                f"no usage ledger at {path} ({source}): is the node broker configured with "
                "another db_url? Pass --db-url or --config"
            )
    try:
        return Ledger(db_url)
    except LedgerError as err:
        raise UsageError(f"{err} ({source})") from None


def usage_rows(ledger: Ledger, by: str, since: float, until: float) -> list[dict]:
    """Rows ``{by: name, gpu_seconds, leases, kernels}`` sorted by name."""
    if by == "node":
        return ledger.usage_by_node(since=since, until=until)
    users = ledger.usage(since=since, until=until)
    if by == "user":
        return users
    return by_group(users, _system_groups)


def by_group(users: Iterable[dict], groups_of: Callable[[str], Iterable[str]]) -> list[dict]:
    """Users' rows summed per group (``groups_of(user)``; none: ``NO_GROUP``)."""
    totals: dict[str, dict] = {}
    for row in users:
        for group in groups_of(row["user"]) or (NO_GROUP,):
            total = totals.setdefault(
                group, {"group": group, "gpu_seconds": 0.0, "leases": 0, "kernels": 0}
            )
            for field in ("gpu_seconds", "leases", "kernels"):
                total[field] += row[field]
    return [totals[name] for name in sorted(totals)]


def _system_groups(user: str) -> tuple[str, ...]:
    import pwd

    from .broker.identity import groups_of

    try:
        primary = pwd.getpwnam(user).pw_gid
    except KeyError:
        primary = None
    return groups_of(user, primary)


def write_csv(rows: list[dict], by: str, out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([by, "gpu_hours", "gpu_seconds", "leases", "kernels"])
    for row in rows:
        seconds = row["gpu_seconds"]
        writer.writerow(
            [row[by], f"{seconds / 3600:.4f}", f"{seconds:.1f}", row["leases"], row["kernels"]]
        )


def write_table(rows: list[dict], by: str, since: float, until: float, out: TextIO) -> None:
    def when(t: float) -> str:
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    print(f"GPU-hours from {when(since)} to {when(until)}, by {by}", file=out)
    if not rows:
        print("(no leases in this window)", file=out)
        return
    width = max(len(by), *(len(str(row[by])) for row in rows), len("TOTAL"))
    print(f"{by.upper():<{width}}  {'GPU-HOURS':>10}  {'LEASES':>7}  {'KERNELS':>7}", file=out)
    for row in rows:
        print(
            f"{row[by]!s:<{width}}  {row['gpu_seconds'] / 3600:>10.2f}  {row['leases']:>7}  "
            f"{row['kernels']:>7}",
            file=out,
        )
    if by != "group":  # a user in several groups counts in each: their sum is no total
        hours = sum(row["gpu_seconds"] for row in rows) / 3600
        leases = sum(row["leases"] for row in rows)
        kernels = sum(row["kernels"] for row in rows)
        print(f"{'TOTAL':<{width}}  {hours:>10.2f}  {leases:>7}  {kernels:>7}", file=out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", default="7d", help=f"start of the window: {_TIME_HELP}")
    parser.add_argument("--until", default="now", help="end of the window (default: now)")
    parser.add_argument("--by", choices=BY, default="user", help="one row per user, group or node")
    parser.add_argument("--format", choices=FORMATS, default="table", help="a table or CSV")
    parser.add_argument(
        "--db-url", help="the ledger's SQLAlchemy URL (default: the broker's db_url)"
    )
    parser.add_argument(
        "--config",
        help=f"the node broker's configuration file, for its db_url (default: {DEFAULT_CONFIG} "
        "where it exists)",
    )


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        now = time.time()
        since = parse_time(args.since, "--since", now)
        until = parse_time(args.until, "--until", now)
        if since >= until:
            raise UsageError(f"--since {args.since!r} is not before --until {args.until!r}")
        if args.db_url:
            db_url, source = args.db_url, "--db-url"
        else:
            db_url = configured_db_url(args.config)
            source = f"the broker's db_url, from {args.config or DEFAULT_CONFIG} or its default"
        ledger = open_ledger(db_url, source)
        try:
            rows = usage_rows(ledger, args.by, since, until)
        except sa.exc.SQLAlchemyError as err:
            raise UsageError(
                f"cannot read the usage ledger ({source}): {err.orig or err}"
            ) from None
        finally:
            ledger.close()
    except UsageError as err:
        print(f"jupyter singularity usage: {err}", file=sys.stderr)
        return 1
    if args.format == "csv":
        write_csv(rows, args.by, out)
    else:
        write_table(rows, args.by, since, until, out)
    return 0
