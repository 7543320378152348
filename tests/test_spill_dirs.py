"""Kernel ids that reach paths, and the spill folders named after them (the hardening issue).

A client chooses the kernel id (``POST /api/kernels`` takes ``kernel_id``); the broker made it a
folder under ``spill_dir`` and deleted that folder with the kernel: ``.`` deleted every kernel's
spill files, ``..`` files next to the spill folder.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from tornado.httpclient import HTTPClientError

from jupyter_singularity.broker.spill_dirs import (
    MAX_KERNEL_ID,
    KernelIdError,
    SpillDirs,
    check_kernel_id,
)

HOSTILE_IDS = [
    ".",
    "..",
    "../x",
    "../../etc",
    "a/b",
    "/tmp/abs",
    "x\x00y",
    "",
    " ",
    "-rf",
    "a" * (MAX_KERNEL_ID + 1),
    "ok.then",
    "é",
]


@pytest.mark.parametrize("kernel_id", HOSTILE_IDS)
def test_hostile_kernel_ids_are_refused(kernel_id: str) -> None:
    with pytest.raises(KernelIdError, match="invalid kernel id"):
        check_kernel_id(kernel_id)


@pytest.mark.parametrize("kernel_id", [str(uuid.uuid4()), uuid.uuid4().hex, "k1", "a" * 128])
def test_well_formed_ids_are_accepted(kernel_id: str, tmp_path: Path) -> None:
    assert check_kernel_id(kernel_id) == kernel_id
    assert SpillDirs(tmp_path).of(kernel_id) == tmp_path / kernel_id


def test_a_non_string_id_is_refused() -> None:
    with pytest.raises(KernelIdError):
        check_kernel_id(42)


def test_remove_does_not_follow_a_link_out_of_the_spill_root(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "spill", tmp_path / "precious"
    root.mkdir()
    elsewhere.mkdir()
    (elsewhere / "data").write_text("keep me")
    (root / "k1").symlink_to(elsewhere)
    SpillDirs(root).remove("k1")
    assert not (root / "k1").exists()
    assert (elsewhere / "data").read_text() == "keep me"


def test_a_kernel_registered_again_keeps_its_spill_folder(tmp_path: Path) -> None:
    """A kernel rejoining a restarted node broker: its spilled state is in the folder."""
    folder = SpillDirs(tmp_path).make_for("k1", os.getuid())
    assert folder.stat().st_mode & 0o777 == 0o700
    (folder / "tensors-1-a-0.spill").write_bytes(b"state")
    folder.chmod(0o755)
    assert SpillDirs(tmp_path).make_for("k1", os.getuid()) == folder
    assert (folder / "tensors-1-a-0.spill").read_bytes() == b"state"
    assert folder.stat().st_mode & 0o777 == 0o700


def test_another_users_spill_folder_is_refused_and_left_alone(tmp_path: Path) -> None:
    """Registering a kernel id that names another user's kernel (its broker restarted, its
    server not back yet) neither deletes nor takes that kernel's spilled state."""
    folder = tmp_path / "k1"
    folder.mkdir()
    (folder / "tensors-1-a-0.spill").write_bytes(b"state")
    with pytest.raises(KernelIdError, match="belongs to another user"):
        SpillDirs(tmp_path).make_for("k1", os.getuid() + 1)
    assert (folder / "tensors-1-a-0.spill").read_bytes() == b"state"


def test_a_link_in_place_of_a_spill_folder_is_replaced_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "precious"
    elsewhere.mkdir()
    (tmp_path / "spill").mkdir()
    (tmp_path / "spill" / "k1").symlink_to(elsewhere)
    folder = SpillDirs(tmp_path / "spill").make_for("k1", os.getuid())
    assert folder.is_dir() and not folder.is_symlink() and elsewhere.is_dir()


def _spill_folder(root: Path, kernel_id: str, writer_pid: int) -> Path:
    folder = root / kernel_id
    folder.mkdir(parents=True)
    (folder / f"tensors-{writer_pid}-0a1b2c3d-0.spill").write_bytes(b"x" * 1024)
    return folder


def test_sweep_removes_only_folders_of_kernels_that_no_longer_exist(tmp_path: Path) -> None:
    root = tmp_path / "spill"
    dead_pid, live_pid = 999_999_001, os.getpid()
    registered = _spill_folder(root, "registered", dead_pid)
    orphan = _spill_folder(root, "orphan", dead_pid)
    running = _spill_folder(root, "running", live_pid)  # its kernel may register again
    empty = root / "empty"
    empty.mkdir()
    foreign = root / "not.a.kernel"
    foreign.mkdir()

    removed = SpillDirs(root).sweep(keep={"registered"}, alive=lambda pid: pid == live_pid)

    assert sorted(removed) == ["empty", "orphan"]
    assert registered.is_dir() and running.is_dir() and foreign.is_dir()
    assert not orphan.exists() and not empty.exists()


def test_sweep_leaves_young_folders_for_later(tmp_path: Path) -> None:
    root = tmp_path / "spill"
    _spill_folder(root, "new", 999_999_001)
    assert SpillDirs(root).sweep(keep=(), alive=lambda pid: False, min_age=600) == []
    assert SpillDirs(root).sweep(keep=(), alive=lambda pid: False) == ["new"]


def test_sweep_of_a_missing_root_is_nothing(tmp_path: Path) -> None:
    assert SpillDirs(tmp_path / "absent").sweep(keep=(), alive=lambda pid: False) == []


# ---------------------------------------------------------------- through the server's REST API


@pytest.mark.parametrize(
    "kernel_id", [".", "..", "../x", "/tmp/singularity-abs", "x\x00y", "k" * 300]
)
@pytest.mark.faults
async def test_post_kernels_refuses_hostile_ids_and_deletes_nothing(
    jp_fetch, singularity_app, get_pool, kernel_id: str
) -> None:
    spill_root = Path(singularity_app.spill_dir)
    other = _spill_folder(spill_root, "another-kernel", os.getpid())
    beside = spill_root.parent / "beside-the-spill-folder"
    beside.write_text("precious")

    with pytest.raises(HTTPClientError) as info:
        await jp_fetch("api", "kernels", method="POST", body=json.dumps({"kernel_id": kernel_id}))

    assert info.value.code == 400
    assert b"invalid kernel id" in info.value.response.body
    assert (other / f"tensors-{os.getpid()}-0a1b2c3d-0.spill").is_file()
    assert beside.read_text() == "precious"
    assert (await get_pool())["kernels"] == []
    assert json.loads((await jp_fetch("api", "kernels")).body) == []
