"""A kernel's record follows what users do to it: pins and unpins (with an event and a trace in
the record), notebooks renamed or moved in JupyterLab. Real server, real kernels."""

from __future__ import annotations

import asyncio
import json

import pytest
from jupyter_server.auth import IdentityProvider, User

from jupyter_singularity.server.events import PIN_SCHEMA, schema_path


@pytest.fixture
async def kernel(start_kernel, wait_in_pool) -> str:
    kernel_id = await start_kernel()
    await wait_in_pool(kernel_id)
    return kernel_id


@pytest.fixture
def heard(jp_serverapp):
    """``heard(schema_id)`` -> the list of events the server's event logger emits with that schema
    from now on, as jupyter_events delivers them to a listener (validated against the schema)."""
    event_logger = jp_serverapp.event_logger
    added = []

    def listen(schema_id: str) -> list[dict]:
        events: list[dict] = []

        async def listener(logger, schema_id: str, data: dict) -> None:
            events.append(data)

        event_logger.add_listener(schema_id=schema_id, listener=listener)
        added.append((schema_id, listener))
        return events

    yield listen
    for schema_id, listener in added:
        event_logger.remove_listener(schema_id=schema_id, listener=listener)


async def _until(probe, timeout: float = 30.0):
    async def poll():
        while not (result := probe()):
            await asyncio.sleep(0.05)
        return result

    return await asyncio.wait_for(poll(), timeout)


# ---------------------------------------------------------------------------------------- pins


def test_pin_schema_is_versioned_and_registered(jp_serverapp):
    assert PIN_SCHEMA == "https://events.jupyter.org/jupyter_singularity/pin/v1"
    assert schema_path(PIN_SCHEMA).name == "v1.yaml"
    assert PIN_SCHEMA in jp_serverapp.event_logger.schemas.schema_ids


async def test_pin_and_unpin_through_rest_emit_an_event_and_show_in_the_record(
    kernel, get_json, singularity_app, heard
):
    pins = heard(PIN_SCHEMA)
    owner = singularity_app.service.owner
    url = ("singularity", "api", "kernels", kernel, "pin")

    record = await get_json(*url, method="POST", body=json.dumps({"pinned": True}))
    assert record["pinned"] is True
    await _until(lambda: pins)
    assert pins == [
        {
            "kernel_id": kernel,
            "user": owner,
            "pinned": True,
            # A shared-token server knows no user by name: the owner is who pinned it.
            "by": owner,
            "state": "cold",
            "reason": f"pinned by {owner}",
        }
    ]
    newest = record["events"][0]
    assert (newest["old_state"], newest["new_state"], newest["reason"]) == (
        "cold",
        "cold",
        f"pinned by {owner}",
    )

    # Pinning a pinned kernel changes nothing: no event, no record.
    again = await get_json(*url, method="POST", body=json.dumps({"pinned": True}))
    assert [e["reason"] for e in again["events"]].count(f"pinned by {owner}") == 1

    record = await get_json(*url, method="POST", body=json.dumps({"pinned": False}))
    assert record["pinned"] is False
    await _until(lambda: len(pins) >= 2)
    assert [(e["pinned"], e["reason"]) for e in pins] == [
        (True, f"pinned by {owner}"),
        (False, f"unpinned by {owner}"),
    ]
    fetched = await get_json("singularity", "api", "kernels", kernel)
    assert [e["reason"] for e in fetched["events"][:2]] == [
        f"unpinned by {owner}",
        f"pinned by {owner}",
    ]


class NamedUsers(IdentityProvider):
    """Like JupyterHub's identity provider: whoever presents the token is a user known by name."""

    async def get_user(self, handler):
        user = await self._get_user(handler)
        return None if user is None else User("hub-admin")


async def test_a_user_known_by_name_is_who_pinned(kernel, jp_serverapp, get_json, heard):
    settings = jp_serverapp.web_app.settings
    settings["identity_provider"] = NamedUsers(
        parent=jp_serverapp, token=jp_serverapp.identity_provider.token
    )
    pins = heard(PIN_SCHEMA)
    record = await get_json(
        "singularity", "api", "kernels", kernel, "pin", method="POST", body='{"pinned": true}'
    )
    assert record["events"][0]["reason"] == "pinned by hub-admin"
    await _until(lambda: pins)
    assert pins[0]["by"] == "hub-admin"


async def test_pin_from_the_notebook_emits_an_event_and_shows_in_the_log(
    kernel, run, get_json, singularity_app, heard
):
    pins = heard(PIN_SCHEMA)
    owner = singularity_app.service.owner
    status, out, _ = await run(kernel, "%singularity pin")
    assert status == "ok" and "kernel pinned" in out, out
    await _until(lambda: pins)
    assert (pins[0]["kernel_id"], pins[0]["pinned"], pins[0]["by"]) == (kernel, True, owner)

    status, out, _ = await run(kernel, "%singularity log")
    assert status == "ok", out
    assert f"cold → cold  (pinned by {owner})" in out, out
    record = await get_json("singularity", "api", "kernels", kernel)
    assert record["pinned"] is True and record["events"][0]["reason"] == f"pinned by {owner}"
