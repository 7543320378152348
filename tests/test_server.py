"""The server extension through a real jupyter_server: REST, auth, quotas, metrics, events."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from jupyter_client.provisioning import KernelProvisionerFactory
from jupyter_server.auth import Authorizer, IdentityProvider, User
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import HTTPClientError

from jupyter_singularity.broker import quota_file
from jupyter_singularity.broker.quotas import Quotas
from jupyter_singularity.broker.settings import inventory_line
from jupyter_singularity.devices import default_simulated_spec, usable_memory
from jupyter_singularity.devices.nvml import NvmlInventory
from jupyter_singularity.server.app import PROVISIONER_NAME, ConfigError, SingularityApp
from jupyter_singularity.server.events import KERNEL_STATE_SCHEMA
from jupyter_singularity.server.handlers import default_handlers

REPO_ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30

ENDPOINTS = [
    ("GET", ("singularity", "api", "pool")),
    ("GET", ("singularity", "api", "me")),
    ("GET", ("singularity", "api", "kernels", "some-kernel")),
    ("POST", ("singularity", "api", "kernels", "some-kernel", "offload")),
    ("POST", ("singularity", "api", "kernels", "some-kernel", "restore")),
    ("POST", ("singularity", "api", "kernels", "some-kernel", "pin")),
    ("GET", ("singularity", "api", "quota")),
    ("GET", ("singularity", "api", "quotas")),
    ("PUT", ("singularity", "api", "quotas")),
    ("GET", ("singularity", "api", "usage")),
    ("GET", ("singularity", "metrics")),
]


class NoAdminAuthorizer(Authorizer):
    """Everything but the pool's admin permission."""

    def is_authorized(self, handler, user, action, resource) -> bool:
        return resource != "singularity-admin"


class NamedIdentityProvider(IdentityProvider):
    """Token requests sign in as "grace" (by default each gets an anonymous random name)."""

    def generate_anonymous_user(self, handler) -> User:
        return User(username="grace", name="Grace", display_name="Grace")


async def fetch_error(jp_fetch, *parts, **kwargs) -> tuple[int, dict]:
    """Fetch something that must fail; returns the status and the JSON error body."""
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch(*parts, **kwargs)
    body = info.value.response.body if info.value.response is not None else b""
    return info.value.code, json.loads(body) if body else {}


def strict_json(body: bytes) -> Any:
    """JSON as a browser's JSON.parse reads it: ``NaN`` and ``Infinity`` are not JSON."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(body, parse_constant=refuse)


def fake_kernel(app, kernel_id: str = "fake-kernel") -> str:
    """A kernel registered in the pool without a process (what the provisioner does first)."""
    app.service.register_kernel(kernel_id, app.pool.owner)
    return kernel_id


# ------------------------------------------------------------------------------------- pool


async def test_pool_shows_two_simulated_devices(get_pool):
    pool = await get_pool()
    assert [d["index"] for d in pool["devices"]] == [0, 1]
    assert all(d["total_bytes"] == 16 * GiB for d in pool["devices"])
    assert all(d["booked_bytes"] == 0 for d in pool["devices"])
    assert all(d["used_bytes"] is None for d in pool["devices"])  # simulated: no driver figures
    assert pool["inventory"] == {"kind": "simulated", "simulated": True, "reason": ""}
    assert pool["kernels"] == []
    assert pool["queue"] == []


async def test_inventory_line(singularity_app):
    option = "jupyter lab --SingularityApp.devices"
    assert inventory_line(singularity_app.pool.opened.inventory, option) == (
        "jupyter-singularity: using 2 simulated devices (16.0 GiB each); no real GPU is used"
    )
    line = inventory_line(NvmlInventory([], {}, reason="no NVIDIA driver found"), option)
    spec, _ = default_simulated_spec(usable_memory())
    assert line == (
        "jupyter-singularity: no NVIDIA GPU found (no NVIDIA driver found); the pool is empty. "
        f"Try simulated devices: jupyter lab --SingularityApp.devices={spec}"
    )


async def test_settings_are_parsed(singularity_app, tmp_path):
    assert singularity_app.host_memory_limit_bytes == usable_memory() // 2
    assert Path(singularity_app.spill_dir).is_dir()
    policy = singularity_app.service.core.policy
    assert policy.migration is False  # off until a run on two real GPUs has checked it
    # Pinned pools: none on simulated devices; all of them within host_memory_limit by default.
    assert policy.pinned_per_kernel == 0
    assert policy.pinned_total == singularity_app.host_memory_limit_bytes


async def test_kernel_provisioner_is_the_default_while_running(singularity_app, get_json):
    factory = KernelProvisionerFactory.instance()
    assert factory.default_provisioner_name == PROVISIONER_NAME
    assert PROVISIONER_NAME in factory.provisioners
    # Kernel specs stay listed: the provisioner they now default to is available.
    assert "python3" in (await get_json("api", "kernelspecs"))["kernelspecs"]
    await singularity_app.stop_extension()
    assert factory.default_provisioner_name == "local-provisioner"


async def test_me_says_who_asks_and_that_the_default_authorizer_makes_an_admin(
    get_json, singularity_app
):
    me = await get_json("singularity", "api", "me")
    # A token-only server knows no user names: who asks is its owner.
    owner = singularity_app.pool.owner.user
    assert me == {"user": owner, "username": owner, "admin": True}
    # "Mine" in the client: the kernels whose record carries this user.
    kernel_id = fake_kernel(singularity_app)
    record = await get_json("singularity", "api", "kernels", kernel_id)
    assert record["user"] == me["user"]


async def test_unknown_kernel_is_404(jp_fetch):
    code, body = await fetch_error(jp_fetch, "singularity", "api", "kernels", "no-such-kernel")
    assert code == 404
    assert "no-such-kernel" in body["message"]
    code, body = await fetch_error(
        jp_fetch,
        "singularity",
        "api",
        "kernels",
        "no-such-kernel",
        "offload",
        method="POST",
        body="",
    )
    assert code == 404


# ------------------------------------------------------------------------------------- auth


@pytest.mark.parametrize(("method", "parts"), ENDPOINTS)
async def test_requests_without_token_are_refused(jp_fetch, method, parts):
    body = None if method == "GET" else "{}"
    code, _ = await fetch_error(
        jp_fetch, *parts, method=method, body=body, headers={"Authorization": ""}
    )
    assert code in (401, 403)


async def test_every_handler_method_requires_authentication(jp_serverapp):
    for pattern, handler in default_handlers:
        assert jp_serverapp.web_app._check_handler_auth(pattern, handler) == []


def test_server_starts_without_auth_warnings_for_our_handlers(
    jp_configurable_serverapp, jp_server_config
):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        jp_configurable_serverapp(config=jp_server_config)
    ours = [str(w.message) for w in record if "singularity" in str(w.message).lower()]
    assert ours == []


# --------------------------------------------------------------------------- kernel actions


async def test_kernel_record_and_actions(jp_fetch, get_json, singularity_app):
    kernel_id = fake_kernel(singularity_app)
    record = await get_json("singularity", "api", "kernels", kernel_id)
    assert record["state"] == "cold"
    assert record["user"] == singularity_app.pool.owner.user
    assert record["events"][0]["new_state"] == "cold"

    pinned = await get_json(
        "singularity", "api", "kernels", kernel_id, "pin", method="POST", body='{"pinned": true}'
    )
    assert pinned["pinned"] is True

    for bad in ('{"pinned": "yes"}', "[]", "{}"):
        code, body = await fetch_error(
            jp_fetch, "singularity", "api", "kernels", kernel_id, "pin", method="POST", body=bad
        )
        assert code == 400, bad
        assert "pinned" in body["message"]

    code, _ = await fetch_error(jp_fetch, "singularity", "api", "kernels", kernel_id, "offload")
    assert code == 405

    code, body = await fetch_error(
        jp_fetch, "singularity", "api", "kernels", kernel_id, "offload", method="POST", body=""
    )
    assert code == 409
    assert "cold" in body["message"]
    code, body = await fetch_error(
        jp_fetch, "singularity", "api", "kernels", kernel_id, "restore", method="POST", body=""
    )
    assert code == 409
    assert "nothing to restore" in body["message"]


async def test_my_quota(get_json, singularity_app):
    quota = await get_json("singularity", "api", "quota")
    assert quota["user"] == singularity_app.pool.owner.user
    assert quota["limits"]["gpu_memory"] is None
    assert quota["usage"]["gpu_seconds_today"] == 0


async def test_usage(jp_fetch, get_json):
    usage = await get_json("singularity", "api", "usage")
    assert usage["since"] <= usage["until"]
    assert usage["until"] - usage["since"] <= 86400
    assert usage["users"] == [] and usage["leases"] == []
    usage = await get_json("singularity", "api", "usage", params={"since": "0", "until": "10"})
    assert (usage["since"], usage["until"]) == (0, 10)
    code, body = await fetch_error(jp_fetch, "singularity", "api", "usage", params={"since": "x"})
    assert code == 400 and "since" in body["message"]
    code, body = await fetch_error(
        jp_fetch, "singularity", "api", "usage", params={"since": "10", "until": "5"}
    )
    assert code == 400


# ------------------------------------------------------------------------------------ quotas


async def test_admin_puts_quotas(jp_fetch, get_json):
    quotas = {
        "default": {"gpu_memory": "8GiB", "gpu_hours_per_day": 2},
        "user:ann": {"priority": 2},
    }
    model = await get_json("singularity", "api", "quotas", method="PUT", body=json.dumps(quotas))
    assert model["source"] == "config" and model["error"] is None
    expected = {
        "default": {"gpu_memory": 8 * GiB, "gpu_seconds_per_day": 7200.0},
        "user:ann": {"priority": 2.0},
    }
    assert model["quotas"] == expected
    assert (await get_json("singularity", "api", "quotas"))["quotas"] == expected
    mine = await get_json("singularity", "api", "quota")
    assert mine["limits"]["gpu_memory"] == 8 * GiB


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"default": {"gpu_mem": "8GiB"}}, "unknown resource 'gpu_mem'"),
        ({"default": {"gpu_memory": "lots"}}, "invalid size 'lots'"),
        ({"users:bob": {}}, "quota key 'users:bob'"),
        (["default"], "JSON object"),
    ],
)
async def test_invalid_quotas_are_400(jp_fetch, get_json, body, message):
    code, error = await fetch_error(
        jp_fetch, "singularity", "api", "quotas", method="PUT", body=json.dumps(body)
    )
    assert code == 400
    assert message in error["message"]
    assert (await get_json("singularity", "api", "quotas"))["quotas"] == {}


@pytest.mark.parametrize(
    "body",
    [
        '{"default": {"priority": 1e999}}',
        '{"default": {"gpu_seconds_per_day": 1e999}}',
        '{"default": {"gpu_hours_per_day": 1e306}}',  # finite in hours, not in seconds
        '{"user:ann": {"priority": -1e999}}',
        '{"group:x": {"priority": 1' + "0" * 400 + "}}",  # an integer too large for a float
    ],
)
async def test_non_finite_quotas_are_400_and_answers_stay_json(jp_fetch, body):
    code, error = await fetch_error(
        jp_fetch, "singularity", "api", "quotas", method="PUT", body=body
    )
    assert code == 400
    assert "must be a number >= 0 and finite (leave it out for no limit)" in error["message"]
    mine = strict_json((await jp_fetch("singularity", "api", "quota")).body)
    assert mine["limits"]["priority"] == 1.0
    assert strict_json((await jp_fetch("singularity", "api", "quotas")).body)["quotas"] == {}


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
async def test_nan_and_infinity_in_a_body_are_400(jp_fetch, literal):
    body = '{"default": {"priority": ' + literal + "}}"
    code, error = await fetch_error(
        jp_fetch, "singularity", "api", "quotas", method="PUT", body=body
    )
    assert code == 400
    assert error["message"] == f"the body is not valid JSON: {literal} is not a JSON number"


async def test_a_non_finite_number_never_reaches_a_json_answer(jp_fetch, singularity_app):
    """Should one get past validation, the answer is an error, never ``Infinity``."""
    singularity_app.service.set_quotas(Quotas({"default": {"priority": math.inf}}))  # unchecked
    code, _ = await fetch_error(jp_fetch, "singularity", "api", "quotas")
    assert code == 500


@pytest.mark.parametrize(
    ("method", "parts"), [(method, parts) for method, parts in ENDPOINTS if method != "GET"]
)
async def test_a_body_that_is_not_utf8_is_400_never_500(jp_fetch, singularity_app, method, parts):
    fake_kernel(singularity_app, "some-kernel")
    body = '{"pinned": true, "default": {"x": "é"}}'.encode("latin-1")
    response = await jp_fetch(*parts, method=method, body=body, raise_error=False)
    if parts[-1] in ("pin", "quotas"):  # the endpoints that read a body
        assert response.code == 400
        assert json.loads(response.body)["message"] == (
            f"the body must be JSON in UTF-8: byte {body.index('é'.encode('latin-1'))} is not UTF-8"
        )
    else:
        assert response.code != 500, response.body


class TestWithoutAdminPermission:
    @pytest.fixture
    def jp_server_config(self, jp_server_config):
        jp_server_config.ServerApp.authorizer_class = NoAdminAuthorizer
        return jp_server_config

    async def test_cannot_read_or_put_quotas(self, jp_fetch, get_json, singularity_app):
        code, body = await fetch_error(
            jp_fetch, "singularity", "api", "quotas", method="PUT", body='{"default": {}}'
        )
        assert code == 403
        assert "admin" in body["message"]
        assert singularity_app.service.quotas().to_dict() == {}
        code, body = await fetch_error(jp_fetch, "singularity", "api", "quotas")
        assert code == 403 and "every user's quotas" in body["message"]
        # Their own limits stay readable.
        assert "limits" in await get_json("singularity", "api", "quota")

    async def test_acts_on_own_kernels_only(self, jp_fetch, get_json, singularity_app):
        kernel_id = fake_kernel(singularity_app)
        await get_json(
            "singularity",
            "api",
            "kernels",
            kernel_id,
            "pin",
            method="POST",
            body='{"pinned": true}',
        )
        singularity_app.pool.owner = dataclasses.replace(
            singularity_app.pool.owner, user="someone-else"
        )
        code, body = await fetch_error(
            jp_fetch,
            "singularity",
            "api",
            "kernels",
            kernel_id,
            "pin",
            method="POST",
            body='{"pinned": false}',
        )
        assert code == 403
        assert "another user's kernel" in body["message"]
        assert (await get_json("singularity", "api", "kernels", kernel_id))["pinned"] is True

    async def test_reads_own_usage_only(self, jp_fetch, get_json, singularity_app):
        owner = singularity_app.pool.owner.user
        await get_json("singularity", "api", "usage", params={"user": owner})
        await get_json("singularity", "api", "usage")
        code, _ = await fetch_error(
            jp_fetch, "singularity", "api", "usage", params={"user": f"not-{owner}"}
        )
        assert code == 403


class TestMeWithoutAdminPermission:
    @pytest.fixture
    def jp_server_config(self, jp_server_config):
        jp_server_config.ServerApp.authorizer_class = NoAdminAuthorizer
        jp_server_config.ServerApp.identity_provider_class = NamedIdentityProvider
        return jp_server_config

    async def test_me_is_not_an_admin(self, get_json, singularity_app):
        me = await get_json("singularity", "api", "me")
        assert me == {"user": singularity_app.pool.owner.user, "username": "grace", "admin": False}


# -------------------------------------------------------------------------------- quota file


def write_quota_file(path: Path, text: str) -> None:
    """Write a new file and rename it over, as editors do (the watcher reads in a thread of its
    own, which could see a file being written in place half-written), moving the mtime on so that
    coarse file-system clocks still show a change."""
    old = path.stat().st_mtime_ns if path.exists() else 0
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    stamp = max(new.stat().st_mtime_ns, old + 1_000_000_000)
    os.utime(new, ns=(stamp, stamp))
    new.replace(path)


class TestQuotaFile:
    @pytest.fixture
    def quota_path(self, tmp_path: Path) -> Path:
        path = tmp_path / "quotas.yaml"
        path.write_text("default:\n  gpu_memory: 4GiB\n")
        return path

    @pytest.fixture
    def singularity_config(self, singularity_config, quota_path):
        return {**singularity_config, "quota_file": str(quota_path), "quotas": {"default": {}}}

    async def test_reloads_and_reports_errors(
        self, get_json, singularity_app, quota_path, wait_for
    ):
        watcher = singularity_app.quota_watcher
        await watcher.stop()
        watcher.interval = 0.05
        watcher.start()

        async def quotas() -> dict:
            return await get_json("singularity", "api", "quotas")

        model = await quotas()
        assert model == {
            "quotas": {"default": {"gpu_memory": 4 * GiB}},
            "source": f"file:{quota_path}",
            "error": None,
        }

        write_quota_file(quota_path, "default:\n  gpu_memory: 6GiB\n")
        await wait_for(
            lambda: _matches(quotas, lambda m: m["quotas"]["default"]["gpu_memory"] == 6 * GiB),
            timeout=10,
        )

        write_quota_file(quota_path, "default:\n  gpu_memory: [unclosed\n")
        model = await wait_for(lambda: _matches(quotas, lambda m: m["error"]), timeout=10)
        assert "is not valid YAML" in model["error"] and str(quota_path) in model["error"]
        assert model["quotas"] == {"default": {"gpu_memory": 6 * GiB}}

        write_quota_file(quota_path, "default:\n  gpu_mem: 1GiB\n")
        model = await wait_for(
            lambda: _matches(quotas, lambda m: m["error"] and "gpu_mem'" in m["error"]), timeout=10
        )
        assert model["quotas"] == {"default": {"gpu_memory": 6 * GiB}}

        write_quota_file(quota_path, "user:ann:\n  max_resident_kernels: 1\n")
        model = await wait_for(lambda: _matches(quotas, lambda m: m["error"] is None), timeout=10)
        assert model["quotas"] == {"user:ann": {"max_resident_kernels": 1}}

    async def test_a_non_finite_quota_in_the_file_keeps_the_previous_quotas(
        self, jp_fetch, singularity_app, quota_path
    ):
        await singularity_app.quota_watcher.stop()  # only the check below looks at the file
        write_quota_file(quota_path, "default:\n  priority: .inf\n")
        assert await singularity_app.quota_watcher.check() is False
        model = strict_json((await jp_fetch("singularity", "api", "quotas")).body)
        assert "priority must be a number >= 0 and finite" in model["error"]
        assert model["quotas"] == {"default": {"gpu_memory": 4 * GiB}}

    @pytest.mark.timeout(90)  # before the fix, the first request after the FIFO never returned
    async def test_a_fifo_at_the_path_is_refused_and_the_server_keeps_answering(
        self, jp_fetch, singularity_app, quota_path, wait_for
    ):
        watcher = singularity_app.quota_watcher
        await watcher.stop()
        watcher.interval = 0.05
        quota_path.unlink()
        os.mkfifo(quota_path)  # opening it for reading waits for a writer, forever
        watcher.start()

        async def quotas() -> dict:
            return strict_json((await jp_fetch("singularity", "api", "quotas")).body)

        model = await wait_for(lambda: _matches(quotas, lambda m: m["error"]), timeout=30)
        assert model["error"] == (
            f"quota file {str(quota_path)!r} is a FIFO, not a regular file: nothing is read from it"
        )
        assert model["quotas"] == {"default": {"gpu_memory": 4 * GiB}}
        for _ in range(20):  # polls go on meanwhile; every request is answered
            response = await jp_fetch("singularity", "api", "pool", request_timeout=30)
            assert response.code == 200
            await asyncio.sleep(0.05)

    async def test_a_hung_read_reports_and_keeps_the_previous_quotas(
        self, jp_fetch, singularity_app, quota_path, monkeypatch
    ):
        """A read that never returns (a hung NFS mount, which cannot be made here: the loader is
        held instead) is given up after read_timeout; no second read starts meanwhile."""
        release, started = threading.Event(), []
        real_load = quota_file.load_quota_file

        def hung_load(path):
            started.append(path)
            release.wait(60)
            return real_load(path)

        monkeypatch.setattr(quota_file, "load_quota_file", hung_load)
        watcher = singularity_app.quota_watcher
        await watcher.stop()  # only the checks below look at the file
        watcher.read_timeout = 0.2
        write_quota_file(quota_path, "default:\n  gpu_memory: 6GiB\n")
        try:
            for _ in range(2):
                assert await watcher.check() is False
                model = strict_json((await jp_fetch("singularity", "api", "quotas")).body)
                assert model["error"] == (
                    f"reading quota file {str(quota_path)!r} did not finish within 0.2 s "
                    "(a hung file system?)"
                )
                assert model["quotas"] == {"default": {"gpu_memory": 4 * GiB}}
            assert len(started) == 1
        finally:
            release.set()
        watcher.read_timeout = 10
        assert await watcher.check() is True
        model = strict_json((await jp_fetch("singularity", "api", "quotas")).body)
        assert model == {
            "quotas": {"default": {"gpu_memory": 6 * GiB}},
            "source": f"file:{quota_path}",
            "error": None,
        }

    async def test_put_writes_the_file(self, get_json, quota_path):
        body = {"default": {"gpu_memory": "2GiB"}}
        model = await get_json("singularity", "api", "quotas", method="PUT", body=json.dumps(body))
        assert model["quotas"] == {"default": {"gpu_memory": 2 * GiB}}
        assert yaml.safe_load(quota_path.read_text()) == body
        mine = await get_json("singularity", "api", "quota")
        assert mine["limits"]["gpu_memory"] == 2 * GiB


async def _matches(fetch, predicate):
    model = await fetch()
    return model if predicate(model) else None


# ------------------------------------------------------------------------------- bad config


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            {"host_memory_limit": "lots"},
            "SingularityApp.host_memory_limit = 'lots': invalid size 'lots'",
        ),
        (
            {"pinned_memory_limit": "-1GiB"},
            "SingularityApp.pinned_memory_limit = '-1GiB'",
        ),
        (
            {"pinned_memory_total": "half"},
            "SingularityApp.pinned_memory_total = 'half': invalid size 'half'",
        ),
        ({"devices": "gpus:2"}, "SingularityApp.devices = 'gpus:2': unknown device spec"),
        (
            {"quotas": {"default": {"gpu_mem": "1GiB"}}},
            "SingularityApp.quotas: quota 'default': unknown resource 'gpu_mem'",
        ),
        ({"quota_file": "/no/such/quotas.yaml"}, "does not exist"),
        ({"idle_timeout": -5.0}, "SingularityApp.idle_timeout = -5.0"),
        ({"lease_keep": 2.0}, "SingularityApp.lease_keep = 2.0: must be a number of seconds from"),
        ({"lease_keep": math.nan}, "SingularityApp.lease_keep = nan: must be"),
        ({"offload_timeout": 0.0}, "SingularityApp.offload_timeout = 0.0: must be"),
        ({"lease_stall_timeout": float("inf")}, "SingularityApp.lease_stall_timeout = inf"),
        (
            {"quotas": {"default": {"priority": math.inf}}},
            "SingularityApp.quotas: quota 'default': priority must be a number >= 0 and finite",
        ),
        (
            {"devices": "simulated:1x99999999TiB"},
            "SingularityApp.devices = 'simulated:1x99999999TiB': a simulated device of "
            "99999999.0 TiB is larger than this machine's memory",
        ),
        (
            {"host_memory_limit": 1},
            "SingularityApp.host_memory_limit = 1: at least 1.0 MiB (the kernels move GPU "
            "state in pieces of 1 MiB and more; a bare number is bytes",
        ),
        ({"host_memory_limit": "1023KiB"}, "SingularityApp.host_memory_limit = '1023KiB': at"),
        (
            {"broker_url": "tcp://node:5555"},
            "SingularityApp.broker_url = 'tcp://node:5555': use the node broker's socket as "
            "unix:///path/to/broker.sock",
        ),
    ],
)
async def test_bad_config_fails_at_start(
    jp_configurable_serverapp, jp_server_config, setting, message
):
    jp_server_config.SingularityApp.update(setting)
    with pytest.raises(ConfigError) as info:
        jp_configurable_serverapp(config=jp_server_config)
    assert message in str(info.value)


@pytest.mark.parametrize("name", sorted(SingularityApp.class_own_traits(config=True)))
async def test_a_setting_of_the_wrong_type_is_named(
    jp_configurable_serverapp, jp_server_config, name
):
    """As a config file sets it; before, traitlets' error stopped loading half-way and the
    extension went on to fail on another setting (``spill_dir = ''``)."""
    jp_server_config.SingularityApp[name] = [1]  # no setting of the pool is a list
    with pytest.raises(ConfigError) as info:
        jp_configurable_serverapp(config=jp_server_config)
    assert str(info.value).startswith(f"SingularityApp.{name} = [1]: expected ")


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        (
            "--SingularityApp.idle_timeout=abc",
            "SingularityApp.idle_timeout = 'abc': expected a float",
        ),
        (
            "--SingularityApp.migration=maybe",
            "SingularityApp.migration = 'maybe': expected a boolean",
        ),
        ("--SingularityApp.quotas=x", "SingularityApp.quotas = 'x': expected a dict"),
    ],
)
async def test_a_command_line_setting_of_the_wrong_type_is_named(
    jp_configurable_serverapp, jp_server_config, argument, message
):
    with pytest.raises(ConfigError) as info:
        jp_configurable_serverapp(config=jp_server_config, argv=[argument])
    assert str(info.value) == message


def run_jupyter_server(
    tmp_path: Path, *arguments: str, config: str = ""
) -> subprocess.CompletedProcess:
    """``jupyter server`` with the extension on simulated devices, as a person starts it; with
    ``config``, a jupyter_server_config.py of that text in its config dir."""
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    if config:
        (tmp_path / "config").mkdir()
        (tmp_path / "config" / "jupyter_server_config.py").write_text(config)
    else:
        env["JUPYTER_NO_CONFIG"] = "1"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter_server",
            "--no-browser",
            "--allow-root",
            "--port=0",
            "--ServerApp.jpserver_extensions={'jupyter_singularity': True}",
            "--SingularityApp.devices=simulated:2x16GiB",
            *arguments,
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_jupyter_server_exits_with_a_readable_message(tmp_path):
    """The real command line: the server stops at start and says which setting is wrong."""
    result = run_jupyter_server(tmp_path, "--SingularityApp.host_memory_limit=lots")
    assert result.returncode == 1, result.stderr
    assert (
        "jupyter-singularity cannot start: SingularityApp.host_memory_limit = 'lots': "
        "invalid size 'lots'" in result.stderr
    )
    assert "is running at" not in result.stderr


def test_a_wrong_type_in_a_config_file_stops_the_server_naming_that_setting(tmp_path):
    config = (
        f"c.SingularityApp.spill_dir = {str(tmp_path / 'spill')!r}\n"
        "c.SingularityApp.idle_timeout = 'abc'\n"
    )
    result = run_jupyter_server(tmp_path, config=config)
    assert result.returncode == 1, result.stderr
    assert (
        "jupyter-singularity cannot start: SingularityApp.idle_timeout = 'abc': expected a float"
        in result.stderr
    )
    assert "spill_dir" not in result.stderr
    assert "is running at" not in result.stderr


# ----------------------------------------------------------------------------------- metrics


async def test_metrics_parse_as_prometheus_text(jp_fetch, singularity_app):
    fake_kernel(singularity_app)
    response = await jp_fetch("singularity", "metrics")
    assert response.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.body.decode())}

    def value(name: str, **labels: str) -> float:
        for sample in families[name].samples:
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
        raise AssertionError(f"no sample {name} {labels}")

    assert value("singularity_devices") == 2
    assert value("singularity_device_memory_total_bytes", device="1") == 16 * GiB
    assert value("singularity_device_memory_booked_bytes", device="0") == 0
    assert value("singularity_kernels", state="cold") == 1
    assert value("singularity_kernels", state="running") == 0
    assert value("singularity_queue_length") == 0
    assert value("singularity_offloaded_bytes", tier="host") == 0
    assert value("singularity_offloaded_bytes", tier="disk") == 0
    assert value("singularity_inventory_info", kind="simulated") == 1
    assert "singularity_gpu_seconds_today" in families


# ------------------------------------------------------------------------------------ events


async def test_kernel_state_events_when_a_kernel_comes_and_goes(
    jp_fetch, jp_ws_fetch, start_kernel, wait_in_pool, wait_for
):
    ws = await jp_ws_fetch("api", "events", "subscribe")
    try:

        async def next_state(kernel_id: str) -> dict:
            while True:
                message = json.loads(await ws.read_message())
                if (
                    message["schema_id"] == KERNEL_STATE_SCHEMA
                    and message["kernel_id"] == kernel_id
                ):
                    return message

        kernel_id = await start_kernel()
        event = await asyncio.wait_for(next_state(kernel_id), timeout=60)
        assert (event["old"], event["new"]) == (None, "cold")
        assert event["reason"] and event["user"]
        pool = await wait_in_pool(kernel_id)
        assert [k["kernel_id"] for k in pool["kernels"]] == [kernel_id]

        # Connecting as JupyterLab does returns once the kernel answers: it is fully up.
        channels = await jp_ws_fetch("api", "kernels", kernel_id, "channels")
        channels.close()

        async def disconnected() -> bool:
            model = json.loads((await jp_fetch("api", "kernels", kernel_id)).body)
            return model["connections"] == 0

        await wait_for(disconnected, timeout=30)
        await jp_fetch("api", "kernels", kernel_id, method="DELETE")
        while event["new"] is not None:
            event = await asyncio.wait_for(next_state(kernel_id), timeout=60)
        assert event["reason"] == "kernel shut down"
        await wait_in_pool(kernel_id, present=False)
    finally:
        ws.close()
