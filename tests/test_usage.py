"""``jupyter singularity usage`` through the real CLI, on a real SQLite ledger written by two node
brokers with known leases; the totals below are worked out by hand."""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jupyter_singularity.broker.ledger import Ledger

REPO_ROOT = Path(__file__).resolve().parent.parent
HOUR = 3600.0
#: The end of the billing week the tests ask about: 2026-11-20 00:00 UTC.
END = dt.datetime(2026, 11, 20, tzinfo=dt.timezone.utc).timestamp()
WEEK = ["--since", "2026-11-13", "--until", "2026-11-20"]
NOBODY = "no-such-user-here"  # not in the system's user database: no group

# (node, kernel, user, start, end): root and daemon are users of every Linux system, each in a
# group of their own name.
LEASES = [
    ("gpu-a", "k1", "root", END - 3 * 86400, END - 3 * 86400 + 1 * HOUR),  # 1 h
    ("gpu-b", "k2", "root", END - 86400, END - 86400 + 0.5 * HOUR),  # 0.5 h
    ("gpu-a", "k3", "daemon", END - 2 * HOUR, END - 0.5 * HOUR),  # 1.5 h
    ("gpu-a", "k3", "daemon", END - 0.25 * HOUR, END + HOUR),  # 0.25 h inside the week
    ("gpu-b", "k4", NOBODY, END - 7 * 86400 - HOUR, END - 7 * 86400 + 2 * HOUR),  # 2 h inside
    ("gpu-b", "k5", NOBODY, END - 10 * 86400, END - 10 * 86400 + HOUR),  # before the week
]


def write_ledger(path: Path, leases: list[tuple]) -> str:
    """The ledger as two node brokers sharing one database write it."""
    url = f"sqlite:///{path}"
    for node in sorted({lease[0] for lease in leases}):
        ledger = Ledger(url)
        ledger.attach(
            at=END - 30 * 86400,
            me={"host": node, "pid": 1, "process_start": None},
            alive=lambda _record: True,
        )
        for number, (where, kernel, user, start, end) in enumerate(leases):
            if where != node:
                continue
            ledger.kernel_joined(kernel)
            ledger.lease_started(
                lease_id=f"{kernel}:{number}",
                kernel_id=kernel,
                user=user,
                device_index=0,
                device_uuid="GPU-0",
                reservation_bytes=1 << 30,
                start=start,
            )
            ledger.lease_ended(f"{kernel}:{number}", end, 1 << 30)
        ledger.close()
    return url


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    return write_ledger(tmp_path / "ledger.sqlite", LEASES)


def usage(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "jupyter_singularity.cli", "usage", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def csv_hours(out: str, by: str) -> dict[str, tuple[float, int, int]]:
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows and list(rows[0]) == [by, "gpu_hours", "gpu_seconds", "leases", "kernels"]
    for row in rows:
        assert float(row["gpu_seconds"]) == pytest.approx(float(row["gpu_hours"]) * HOUR, abs=1)
    return {r[by]: (float(r["gpu_hours"]), int(r["leases"]), int(r["kernels"])) for r in rows}


def test_by_user_as_csv(ledger_url: str) -> None:
    result = usage(*WEEK, "--by", "user", "--format", "csv", "--db-url", ledger_url)
    assert result.returncode == 0, result.stderr
    assert csv_hours(result.stdout, "user") == {
        "daemon": (1.75, 2, 1),
        NOBODY: (2.0, 1, 1),
        "root": (1.5, 2, 2),
    }


def test_by_node_as_csv(ledger_url: str) -> None:
    result = usage(*WEEK, "--by", "node", "--format", "csv", "--db-url", ledger_url)
    assert result.returncode == 0, result.stderr
    assert csv_hours(result.stdout, "node") == {"gpu-a": (2.75, 3, 2), "gpu-b": (2.5, 2, 2)}


def test_by_group_as_csv(ledger_url: str) -> None:
    result = usage(*WEEK, "--by", "group", "--format", "csv", "--db-url", ledger_url)
    assert result.returncode == 0, result.stderr
    assert csv_hours(result.stdout, "group") == {
        "(no group)": (2.0, 1, 1),
        "daemon": (1.75, 2, 1),
        "root": (1.5, 2, 2),
    }


def test_table_reads_at_a_glance(ledger_url: str) -> None:
    result = usage(*WEEK, "--db-url", ledger_url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "GPU-hours from 2026-11-13 00:00 UTC to 2026-11-20 00:00 UTC, by user"
    assert lines[1].split() == ["USER", "GPU-HOURS", "LEASES", "KERNELS"]
    assert [line.split() for line in lines[2:]] == [
        ["daemon", "1.75", "2", "1"],
        [NOBODY, "2.00", "1", "1"],
        ["root", "1.50", "2", "2"],
        ["TOTAL", "5.25", "5", "4"],
    ]


def test_since_a_duration_counts_back_from_now(tmp_path: Path) -> None:
    now = time.time()
    url = write_ledger(
        tmp_path / "ledger.sqlite",
        [
            ("gpu-a", "k1", "root", now - 3 * HOUR, now - 1 * HOUR),  # 2 h, inside 7d
            ("gpu-a", "k2", "root", now - 8 * 86400, now - 8 * 86400 + HOUR),  # before 7d
        ],
    )
    result = usage("--since", "7d", "--format", "csv", "--db-url", url)
    assert result.returncode == 0, result.stderr
    assert csv_hours(result.stdout, "user") == {"root": (2.0, 1, 1)}


def test_the_brokers_config_file_names_the_ledger(ledger_url: str, tmp_path: Path) -> None:
    config = tmp_path / "broker_config.py"
    config.write_text(f"c.SingularityBroker.db_url = {ledger_url!r}\n")
    result = usage(*WEEK, "--by", "node", "--format", "csv", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert set(csv_hours(result.stdout, "node")) == {"gpu-a", "gpu-b"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "7x"], "--since '7x': use a duration back from now (30m, 12h, 7d, 2w)"),
        (["--since", "2026-13-01"], "--since '2026-13-01': use a duration"),
        (["--until", "yesterday"], "--until 'yesterday': use a duration"),
        (["--since", "2026-11-20", "--until", "2026-11-13"], "is not before --until"),
    ],
)
def test_bad_times_say_which_option(ledger_url: str, args: list[str], message: str) -> None:
    result = usage(*args, "--db-url", ledger_url)
    assert result.returncode == 1 and not result.stdout
    assert result.stderr.startswith("jupyter singularity usage: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_missing_ledger_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "ledger.sqlite"
    result = usage("--db-url", f"sqlite:///{missing}")
    assert result.returncode == 1 and not result.stdout
    assert f"no usage ledger at {missing} (--db-url)" in result.stderr
    assert "Pass --db-url or --config" in result.stderr
    assert not missing.parent.exists()


def test_a_missing_config_file_and_a_bad_url_are_named(tmp_path: Path) -> None:
    result = usage("--config", str(tmp_path / "broker_config.py"))
    assert result.returncode == 1
    assert f"--config {tmp_path / 'broker_config.py'}: no such file" in result.stderr
    result = usage("--db-url", "not a url")
    assert result.returncode == 1
    assert "--db-url 'not a url': not a database URL" in result.stderr


def test_a_bad_choice_is_refused_by_the_parser(ledger_url: str) -> None:
    result = usage("--by", "project", "--db-url", ledger_url)
    assert result.returncode == 2
    assert "argument --by: invalid choice: 'project'" in result.stderr
