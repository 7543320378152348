"""Tests for the usage ledger, against real SQLite files."""

from __future__ import annotations

import sqlite3
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jupyter_singularity.broker.core import BrokerCore
from jupyter_singularity.broker.ledger import Ledger, LedgerError, day_start
from jupyter_singularity.broker.model import Grant, LeaseEnded
from jupyter_singularity.devices import open_inventory

DAY = 86400.0
T0 = 1_750_000_000.0 - 1_750_000_000.0 % DAY  # a UTC midnight


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ledger.db"


@pytest.fixture
def ledger(db_path: Path):
    led = Ledger(_url(db_path))
    yield led
    led.close()


def _start(
    led: Ledger, lease_id: str, user: str, start: float, *, kernel: str = "k1", device: int = 0
) -> None:
    led.lease_started(
        lease_id=lease_id,
        kernel_id=kernel,
        user=user,
        device_index=device,
        device_uuid=f"GPU-{device}",
        reservation_bytes=4 << 30,
        start=start,
    )


def test_creates_parent_directory_and_enables_wal(db_path: Path, ledger: Ledger) -> None:
    assert db_path.is_file()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"leases", "state_changes"} <= tables
    assert {"ix_leases_user_start", "ix_state_changes_kernel_time"} <= indexes


def test_leases_recorded_and_summed_per_user(ledger: Ledger) -> None:
    _start(ledger, "a1", "alice", T0 + 100)
    ledger.lease_ended("a1", T0 + 160, peak_bytes=3 << 30)
    _start(ledger, "a2", "alice", T0 + 200, kernel="k2", device=1)
    ledger.lease_ended("a2", T0 + 230.5, peak_bytes=None)
    _start(ledger, "b1", "bob", T0 + 300, kernel="k3")
    ledger.lease_ended("b1", T0 + 310, peak_bytes=1 << 30)

    assert ledger.gpu_seconds_by_user(T0, T0 + 1000) == {"alice": 90.5, "bob": 10.0}
    (row,) = ledger.leases(since=T0, until=T0 + 1000, user="bob")
    assert row == {
        "lease_id": "b1",
        "kernel_id": "k3",
        "user": "bob",
        "device_index": 0,
        "device_uuid": "GPU-0",
        "reservation_bytes": 4 << 30,
        "start": T0 + 300,
        "end": T0 + 310,
        "gpu_seconds": 10.0,
        "peak_bytes": 1 << 30,
    }


def test_lease_ended_unknown_duplicate_and_backwards(ledger: Ledger) -> None:
    ledger.lease_ended("nope", T0 + 5, peak_bytes=None)  # unknown: no-op, no error
    _start(ledger, "a1", "alice", T0 + 100)
    ledger.lease_ended("a1", T0 + 150, peak_bytes=7)
    ledger.lease_ended("a1", T0 + 900, peak_bytes=9)  # duplicate release keeps the first
    _start(ledger, "a2", "alice", T0 + 200)
    ledger.lease_ended("a2", T0 + 190, peak_bytes=None)  # clock stepped back: charge 0

    rows = {r["lease_id"]: r for r in ledger.leases(since=T0, until=T0 + DAY)}
    assert set(rows) == {"a1", "a2"}
    assert (rows["a1"]["end"], rows["a1"]["gpu_seconds"], rows["a1"]["peak_bytes"]) == (
        T0 + 150,
        50.0,
        7,
    )
    assert (rows["a2"]["end"], rows["a2"]["gpu_seconds"]) == (T0 + 200, 0.0)


def test_clipped_to_day_window(ledger: Ledger) -> None:
    today = day_start(T0 + 5000)
    _start(ledger, "over-midnight", "alice", today - 600)
    ledger.lease_ended("over-midnight", today + 400, peak_bytes=None)
    _start(ledger, "yesterday", "alice", today - 5000)
    ledger.lease_ended("yesterday", today - 4000, peak_bytes=None)
    _start(ledger, "into-tomorrow", "bob", today + DAY - 100)
    ledger.lease_ended("into-tomorrow", today + DAY + 900, peak_bytes=None)

    assert ledger.gpu_seconds_by_user(today, today + DAY) == {"alice": 400.0, "bob": 100.0}
    assert ledger.gpu_seconds_by_user(today - DAY, today) == {"alice": 1600.0}
    assert [r["lease_id"] for r in ledger.leases(since=today, until=today + DAY)] == [
        "into-tomorrow",
        "over-midnight",
    ]


def test_a_lease_across_midnight_reads_back_as_the_core_counts_it(db_path: Path) -> None:
    """What the broker charges each day for a cell that ran across midnight is what a restarted
    broker reads back from the ledger: 300 s for the day it started, 400 s for the next."""
    midnight = T0 + DAY
    core = BrokerCore(open_inventory("simulated:1x16GiB").devices(), now=midnight - 400)
    core.register("k1", "alice", midnight - 400)
    first = Ledger(_url(db_path))
    try:
        grant = next(
            a
            for a in core.acquire("k1", "r1", midnight - 300, memory=1 << 30)
            if isinstance(a, Grant)
        )
        _start(first, "k1:r1", "alice", grant.start)  # as the broker service records them
        core.tick(midnight + 10)
        assert core.used_seconds("alice", midnight + 10) == 10.0
        assert first.gpu_seconds_by_user(day_start(midnight + 10), midnight + 10) == {"alice": 10.0}
        ended = next(
            a for a in core.release("k1", "r1", midnight + 400) if isinstance(a, LeaseEnded)
        )
        first.lease_ended("k1:r1", ended.end, peak_bytes=None)
        assert core.usage_today == {"alice": 400.0}
    finally:
        first.close()

    second = Ledger(_url(db_path))
    try:
        now = midnight + 500
        today = second.gpu_seconds_by_user(day_start(now), now)
        assert today == core.usage_today == {"alice": 400.0}
        assert second.gpu_seconds_by_user(midnight - DAY, midnight) == {"alice": 300.0}
        assert second.leases(since=T0, until=now)[0]["gpu_seconds"] == 700.0
        restarted = BrokerCore(
            open_inventory("simulated:1x16GiB").devices(), usage_today=today, now=now
        )
        assert restarted.used_seconds("alice", now) == core.used_seconds("alice", now) == 400.0
    finally:
        second.close()


def test_open_lease_counts_up_to_now(ledger: Ledger) -> None:
    _start(ledger, "open", "alice", T0 + 100)
    assert ledger.gpu_seconds_by_user(T0, T0 + 175) == {"alice": 75.0}
    assert ledger.gpu_seconds_by_user(T0, T0 + 400) == {"alice": 300.0}
    assert ledger.gpu_seconds_by_user(T0, T0 + 50) == {}  # not started yet
    assert ledger.leases(since=T0, until=T0 + 400)[0]["end"] is None


def test_survives_restart(db_path: Path) -> None:
    first = Ledger(_url(db_path))
    _start(first, "a1", "alice", T0 + 10)
    first.lease_ended("a1", T0 + 70, peak_bytes=5)
    _start(first, "b1", "bob", T0 + 20, kernel="k2")
    first.state_changed(time=T0 + 10, kernel_id="k1", user="alice", old="idle", new="running")
    before = first.gpu_seconds_by_user(T0, T0 + 100)
    events_before = first.events()
    first.close()

    second = Ledger(_url(db_path))
    try:
        assert before == {"alice": 60.0, "bob": 80.0}
        assert second.gpu_seconds_by_user(T0, T0 + 100) == before
        assert second.events() == events_before
        second.lease_ended("b1", T0 + 50, peak_bytes=None)  # a lease opened before restart
        assert second.gpu_seconds_by_user(T0, T0 + 100) == {"alice": 60.0, "bob": 30.0}
    finally:
        second.close()


def test_close_dangling_leases_charges_only_observed_time(ledger: Ledger) -> None:
    _start(ledger, "seen", "alice", T0 + 100, kernel="k1")
    ledger.state_changed(time=T0 + 90, kernel_id="k1", user="alice", old=None, new="idle")
    ledger.state_changed(time=T0 + 100, kernel_id="k1", user="alice", old="idle", new="busy")
    ledger.state_changed(time=T0 + 130, kernel_id="k1", user="alice", old="busy", new="idle")
    # Another kernel's later activity is no evidence that k1's lease still ran.
    ledger.state_changed(time=T0 + 500, kernel_id="k9", user="carol", old="idle", new="busy")
    _start(ledger, "unseen", "bob", T0 + 200, kernel="k2")
    ledger.state_changed(time=T0 + 150, kernel_id="k2", user="bob", old=None, new="idle")
    _start(ledger, "capped", "dave", T0 + 300, kernel="k3")
    ledger.state_changed(time=T0 + 900, kernel_id="k3", user="dave", old="busy", new="idle")
    _start(ledger, "closed", "erin", T0 + 10, kernel="k4")
    ledger.lease_ended("closed", T0 + 20, peak_bytes=None)

    assert ledger.close_dangling_leases(at=T0 + 600) == 3
    rows = {r["lease_id"]: r for r in ledger.leases(since=T0, until=T0 + DAY)}
    assert (rows["seen"]["end"], rows["seen"]["gpu_seconds"]) == (T0 + 130, 30.0)
    assert (rows["unseen"]["end"], rows["unseen"]["gpu_seconds"]) == (T0 + 200, 0.0)
    assert (rows["capped"]["end"], rows["capped"]["gpu_seconds"]) == (T0 + 600, 300.0)
    assert (rows["closed"]["end"], rows["closed"]["gpu_seconds"]) == (T0 + 20, 10.0)
    assert ledger.close_dangling_leases(at=T0 + 700) == 0


@pytest.mark.parametrize("url", ["not a url at all", "nosuchdialect://host/db"])
def test_bad_url_raises_readable_ledger_error(url: str) -> None:
    with pytest.raises(LedgerError, match="cannot open the usage ledger at") as info:
        Ledger(url)
    assert url in str(info.value)


def test_password_is_not_shown_in_error() -> None:
    with pytest.raises(LedgerError) as info:
        Ledger("nosuchdialect://alice:s3cret@host/db")
    assert "s3cret" not in str(info.value)
    assert "alice:***@host" in str(info.value)


def test_unwritable_directory_raises_ledger_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # a file where the parent directory should be: fails even as root
    url = _url(blocker / "ledger.db")
    with pytest.raises(LedgerError, match="cannot open the usage ledger") as info:
        Ledger(url)
    assert url in str(info.value)


def test_unopenable_database_file_raises_ledger_error(tmp_path: Path) -> None:
    url = _url(tmp_path)  # a directory, not a database file
    with pytest.raises(LedgerError, match="unable to open database file") as info:
        Ledger(url)
    assert url in str(info.value)


def test_events_newest_first_and_kernel_filter(ledger: Ledger) -> None:
    ledger.state_changed(time=T0 + 1, kernel_id="k1", user="alice", old=None, new="idle")
    ledger.state_changed(
        time=T0 + 3,
        kernel_id="k2",
        user="bob",
        old="idle",
        new="busy",
        reason="execute_request",
        device_index=1,
        nbytes=2 << 30,
        duration=0.25,
    )
    ledger.state_changed(time=T0 + 2, kernel_id="k1", user="alice", old="idle", new="busy")
    ledger.state_changed(time=T0 + 3, kernel_id="k1", user="alice", old="busy", new="idle")

    assert [(e["kernel_id"], e["new_state"]) for e in ledger.events()] == [
        ("k1", "idle"),  # same time as k2's: the later write comes first
        ("k2", "busy"),
        ("k1", "busy"),
        ("k1", "idle"),
    ]
    assert [e["time"] for e in ledger.events(kernel_id="k1")] == [T0 + 3, T0 + 2, T0 + 1]
    assert [e["time"] for e in ledger.events(kernel_id="k1", limit=2)] == [T0 + 3, T0 + 2]
    (k2,) = ledger.events(kernel_id="k2")
    assert {k: v for k, v in k2.items() if k != "id"} == {
        "time": T0 + 3,
        "kernel_id": "k2",
        "user": "bob",
        "old_state": "idle",
        "new_state": "busy",
        "reason": "execute_request",
        "device_index": 1,
        "nbytes": 2 << 30,
        "duration": 0.25,
    }
    assert ledger.events(kernel_id="nope") == []


def test_usage_aggregation(ledger: Ledger) -> None:
    _start(ledger, "b1", "bob", T0 + 10, kernel="kb")
    ledger.lease_ended("b1", T0 + 20, peak_bytes=None)
    _start(ledger, "a1", "alice", T0 + 10, kernel="k1", device=0)
    ledger.lease_ended("a1", T0 + 40, peak_bytes=None)
    _start(ledger, "a2", "alice", T0 + 10, kernel="k1", device=1)
    ledger.lease_ended("a2", T0 + 40, peak_bytes=None)
    _start(ledger, "a3", "alice", T0 + 50, kernel="k2")  # open
    _start(ledger, "old", "carol", T0 - 100, kernel="kc")
    ledger.lease_ended("old", T0 - 50, peak_bytes=None)

    assert ledger.usage(since=T0, until=T0 + 100) == [
        {"user": "alice", "gpu_seconds": 110.0, "leases": 3, "kernels": 2},
        {"user": "bob", "gpu_seconds": 10.0, "leases": 1, "kernels": 1},
    ]
    assert ledger.usage(since=T0, until=T0 + 100, user="bob") == [
        {"user": "bob", "gpu_seconds": 10.0, "leases": 1, "kernels": 1},
    ]
    assert ledger.usage(since=T0 + 100, until=T0 + 200, user="bob") == []


def test_leases_limit_and_user_filter(ledger: Ledger) -> None:
    for i in range(5):
        _start(ledger, f"l{i}", "alice" if i % 2 else "bob", T0 + i)
    assert [r["lease_id"] for r in ledger.leases(since=T0, until=T0 + 10, limit=2)] == ["l4", "l3"]
    assert [r["lease_id"] for r in ledger.leases(since=T0, until=T0 + 10, user="alice")] == [
        "l3",
        "l1",
    ]


@pytest.mark.parametrize(
    "now", [T0, T0 + 0.5, T0 + DAY - 1e-3, 1_700_000_000.123, 0.0, 951_782_400.0 + 3600]
)
def test_day_start_is_utc_midnight(now: float) -> None:
    moment = datetime.fromtimestamp(now, tz=timezone.utc)
    midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    assert day_start(now) == midnight.timestamp()


_interval = st.tuples(
    st.sampled_from(["alice", "bob", "carol"]),
    st.floats(min_value=0, max_value=10_000, allow_nan=False),
    st.one_of(st.none(), st.floats(min_value=0, max_value=5_000, allow_nan=False)),
)


@settings(max_examples=60, deadline=None)
@given(
    intervals=st.lists(_interval, max_size=12),
    since=st.floats(min_value=0, max_value=10_000, allow_nan=False),
    span=st.floats(min_value=0, max_value=10_000, allow_nan=False),
)
def test_gpu_seconds_match_brute_force(
    intervals: list[tuple[str, float, float | None]], since: float, span: float
) -> None:
    # Brute force on the same absolute floats the ledger stores, so only summation order differs.
    since, now = T0 + since, T0 + since + span
    expected: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        led = Ledger(_url(Path(tmp) / "ledger.db"))
        try:
            for i, (user, offset, length) in enumerate(intervals):
                start = T0 + offset
                _start(led, f"l{i}", user, start)
                if length is not None:
                    led.lease_ended(f"l{i}", start + length, peak_bytes=None)
                end = now if length is None else start + length
                overlap = max(0.0, min(end, now) - max(start, since))
                expected[user] = expected.get(user, 0.0) + overlap
            got = led.gpu_seconds_by_user(since, now)
        finally:
            led.close()
    for user in set(got) | set(expected):
        assert got.get(user, 0.0) == pytest.approx(expected.get(user, 0.0), abs=1e-6)


# ------------------------------------------------ records left open by a broker that died


def _open_kernel(
    led: Ledger, kernel_id: str, state: str, at: float, device: int | None = None
) -> None:
    led.kernel_joined(kernel_id)
    led.state_changed(time=at, kernel_id=kernel_id, user="ann", old=None, new="cold")
    led.state_changed(
        time=at + 1, kernel_id=kernel_id, user="ann", old="cold", new=state, device_index=device
    )


def _last_state(led: Ledger, kernel_id: str) -> str:
    return led.events(kernel_id=kernel_id, limit=1)[0]["new_state"]


def test_attach_closes_what_a_dead_broker_left_open_and_spares_a_live_one(db_path: Path) -> None:
    """Two servers of one user share the default ledger: the second one's start must end only
    the records of brokers whose process is gone, not the first one's running kernels."""
    url = _url(db_path)
    crashed = Ledger(url)
    crashed.attach(at=T0, me={"host": "h", "pid": 1, "process_start": "a"}, alive=lambda r: True)
    _open_kernel(crashed, "lost", "spilled", T0)
    _open_kernel(crashed, "held", "resident", T0, device=1)
    _start(crashed, "lost:1", "ann", T0 + 2, kernel="lost")
    crashed.flush()  # then kill -9: nothing else is written

    running = Ledger(url)
    running.attach(at=T0, me={"host": "h", "pid": 2, "process_start": "b"}, alive=lambda r: True)
    _open_kernel(running, "alive", "running", T0 + 3)
    _start(running, "alive:1", "ann", T0 + 4, kernel="alive")
    running.flush()

    restarted = Ledger(url)
    closed = restarted.attach(
        at=T0 + 100,
        me={"host": "h", "pid": 3, "process_start": "c"},
        alive=lambda record: record["pid"] == 2,
    )

    # (a node broker's kernels rejoin the next run: it learns which GPUs held their memory)
    assert closed["leases"] == 1 and sorted(closed["kernels"]) == ["held", "lost"]
    assert closed["devices"] == {"held": 1}
    assert _last_state(restarted, "lost") == "gone"
    assert "stopped without ending it" in restarted.events(kernel_id="lost", limit=1)[0]["reason"]
    assert _last_state(restarted, "alive") == "running"
    open_leases = [
        lease["lease_id"]
        for lease in restarted.leases(since=T0, until=T0 + 200)
        if lease["end"] is None
    ]
    assert open_leases == ["alive:1"]
    # Nothing is closed twice.
    again = Ledger(url)
    assert again.attach(
        at=T0 + 200, me={"host": "h", "pid": 4}, alive=lambda record: record["pid"] in (2, 3)
    ) == {"leases": 0, "kernels": [], "devices": {}}
    for led in (crashed, running, restarted, again):
        led.close()


def test_attach_closes_records_written_before_brokers_were_recorded(ledger: Ledger) -> None:
    ledger.state_changed(time=T0, kernel_id="old", user="ann", old=None, new="offloaded")
    ledger.flush()
    closed = ledger.attach(at=T0 + 5, me={"host": "h", "pid": 1}, alive=lambda r: True)
    assert closed["kernels"] == ["old"]
    assert _last_state(ledger, "old") == "gone"


# ------------------------------------------------------------------------- file permissions


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_new_ledger_file_and_its_wal_and_shm_are_private(db_path: Path):
    """The ledger names every user's kernels and usage: readable by the server's user only,
    whatever the umask (0644 before)."""
    led = Ledger(_url(db_path))
    try:
        _start(led, "l1", "ann", T0)
        led.flush()
        files = [db_path, db_path.with_name("ledger.db-wal"), db_path.with_name("ledger.db-shm")]
        assert all(f.exists() for f in files)
        assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        led.close()


def test_an_existing_readable_ledger_is_made_private_and_kept(db_path: Path):
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path)  # another tool's database, open, so its -wal and -shm exist
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE other (x)")
        conn.execute("INSERT INTO other VALUES (42)")
        conn.commit()
        files = [db_path, db_path.with_name("ledger.db-wal"), db_path.with_name("ledger.db-shm")]
        for f in files:
            f.chmod(0o644)
        led = Ledger(_url(db_path))
        try:
            assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
            assert conn.execute("SELECT x FROM other").fetchall() == [(42,)]
        finally:
            led.close()
    finally:
        conn.close()
