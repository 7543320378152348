"""A kernel's record follows what users do to it: pins and unpins (with an event and a trace in
the record), notebooks renamed or moved in JupyterLab. Real server, real kernels."""

from __future__ import annotations

import asyncio
import json
import os

import nbformat
import pytest
from cells import record_of
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
    owner = singularity_app.pool.owner.user
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
    owner = singularity_app.pool.owner.user
    status, out, _ = await run(kernel, "%singularity pin")
    assert status == "ok" and "kernel pinned" in out, out
    await _until(lambda: pins)
    assert (pins[0]["kernel_id"], pins[0]["pinned"], pins[0]["by"]) == (kernel, True, owner)

    status, out, _ = await run(kernel, "%singularity log")
    assert status == "ok", out
    assert f"cold → cold  (pinned by {owner})" in out, out
    record = await get_json("singularity", "api", "kernels", kernel)
    assert record["pinned"] is True and record["events"][0]["reason"] == f"pinned by {owner}"


# ------------------------------------------------------------------------------- notebook paths


@pytest.fixture
def notebook_session(jp_fetch, wait_in_pool):
    """``await notebook_session(path, name)`` creates the notebook through the contents API and
    opens a session on it as JupyterLab does; returns the kernel id once it is in the pool (and
    records the session's id in ``notebook_session.ids``)."""

    async def open_session(path: str, name: str | None) -> str:
        body = {"type": "notebook", "format": "json", "content": nbformat.v4.new_notebook()}
        await jp_fetch("api", "contents", *path.split("/"), method="PUT", body=json.dumps(body))
        session = {"path": path, "type": "notebook", "kernel": {"name": "python3"}}
        if name is not None:
            session["name"] = name
        response = await jp_fetch("api", "sessions", method="POST", body=json.dumps(session))
        model = json.loads(response.body)
        kernel_id = model["kernel"]["id"]
        open_session.ids[kernel_id] = model["id"]
        await wait_in_pool(kernel_id)
        return kernel_id

    open_session.ids = {}
    return open_session


async def test_notebook_path_follows_a_rename_and_a_folder_move(
    jp_fetch, jp_serverapp, get_pool, wait_for, notebook_session
):
    root = jp_serverapp.kernel_manager.root_dir
    for folder in ("nb", "nbx"):
        await jp_fetch("api", "contents", folder, method="PUT", body='{"type": "directory"}')
    # JupyterLab names the session after the file: the kernel records the file's path on disk.
    on_disk = await notebook_session("nb/a.ipynb", "a.ipynb")
    # A session opened without a name: the kernel records the API path.
    api_path = await notebook_session("nbx/c.ipynb", None)

    async def notebooks() -> dict[str, str]:
        pool = await get_pool()
        return {k: record_of(pool, k)["notebook"] for k in (on_disk, api_path)}

    assert await notebooks() == {
        on_disk: os.path.join(root, "nb", "a.ipynb"),
        api_path: "nbx/c.ipynb",
    }

    async def shows(expected: dict[str, str]):
        async def probe():
            return await notebooks() == expected

        await wait_for(probe, timeout=10)

    # Rename the notebook in JupyterLab: PATCH /api/contents/{path} with the new path.
    await jp_fetch(
        "api", "contents", "nb", "a.ipynb", method="PATCH", body=json.dumps({"path": "nb/b.ipynb"})
    )
    await shows({on_disk: os.path.join(root, "nb", "b.ipynb"), api_path: "nbx/c.ipynb"})

    # Rename its folder: every notebook under it moves; "nbx" only shares a prefix and stays.
    await jp_fetch("api", "contents", "nb", method="PATCH", body=json.dumps({"path": "work"}))
    await shows({on_disk: os.path.join(root, "work", "b.ipynb"), api_path: "nbx/c.ipynb"})

    # Move the other notebook into another folder.
    await jp_fetch(
        "api",
        "contents",
        "nbx",
        "c.ipynb",
        method="PATCH",
        body=json.dumps({"path": "work/c.ipynb"}),
    )
    await shows({on_disk: os.path.join(root, "work", "b.ipynb"), api_path: "work/c.ipynb"})


async def test_a_renamed_notebook_keeps_its_new_path_when_its_kernel_restarts(
    jp_fetch, jp_serverapp, singularity_app, get_pool, wait_for, notebook_session
):
    """JupyterLab renames the file, then moves its session to the new path (PATCH
    /api/sessions/{id}); the restarted kernel joins the pool again under the new path."""
    root = jp_serverapp.kernel_manager.root_dir
    kernel_id = await notebook_session("a.ipynb", "a.ipynb")
    renamed = os.path.join(root, "b.ipynb")
    await jp_fetch("api", "contents", "a.ipynb", method="PATCH", body='{"path": "b.ipynb"}')
    await jp_fetch(
        "api",
        "sessions",
        notebook_session.ids[kernel_id],
        method="PATCH",
        body=json.dumps({"path": "b.ipynb", "name": "b.ipynb"}),
    )

    def joins() -> int:
        events = singularity_app.service.ledger.events(kernel_id=kernel_id, limit=100)
        return sum(1 for e in events if e["old_state"] is None)

    async def shows_renamed(times_joined: int):
        async def probe() -> bool:
            record = record_of(await get_pool(), kernel_id)
            return record is not None and record["notebook"] == renamed and joins() == times_joined

        await wait_for(probe, timeout=60)

    await shows_renamed(1)
    await jp_fetch("api", "kernels", kernel_id, "restart", method="POST", body="")
    await shows_renamed(2)
