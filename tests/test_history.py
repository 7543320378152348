"""The pool's history for the panel's pictures: ``GET /singularity/api/timeline`` (leases and
transfers in a time window) and ``GET /singularity/api/gpu-time`` (GPU-seconds per day, user and
group), through a real jupyter_server, the node broker's operations with the identities the OS
vouches for, and a real node broker process."""

from __future__ import annotations

import json
import time
import urllib.error
from pathlib import Path

import pytest
from servers import api, jupyter_server, node_broker
from test_frontend import ADMIN, ALICE, BOB, pool  # noqa: F401 (pool: a fixture)
from test_server import NoAdminAuthorizer, fetch_error

from jupyter_singularity.broker.frontend import PoolError, call
from jupyter_singularity.broker.identity import Identity
from jupyter_singularity.broker.ledger import day_start
from jupyter_singularity.broker.quotas import Quotas

MiB = 1 << 20
GiB = 1 << 30
DAY = 86400.0

# ~150 MiB of "GPU" state in a kernel: one fits the 256 MiB device, two do not.
STATE = "import torch\nx = torch.ones(150 * 2**20 // 4)\nprint('ready')"


def lease(ledger, kernel_id: str, user: str, start: float, end: float, nbytes: int = GiB) -> None:
    """A lease of ``user``'s kernel in the ledger, as the broker records a GPU cell's."""
    lease_id = f"{kernel_id}:{start}"
    ledger.lease_started(
        lease_id=lease_id,
        kernel_id=kernel_id,
        user=user,
        device_index=0,
        device_uuid="SIM-0",
        reservation_bytes=nbytes,
        start=start,
    )
    ledger.lease_ended(lease_id, end, nbytes)


# ----------------------------------------------------------- a real server, real kernels


@pytest.fixture
def singularity_devices() -> str:
    return "simulated:1x256MiB"


async def start_notebook(jp_fetch, path: str) -> str:
    """A kernel for notebook ``path``, started as JupyterLab starts one (a session)."""
    body = {"path": path, "type": "notebook", "name": path, "kernel": {"name": "python3"}}
    response = await jp_fetch("api", "sessions", method="POST", body=json.dumps(body))
    return json.loads(response.body)["kernel"]["id"]


async def test_the_timeline_after_two_notebooks_took_turns_on_the_gpu(
    jp_fetch, get_json, wait_in_pool, run, state
):
    before = time.time()
    first = await start_notebook(jp_fetch, "turns/first.ipynb")
    second = await start_notebook(jp_fetch, "turns/second.ipynb")
    await wait_in_pool([first, second])
    for kernel_id in (first, second, first):  # each cell needs the GPU the other one holds
        status, out, _ = await run(kernel_id, STATE)
        assert status == "ok" and "ready" in out, out
    await state(second, "offloaded", "spilled")
    await state(first, "resident")  # (its last lease kept a moment for a next cell: ended now)

    timeline = await get_json("singularity", "api", "timeline")

    assert timeline["until"] - timeline["since"] == 6 * 3600
    assert timeline["since"] < before < timeline["until"] <= timeline["now"] + 1
    assert timeline["devices"] == [{"index": 0, "name": "Simulated GPU"}]
    assert timeline["truncated"] is False
    leases = timeline["leases"]
    assert [lease["kernel_id"] for lease in leases] == [first, second, first]
    assert [lease["start"] for lease in leases] == sorted(lease["start"] for lease in leases)
    assert all(lease["device"] == 0 and lease["end"] > lease["start"] for lease in leases)
    assert all(lease["peak_bytes"] >= 150 * MiB for lease in leases)
    kernels = timeline["kernels"]
    assert kernels[first]["notebook"].endswith("/turns/first.ipynb")
    assert kernels[second]["notebook"].endswith("/turns/second.ipynb")
    # The transfers: first offloaded for second, then first restored and second offloaded.
    done = [
        (c["kernel_id"], c["old_state"], c["new_state"])
        for c in timeline["changes"]
        if c["old_state"] in ("offloading", "restoring")
    ]
    assert done == [
        (first, "offloading", "offloaded"),
        (second, "offloading", "offloaded"),
        (first, "restoring", "running"),
    ]
    measured = [c for c in timeline["changes"] if c["old_state"] in ("offloading", "restoring")]
    assert all(c["nbytes"] == 150 * MiB and c["duration"] > 0 for c in measured)
    started = [c for c in timeline["changes"] if c["new_state"] == "offloading"]
    assert [c["device_index"] for c in started] == [0, 0]

    # A window before any of it: empty, and the window is the one asked for.
    empty = await get_json(
        "singularity", "api", "timeline", params={"since": "1000", "until": "2000"}
    )
    assert (empty["since"], empty["until"]) == (1000, 2000)
    assert empty["leases"] == [] and empty["changes"] == [] and empty["kernels"] == {}
    # JupyterLab's requests end with a bare number, its cache buster: not a parameter.
    again = await get_json(
        "singularity", "api", "timeline", params={"since": "1000", "until": "2000", "1795": ""}
    )
    assert {**again, "now": None} == {**empty, "now": None}

    # My GPU time: today's bar holds the three leases, and nothing is left out of the week.
    mine = await get_json("singularity", "api", "gpu-time")
    assert len(mine["days"]) == 7
    assert mine["days"][-1]["day"] == day_start(mine["now"])
    spent = sum(lease["end"] - lease["start"] for lease in leases)
    assert mine["days"][-1]["gpu_seconds"] == pytest.approx(spent)
    assert all(day["gpu_seconds"] == 0 for day in mine["days"][:-1])
    assert mine["gpu_seconds_per_day"] is None


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        (
            "timeline",
            {"since": "yesterday"},
            "since must be epoch seconds (a number), not 'yesterday'",
        ),
        ("timeline", {"until": "nan"}, "until must be epoch seconds (a number), not 'nan'"),
        ("timeline", {"since": "inf"}, "since must be epoch seconds (a number), not 'inf'"),
        ("timeline", {"since": "-5", "until": "10"}, "since must be epoch seconds >= 0, not -5.0"),
        ("timeline", {"since": "10", "until": "10"}, "since (10.0) must be before until (10.0)"),
        (
            "timeline",
            {"since": "0", "until": str(8 * DAY)},
            "the window from since to until is 192.0 hours: at most 168 (7 days)",
        ),
        ("timeline", {"sinse": "10"}, "unknown query parameter 'sinse': use since, until"),
        ("gpu-time", {"days": "7.5"}, "days must be a whole number of days, not '7.5'"),
        ("gpu-time", {"days": "-1"}, "days must be a whole number of days, not '-1'"),
        ("gpu-time", {"days": "0"}, "days must be a whole number from 1 to 31, not 0"),
        ("gpu-time", {"days": "32"}, "days must be a whole number from 1 to 31, not 32"),
        ("gpu-time", {"days": "99999"}, "days must be a whole number of days, not '99999'"),
        ("gpu-time", {"user": "bob"}, "unknown query parameter 'user': use days"),
        ("gpu-time", {"1795": "7"}, "unknown query parameter '1795': use days"),
    ],
)
async def test_bad_parameters_are_400_with_one_line(jp_fetch, path, params, message):
    code, body = await fetch_error(jp_fetch, "singularity", "api", path, params=params)
    assert code == 400
    assert body["message"] == message


async def test_both_need_a_signed_in_user(jp_fetch):
    for path in ("timeline", "gpu-time"):
        response = await jp_fetch(
            "singularity", "api", path, headers={"Authorization": ""}, raise_error=False
        )
        assert response.code == 403, path


# ------------------------------------------------ other users' records, as an admin and not


@pytest.fixture
def others_records(singularity_app) -> dict:
    """bob's kernel in the pool (group physics) with a lease 10 minutes ago, and the server
    owner's own kernel with one; quotas that name the group physics and a daily limit."""
    service = singularity_app.service
    owner = singularity_app.pool.owner
    service.register_kernel("k-bob", Identity("bob", ("physics",)), notebook="bob/secret.ipynb")
    service.register_kernel("k-mine", owner, notebook="mine.ipynb")
    now = time.time()
    lease(service.ledger, "k-bob", "bob", now - 600, now - 300)
    lease(service.ledger, "k-mine", owner.user, now - 200, now - 100)
    service.set_quotas(Quotas.parse({"default": {"gpu_hours_per_day": 2}, "group:physics": {}}))
    return {"owner": owner.user}


async def test_an_admin_sees_every_notebook_and_everyones_gpu_time(get_json, others_records):
    owner = others_records["owner"]
    timeline = await get_json("singularity", "api", "timeline")
    assert {lease["user"] for lease in timeline["leases"]} == {"bob", owner}
    assert timeline["kernels"]["k-bob"] == {"user": "bob", "notebook": "bob/secret.ipynb"}
    assert timeline["kernels"]["k-mine"] == {"user": owner, "notebook": "mine.ipynb"}

    gpu_time = await get_json("singularity", "api", "gpu-time", params={"days": "3"})
    assert len(gpu_time["days"]) == 3
    assert gpu_time["days"][-1]["gpu_seconds"] == pytest.approx(100)
    assert gpu_time["gpu_seconds_per_day"] == 2 * 3600
    users = {u["user"]: u for u in gpu_time["users"]}
    assert users["bob"]["gpu_seconds_today"] == pytest.approx(300)
    assert users["bob"]["gpu_seconds"] == pytest.approx(300)
    assert users[owner]["gpu_seconds"] == pytest.approx(100)
    assert gpu_time["groups"] == [
        {
            "group": "physics",
            "members": ["bob"],
            "gpu_seconds_today": pytest.approx(300),
            "gpu_seconds": pytest.approx(300),
        }
    ]


class TestWithoutAdminPermission:
    @pytest.fixture
    def jp_server_config(self, jp_server_config):
        jp_server_config.ServerApp.authorizer_class = NoAdminAuthorizer
        return jp_server_config

    async def test_others_notebooks_and_totals_are_hidden(self, get_json, others_records):
        timeline = await get_json("singularity", "api", "timeline")
        # Who used the GPU when is everyone's to see; another user's notebook is not.
        assert {lease["kernel_id"] for lease in timeline["leases"]} == {"k-bob", "k-mine"}
        assert timeline["kernels"]["k-bob"] == {"user": "bob", "notebook": ""}
        assert timeline["kernels"]["k-mine"]["notebook"] == "mine.ipynb"
        assert "secret" not in json.dumps(timeline)

        gpu_time = await get_json("singularity", "api", "gpu-time")
        assert gpu_time["user"] == others_records["owner"]
        assert gpu_time["days"][-1]["gpu_seconds"] == pytest.approx(100)
        assert "users" not in gpu_time and "groups" not in gpu_time


# ------------------------------------------- the node broker's operations, identities vouched


async def test_node_operations_redact_for_users_and_not_for_admins(pool) -> None:  # noqa: F811
    frontend = pool.frontend
    await call(frontend, ALICE, "register_kernel", {"kernel_id": "ka", "notebook": "alice/a.ipynb"})
    await call(frontend, BOB, "register_kernel", {"kernel_id": "kb", "notebook": "bob/b.ipynb"})
    now = time.time()
    lease(pool.service.ledger, "ka", "alice", now - 900, now - 800)
    lease(pool.service.ledger, "kb", "bob", now - 700, now - 400)
    lease(pool.service.ledger, "kb", "bob", now - 2 * DAY, now - 2 * DAY + 60)
    await call(frontend, ADMIN, "set_quotas", {"config": {"group:students": {}, "group:staff": {}}})
    window = {"since": now - 3600, "until": now}

    seen_by_bob = await call(frontend, BOB, "timeline", window)
    assert seen_by_bob["kernels"] == {
        "ka": {"user": "alice", "notebook": ""},
        "kb": {"user": "bob", "notebook": "bob/b.ipynb"},
    }
    seen_by_admin = await call(frontend, ADMIN, "timeline", window)
    assert seen_by_admin["kernels"]["ka"]["notebook"] == "alice/a.ipynb"

    bobs = await call(frontend, BOB, "gpu_time", {"days": 7})
    assert [d["gpu_seconds"] for d in bobs["days"]][-3:] == [
        pytest.approx(60),
        0,
        pytest.approx(300),
    ]
    assert "users" not in bobs and "groups" not in bobs
    everyone = await call(frontend, ADMIN, "gpu_time", {"days": 7})
    assert [(u["user"], u["gpu_seconds"]) for u in everyone["users"]] == [
        ("alice", pytest.approx(100)),
        ("bob", pytest.approx(360)),
    ]
    groups = {g["group"]: g for g in everyone["groups"]}
    assert groups["students"]["members"] == ["alice", "bob"]
    assert groups["students"]["gpu_seconds_today"] == pytest.approx(400)
    assert groups["students"]["gpu_seconds"] == pytest.approx(460)
    assert groups["staff"]["members"] == [] and groups["staff"]["gpu_seconds"] == 0


@pytest.mark.parametrize(
    ("op", "args", "message"),
    [
        ("timeline", {"since": 0, "until": 8 * DAY}, "at most 168 (7 days)"),
        ("timeline", {"since": 5, "until": 1}, "since (5) must be before until (1)"),
        ("timeline", {"since": "0", "until": 1}, "argument 'since' has the wrong type"),
        ("timeline", {"since": 0}, "missing argument 'until'"),
        ("gpu_time", {"days": 400}, "days must be a whole number from 1 to 31, not 400"),
        ("gpu_time", {"days": 7.0}, "argument 'days' has the wrong type"),
        ("gpu_time", {"days": True}, "argument 'days' has the wrong type"),
    ],
)
async def test_node_operations_check_their_arguments(pool, op, args, message) -> None:  # noqa: F811
    with pytest.raises(PoolError) as refused:
        await call(pool.frontend, ALICE, op, args)
    assert refused.value.status == 400
    assert message in refused.value.message


async def test_a_server_joined_to_the_node_broker_answers_both(tmp_path: Path) -> None:
    with node_broker(tmp_path) as broker:
        joined = f"--SingularityApp.broker_url={broker.url}"
        with jupyter_server(tmp_path, tmp_path / "unused.sqlite", joined) as server:
            timeline = api(server.url, "singularity/api/timeline?since=0&until=3600")
            assert timeline["devices"] == [{"index": 0, "name": "Simulated GPU"}]
            assert (timeline["since"], timeline["until"]) == (0, 3600)
            gpu_time = api(server.url, "singularity/api/gpu-time?days=2")
            assert len(gpu_time["days"]) == 2
            with pytest.raises(urllib.error.HTTPError) as refused:
                api(server.url, "singularity/api/gpu-time?days=32")
            assert refused.value.code == 400
            assert json.load(refused.value)["message"] == (
                "days must be a whole number from 1 to 31, not 32"
            )
