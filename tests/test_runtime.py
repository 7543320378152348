"""The kernel runtime end to end: gated cells, offload and restore between kernels, the queue,
quotas and ``%%singularity``, through a real jupyter_server and real kernels on one simulated GPU.

The device (256 MiB) fits one kernel's state (a model with Adam state, ~150 MiB), never two. On
simulated devices a kernel's large CPU tensors are its "GPU" state and its first ``import torch``
is its first GPU use (see jupyter_singularity.kernel.gate).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

import pytest
from cells import record_of

MiB = 1 << 20
GiB = 1 << 30

# A model with Adam state: ~34 MiB of parameters, as much again in gradients, twice that in the
# optimizer's moments (~135 MiB in storages of >= 1 MiB), plus a 16 MiB tensor held by a closure
# and a view of it. ``state_digest`` covers every byte of it.
BUILD_STATE = """
import ctypes, hashlib, torch
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 1024)
)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
data = torch.randn(64, 1024)

def train_step():
    opt.zero_grad()
    loss = model(data).pow(2).mean()
    loss.backward()
    opt.step()
    return loss.item()

def make_closure():
    big = torch.arange(4 * 1024 * 1024, dtype=torch.float32)
    return lambda: big
held = make_closure()
view = held()[1024:2048]

def state_digest():
    h = hashlib.sha256()
    tensors = [*model.parameters(), *(p.grad for p in model.parameters())]
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    tensors += [held(), view]
    for t in tensors:
        c = t.detach().contiguous()
        # Raw bytes without numpy: .numpy() would make the storage non-resizable for good.
        h.update(ctypes.string_at(c.data_ptr(), c.numel() * c.element_size()))
    return h.hexdigest()

first_loss = train_step()
print("digest", state_digest())
"""

NEXT_STEP = """
print("digest", state_digest())
print("same objects", view._base is held() or view.untyped_storage().data_ptr() == held().untyped_storage().data_ptr())
print("loss", repr(train_step()))
"""

REFERENCE_RUN = BUILD_STATE + NEXT_STEP


@pytest.fixture
def singularity_devices() -> str:
    """One device that holds one kernel's state at a time."""
    return "simulated:1x256MiB"


def value(text: str, key: str) -> str:
    for line in text.splitlines():
        if line.startswith(key + " "):
            return line[len(key) + 1 :].strip()
    raise AssertionError(f"no {key!r} line in:\n{text}")


async def test_kernels_take_turns_on_one_device_and_state_survives(
    start_kernel, wait_in_pool, run, get_pool, get_json, state, jp_fetch
):
    k1, k2 = await start_kernel(), await start_kernel()
    await wait_in_pool([k1, k2])

    # Kernel 1 builds its state; its first import of torch took a lease.
    status, out, _ = await run(k1, BUILD_STATE)
    assert status == "ok", out
    digest_before = value(out, "digest")
    pool = await state(k1, "resident")
    one = record_of(pool, k1)
    assert one["device"] == 0 and 130 * MiB < one["gpu_bytes"] < 200 * MiB, one

    # Kernel 2's cell needs the device: kernel 1, idle, is offloaded to host memory.
    status, out, _ = await run(k2, REFERENCE_RUN)
    assert status == "ok", out
    reference_loss = value(out, "loss")
    pool = await state(
        k2, "resident"
    )  # the release is a message of its own: it may trail the reply
    one, two = record_of(pool, k1), record_of(pool, k2)
    assert one["state"] == "offloaded" and one["device"] is None, one
    assert one["host_bytes"] > 130 * MiB and one["gpu_bytes"] == 0, one
    assert two["state"] == "resident" and two["gpu_bytes"] > 130 * MiB, two

    # Kernel 1's next cell restores it bit-identically (showing the restore) and evicts kernel 2.
    status, out, messages = await run(k1, NEXT_STEP)
    assert status == "ok", out
    assert value(out, "digest") == digest_before
    assert value(out, "same objects") == "True"
    # The same loss as kernel 2's uninterrupted run of the same steps.
    assert value(out, "loss") == reference_loss
    # A wait line (kernel 2's eviction lasted 0.3 s, or the broker queued the cell) is cleared.
    if any(m["msg_type"] == "display_data" for m in messages):
        assert any(m["msg_type"] == "clear_output" for m in messages), "the line stayed"
    pool = await state(k1, "resident")
    one, two = record_of(pool, k1), record_of(pool, k2)
    assert one["state"] == "resident" and one["host_bytes"] == 0, one
    assert two["state"] == "offloaded" and two["host_bytes"] > 130 * MiB, two

    # The transfers are in the kernel's log, with bytes, durations and speeds.
    status, out, _ = await run(k1, "%singularity log")
    assert status == "ok", out
    assert "offloaded" in out and "restored" in out and "GB/s" in out, out
    assert "resident → offloading" in out and "restoring → running" in out, out
    # ... and in the broker's ledger, with the bytes and seconds the kernel measured.
    record = await get_json("singularity", "api", "kernels", k1)
    moved = {e["new_state"]: e for e in record["events"] if e["nbytes"]}
    assert moved["offloaded"]["nbytes"] > 130 * MiB and moved["offloaded"]["duration"] > 0, record
    assert moved["running"]["nbytes"] > 130 * MiB and moved["running"]["duration"] > 0, record

    # A cell that starts while its kernel is being offloaded waits for the offload, then restores.
    status, out, _ = await run(k1, 'print("digest", state_digest())')
    digest_now = value(out, "digest")
    restores = (await run(k1, "%singularity log"))[1].count("restored ")
    await jp_fetch("singularity", "api", "kernels", k1, "offload", method="POST", body="{}")
    status, out, _ = await run(k1, 'print("digest", state_digest())')
    assert status == "ok", out
    assert value(out, "digest") == digest_now
    assert (await run(k1, "%singularity log"))[1].count("restored ") == restores + 1
    await state(k1, "resident")

    # A cell started right after an explicit restore (the panel's button) runs once the state
    # is back, whether the restore is still queued or under way.
    await jp_fetch("singularity", "api", "kernels", k1, "offload", method="POST", body="{}")
    await state(k1, "offloaded")
    await jp_fetch("singularity", "api", "kernels", k1, "restore", method="POST", body="{}")
    status, out, _ = await run(k1, 'print("digest", state_digest())')
    assert status == "ok", out
    assert value(out, "digest") == digest_now
    await state(k1, "resident")


async def test_waiting_cell_is_queued_and_interrupt_leaves_the_queue(
    start_kernel, wait_in_pool, run, get_pool, state, jp_fetch, wait_for, tmp_path
):
    k1, k2 = await start_kernel(), await start_kernel()
    await wait_in_pool([k1, k2])
    for kernel_id in (k1, k2):
        status, out, _ = await run(kernel_id, "import time, torch")
        assert status == "ok", out

    marker = tmp_path / "ran"
    busy = asyncio.ensure_future(run(k2, "time.sleep(60)", timeout=90))
    await state(k2, "running")

    seen: list[dict] = []
    waiting = asyncio.ensure_future(
        run(k1, f"open({str(marker)!r}, 'w').close()", messages=seen, timeout=60)
    )

    async def queued():
        pool = await get_pool()
        return pool if any(q["kernel_id"] == k1 for q in pool["queue"]) else None

    pool = await wait_for(queued, timeout=20)
    entry = next(q for q in pool["queue"] if q["kernel_id"] == k1)
    assert entry["position"] == 1 and "busy" in entry["reason"], entry

    async def line_shown():
        texts = [
            m["content"]["data"]["text/plain"]
            for m in seen
            if m["msg_type"] in ("display_data", "update_display_data")
        ]
        return next((t for t in texts if "1st in the GPU queue" in t), None)

    line = await wait_for(line_shown, timeout=10)
    assert "waits for a GPU lease" in line and "busy" in line, line

    await jp_fetch("api", "kernels", k1, "interrupt", method="POST", body="")
    status, out, messages = await waiting
    assert status == "error"
    assert "left the queue" in out and "Traceback" not in out, out
    assert not marker.exists()
    assert any(m["msg_type"] == "clear_output" for m in messages)
    pool = await get_pool()
    assert pool["queue"] == [], pool["queue"]
    assert record_of(pool, k2)["state"] == "running"

    # The kernel still works: once kernel 2's cell ends, kernel 1's cells run again.
    await jp_fetch("api", "kernels", k2, "interrupt", method="POST", body="")
    status, _, _ = await busy
    assert status == "error"
    status, out, _ = await run(k1, "print(6 * 7)")
    assert status == "ok" and out.strip().endswith("42"), out
    pool = await state(k1, "resident")
    assert pool["queue"] == []


@pytest.mark.parametrize(
    "singularity_config", [{"lease_keep": 0}, {"lease_keep": 0.5}], indirect=True
)
async def test_a_cell_waiting_in_the_kernel_takes_a_lease_of_its_own(
    start_kernel, wait_in_pool, run, state, cell_text, singularity_config
):
    """A cell whose request waits in the kernel while the cell before it runs sends its acquire
    only once that cell released its lease: it takes a lease of its own, neither running under
    the one before nor losing its own midway (as it would if a release went out late). Where
    leases are kept between cells it may run under the one the cell before kept, but then under
    that one from its start to its end."""
    kernel = await start_kernel()
    await wait_in_pool(kernel)
    status, out, _ = await run(
        kernel, "import time, torch\nfrom jupyter_singularity.kernel.runtime import Runtime"
    )
    assert status == "ok", out
    held = (
        "at_start = Runtime.current.lease.request_id\n"
        "time.sleep({})\n"
        "print(at_start, Runtime.current.lease.request_id)"
    )
    first = asyncio.ensure_future(run(kernel, held.format(0.5)))
    await state(kernel, "running")
    second = asyncio.ensure_future(run(kernel, held.format(0.3)))
    leases = []
    for cell in (first, second):
        status, out, messages = await cell
        assert status == "ok", out
        # What the cell printed: a wait line shown meanwhile (a slow acquire) is a display.
        printed = cell_text(messages, displays=False).split()
        assert len(printed) == 2, out
        at_start, at_end = printed
        assert at_start == at_end, out
        leases.append(at_start)
    if not singularity_config["lease_keep"]:
        assert leases[0] != leases[1], leases
    await state(kernel, "resident")


async def test_first_gpu_use_mid_cell_waits_and_leaves_no_blank_output(
    start_kernel, wait_in_pool, run, state, jp_fetch, wait_for
):
    k1, k2 = await start_kernel(), await start_kernel()
    await wait_in_pool([k1, k2])
    status, out, _ = await run(k1, "import time, torch")
    assert status == "ok", out
    busy = asyncio.ensure_future(run(k1, "time.sleep(60)", timeout=90))
    await state(k1, "running")

    # Kernel 2's first GPU use (its first import of torch) comes after some output of the cell.
    code = 'print("before")\nimport torch\nprint("after")'
    seen: list[dict] = []

    async def line_shown():
        return next((m for m in seen if m["msg_type"] == "display_data"), None)

    # Interrupted, that first use did not happen: the kernel's next cells still run ungated,
    # even while kernel 1's cell holds the GPU.
    cell = asyncio.ensure_future(run(k2, code, messages=seen, timeout=60))
    await wait_for(line_shown, timeout=20)
    await jp_fetch("api", "kernels", k2, "interrupt", method="POST", body="")
    status, out, _ = await cell
    assert status == "error" and "left the queue" in out and "after" not in out, out
    status, out, _ = await run(k2, 'print("free")', timeout=10)
    assert status == "ok" and out.strip() == "free", out

    seen.clear()
    cell = asyncio.ensure_future(run(k2, code, messages=seen, timeout=60))
    shown = await wait_for(line_shown, timeout=20)
    assert "waits for a GPU lease" in shown["content"]["data"]["text/plain"], shown
    await jp_fetch("api", "kernels", k1, "interrupt", method="POST", body="")
    status, _, _ = await busy
    assert status == "error"

    status, out, messages = await cell
    assert status == "ok", out
    streams = "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")
    assert streams.split() == ["before", "after"], streams
    # The line is emptied in place, not cleared: earlier output stays, and an output without a
    # MIME type renders as nothing (an empty text would leave a blank line).
    assert not any(m["msg_type"] == "clear_output" for m in messages)
    display_id = shown["content"]["transient"]["display_id"]
    updates = [
        m["content"]["data"]
        for m in messages
        if m["msg_type"] == "update_display_data"
        and m["content"]["transient"]["display_id"] == display_id
    ]
    assert updates and updates[-1] == {}, updates


@pytest.mark.parametrize(
    "singularity_config", [{"quotas": {"default": {"gpu_seconds_per_day": 1.0}}}], indirect=True
)
async def test_cell_over_quota_does_not_run_and_says_why(
    start_kernel, wait_in_pool, run, get_pool, tmp_path
):
    kernel_id = await start_kernel()
    await wait_in_pool(kernel_id)
    # The first GPU cell spends the whole day's GPU-second.
    status, out, _ = await run(kernel_id, "import time, torch\ntime.sleep(1.2)")
    assert status == "ok", out

    marker = tmp_path / "side-effect"
    for cell in (
        f"open({str(marker)!r}, 'w').close()",
        f"%%singularity --memory 1MiB\nopen({str(marker)!r}, 'w').close()",
    ):
        status, out, _ = await run(kernel_id, cell)
        assert status == "error", out
        assert not marker.exists(), "a denied cell ran"
        assert "This cell did not run: no GPU lease" in out, out
        assert "GPU-time quota reached" in out, out
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    pool = await get_pool()
    assert pool["queue"] == [] and record_of(pool, kernel_id)["lease"] is None
    # Asking where the kernel stands needs no lease, so it still answers.
    status, out, _ = await run(kernel_id, "%singularity quota")
    assert status == "ok" and "GPU-time today" in out, out


@pytest.mark.parametrize(
    "singularity_config",
    [{"devices": "simulated:1x16GiB", "first_cell_memory": "200MiB"}],
    indirect=True,
)
async def test_first_cells_book_the_first_cell_memory_the_admin_set_and_run_side_by_side(
    start_kernel, wait_in_pool, run, get_pool, wait_for
):
    """(By default the second first cell would wait: the first books the whole GPU.)"""
    kernels = [await start_kernel(), await start_kernel()]
    await wait_in_pool(kernels)
    cells = [
        asyncio.ensure_future(run(k, "import time, torch\ntime.sleep(4)\n6 * 7")) for k in kernels
    ]

    async def both_leased():
        pool = await get_pool()
        leases = [(record_of(pool, k) or {}).get("lease") for k in kernels]
        return leases if all(leases) else None

    leases = await wait_for(both_leased, timeout=20)
    assert [lease["reservation"] for lease in leases] == [200 * MiB, 200 * MiB]
    for cell in cells:
        status, out, _ = await cell
        assert status == "ok" and "42" in out, out


@pytest.mark.parametrize("singularity_config", [{"first_cell_memory": "200MiB"}], indirect=True)
async def test_a_cell_out_of_gpu_memory_says_what_it_booked_and_how_to_book_more(
    start_kernel, wait_in_pool, run
):
    """(On simulated devices nothing runs out of memory: the cell raises torch's error itself.)"""
    kernel_id = await start_kernel()
    await wait_in_pool(kernel_id)
    oom = (
        'import torch\nraise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")'
    )
    status, out, messages = await run(kernel_id, oom)
    out = re.sub(r"\x1b\[[0-9;]*m", "", out)  # (the traceback's colours)
    assert status == "error" and "OutOfMemoryError: CUDA out of memory" in out, out
    assert "this cell had 200.0 MiB of the GPU's 256.0 MiB booked" in out, out
    assert "%%singularity --memory SIZE" in out, out
    assert [m["content"]["ename"] for m in messages if m["msg_type"] == "error"] == [
        "OutOfMemoryError"
    ]
    # Booked whole (the hint has nothing to add), and other errors, show their traceback alone.
    status, out, _ = await run(kernel_id, "%%singularity --memory 256MiB\n" + oom.split("\n")[1])
    assert status == "error" and "OutOfMemoryError" in out and "booked" not in out, out
    status, out, _ = await run(kernel_id, "1 / 0")
    assert status == "error" and "ZeroDivisionError" in out and "booked" not in out, out


async def test_cell_magic_sets_the_reservation(start_kernel, wait_in_pool, run, get_pool, wait_for):
    kernel_id = await start_kernel()
    await wait_in_pool(kernel_id)
    cell = asyncio.ensure_future(
        run(kernel_id, "%%singularity --memory 100MiB\nimport time\ntime.sleep(3)\n6 * 7")
    )

    async def leased():
        record = record_of(await get_pool(), kernel_id)
        return record if record and record["lease"] else None

    record = await wait_for(leased, timeout=20)
    assert record["lease"]["reservation"] == 100 * MiB
    assert record["state"] == "running"
    status, out, _ = await cell
    assert status == "ok" and "42" in out, out

    status, out, _ = await run(kernel_id, "%%singularity --memory lots\nprint('ran')")
    assert status == "error" and "ran" not in out
    assert "invalid size" in out and "Traceback" not in out, out

    # A cell that never reaches its gate (a syntax error) leaves no lease and no queued request.
    status, out, _ = await run(kernel_id, "x = (")
    assert status == "error" and "SyntaxError" in out, out
    pool = await get_pool()
    assert record_of(pool, kernel_id)["lease"] is None and pool["queue"] == [], pool
    status, out, _ = await run(kernel_id, "print(6 * 7)")
    assert status == "ok" and "42" in out, out


@pytest.mark.faults
async def test_kernel_killed_while_offloaded_leaves_no_booking(
    start_kernel, wait_in_pool, run, get_pool, state, wait_for, singularity_app, jp_fetch
):
    k1, k2 = await start_kernel(), await start_kernel()
    await wait_in_pool([k1, k2])
    status, out, _ = await run(k1, "import os, torch\nx = torch.ones(40 * 2**20 // 4)\nos.getpid()")
    assert status == "ok", out
    pid = int(out.strip().splitlines()[-1])
    status, out, _ = await run(k2, "import torch\ny = torch.ones(40 * 2**20 // 4)")
    assert status == "ok", out
    pool = await state(k1, "offloaded")
    assert record_of(pool, k1)["host_bytes"] >= 40 * MiB

    os.kill(pid, signal.SIGKILL)

    async def restarted():
        # jupyter_server restarts a dead kernel under the same id: it comes back fresh. Waiting for
        # that (rather than ending the test mid-restart) lets the server shut it down cleanly.
        pool = await get_pool()
        record = record_of(pool, k1)
        model = json.loads((await jp_fetch("api", "kernels", k1)).body)
        fresh = record is not None and record["state"] == "cold" and record["host_bytes"] == 0
        return pool if fresh and model["execution_state"] == "idle" else None

    pool = await wait_for(restarted, timeout=60)
    two = record_of(pool, k2)
    assert pool["devices"][0]["booked_bytes"] == two["booked_bytes"], pool
    spill_dir = Path(singularity_app.spill_dir) / k1
    assert not spill_dir.exists() or not any(spill_dir.iterdir())
    assert json.dumps(pool)  # the pool stays serialisable


@pytest.mark.faults
@pytest.mark.parametrize("singularity_config", [{"host_memory_limit": "32MiB"}], indirect=True)
async def test_spill_to_disk_and_back(
    start_kernel, wait_in_pool, run, get_pool, state, wait_for, singularity_app, jp_fetch
):
    spill_root = Path(singularity_app.spill_dir)
    k1, k2 = await start_kernel(), await start_kernel()
    await wait_in_pool([k1, k2])
    status, out, _ = await run(k1, BUILD_STATE)
    assert status == "ok", out
    digest = value(out, "digest")

    # Kernel 2 evicts kernel 1, whose state is over the 32 MiB host budget: what does not fit
    # goes straight to disk.
    status, out, _ = await run(k2, "import os, torch\ny = torch.ones(50 * 2**20 // 4)\nos.getpid()")
    assert status == "ok", out
    pid2 = int(out.strip().splitlines()[-1])
    pool = await state(k1, "offloaded")
    one = record_of(pool, k1)
    assert one["host_bytes"] <= 32 * MiB and one["disk_bytes"] > 100 * MiB, one
    assert one["host_bytes"] + one["disk_bytes"] > 130 * MiB, one
    files = list((spill_root / k1).iterdir())
    assert files and all(f.stat().st_mode & 0o777 == 0o600 for f in files), files

    # Its next cell reads the state back from disk, bit-identical, and the files go.
    status, out, _ = await run(k1, NEXT_STEP)
    assert status == "ok", out
    assert value(out, "digest") == digest
    assert "from host and disk" in out, out
    assert not any((spill_root / k1).iterdir())
    status, out, _ = await run(k1, "%singularity log")
    assert "straight to disk" in out and "restored" in out, out

    # Kernel 2 was evicted in turn, part of it to disk; killed, it leaves no files and no booking.
    pool = await state(k2, "offloaded", "spilled")
    assert record_of(pool, k2)["disk_bytes"] > 0
    assert any((spill_root / k2).iterdir())
    os.kill(pid2, signal.SIGKILL)

    async def cleaned():
        pool = await get_pool()
        record = record_of(pool, k2)
        gone = record is None or record["state"] == "cold"
        files = (spill_root / k2).exists() and any((spill_root / k2).iterdir())
        # The server restarts the dead kernel: wait until it is back, so that the server does not
        # shut down in the middle of the restart.
        model = json.loads((await jp_fetch("api", "kernels", k2)).body)
        return pool if gone and not files and model["execution_state"] == "idle" else None

    pool = await wait_for(cleaned, timeout=30)
    assert pool["devices"][0]["booked_bytes"] == record_of(pool, k1)["booked_bytes"]
    # The restarted kernel answers from a new process. (Its model said "idle" already before
    # the restart was over, and a server shut down mid-restart fails the tests after this one.)
    status, out, _ = await run(k2, "import os\nos.getpid()", timeout=60)
    assert status == "ok" and int(out.strip().splitlines()[-1]) != pid2, out


# ----------------------------------------------------------------- pieces, without a kernel


class _Outputs:
    """What a wait line sends to the cell's output, through IPython's display functions."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import IPython.display

        self.sent: list[tuple[str, str]] = []
        outputs = self

        class Handle:
            def update(self, bundle: dict, raw: bool) -> None:
                outputs.sent.append(("update", bundle.get("text/plain", "")))

        def display(bundle: dict, raw: bool, display_id: bool) -> Handle:
            self.sent.append(("display", bundle["text/plain"]))
            return Handle()

        monkeypatch.setattr(IPython.display, "display", display)
        monkeypatch.setattr(
            IPython.display, "clear_output", lambda: self.sent.append(("clear", ""))
        )


def test_a_restore_shows_its_line_only_once_the_wait_lasts(monkeypatch) -> None:
    from jupyter_singularity.kernel.gate import LINE_DELAY, WaitLine

    outputs = _Outputs(monkeypatch)
    quick = WaitLine(top_of_cell=True)
    quick.restoring(GiB, "host")
    quick.progress(GiB // 2, GiB)
    quick.progress(GiB, GiB)
    quick.close()
    assert outputs.sent == []  # over within the delay: no output message at all

    slow = WaitLine(top_of_cell=True)
    slow.started -= LINE_DELAY  # the cell has waited that long
    slow.restoring(GiB, "host")
    assert outputs.sent == []  # the line comes with the restore's progress
    slow.progress(GiB // 2, GiB)
    slow.progress(GiB, GiB)
    slow.close()
    assert outputs.sent == [
        ("display", "⏳ restoring 1.0 GiB from host… 50%"),
        ("update", "⏳ restoring 1.0 GiB from host… 100%"),
        ("clear", ""),
    ]


def test_a_line_shown_for_the_queue_turns_into_the_restore_at_once(monkeypatch) -> None:
    from jupyter_singularity.kernel.gate import WaitLine
    from jupyter_singularity.kernel.runtime import Waiting

    outputs = _Outputs(monkeypatch)
    line = WaitLine(top_of_cell=False)
    queued = Waiting("1", None, 0.0)
    queued.position = 1
    line.tick(queued)
    line.restoring(GiB, "disk")
    line.close()
    assert [kind for kind, _ in outputs.sent] == ["display", "update", "update"]
    assert outputs.sent[1][1] == "⏳ restoring 1.0 GiB from disk…"
    assert outputs.sent[2][1] == ""  # mid-cell: emptied in place


def gated(source: str) -> str:
    import ast

    from IPython.core.inputtransformer2 import TransformerManager

    from jupyter_singularity.kernel.gate import GateInserter

    tree = ast.parse(TransformerManager().transform_cell(source))
    return ast.unparse(GateInserter().visit(tree))


def test_gate_is_the_first_statement_of_a_cell():
    assert gated("x = 1\nprint(x)").splitlines()[0] == "__singularity_gate__()"
    # After future imports (which must come first), and with a docstring before them.
    lines = gated('"""doc"""\nfrom __future__ import annotations\nx = 1').splitlines()
    assert lines[1:3] == ["from __future__ import annotations", "__singularity_gate__()"]
    # %%singularity passes its options to the gate, before the body runs.
    assert gated("%%singularity --memory 6GiB\nx = 1").startswith(
        "__singularity_gate__('--memory 6GiB')\n"
    )
    # Other cell magics are gated like any cell.
    assert gated("%%time\nx = 1").startswith("__singularity_gate__()\n")
    # Cells made only of %singularity line magics are not: asking must not restore the kernel.
    assert "__singularity_gate__" not in gated("%singularity status\n%singularity log")
    assert gated("%singularity status\nx = 1").startswith("__singularity_gate__()\n")
    assert gated("# just a comment") == ""


def test_cell_options_and_which_cells_send_their_acquire_early():
    from jupyter_singularity.kernel.early_acquire import needs_lease
    from jupyter_singularity.kernel.gate import GateUsageError, parse_cell_options

    assert parse_cell_options("") is None
    assert parse_cell_options("--memory 6GiB") == 6 << 30
    assert parse_cell_options("--memory=512MiB") == 512 << 20
    assert parse_cell_options("-m 1G") == 1 << 30
    for bad in ("--memory", "--memory lots", "--colour red", "'unclosed"):
        with pytest.raises(GateUsageError) as err:
            parse_cell_options(bad)
        assert len(err.value._render_traceback_()) == 1

    assert needs_lease("x = 1")
    assert needs_lease("%%time\nx = 1")
    assert needs_lease("%singularity status\nx = 1")
    assert not needs_lease("%singularity status\n# note\n%singularity")
    assert not needs_lease("%%singularity --memory 1GiB\nx = 1")
    assert not needs_lease("  \n# nothing\n")


def test_cuda_init_waits_for_its_gate_once(monkeypatch):
    """The wrapper of torch.cuda._lazy_init (checked here with a stand-in torch): it runs the gate
    before the first initialisation only, also through modules that imported the function."""
    import sys
    import types

    from jupyter_singularity.kernel.gate import CudaInitGate

    calls: list[str] = []
    state = {"initialized": False}

    def _lazy_init():
        if state["initialized"]:
            return
        calls.append("init")
        state["initialized"] = True

    cuda = types.ModuleType("torch.cuda")
    cuda._lazy_init = _lazy_init
    cuda.is_initialized = lambda: state["initialized"]
    memory = types.ModuleType("torch.cuda.memory")
    memory._lazy_init = _lazy_init  # as ``from . import _lazy_init`` leaves it
    torch = types.ModuleType("torch")
    torch.cuda = cuda
    for name, module in (("torch", torch), ("torch.cuda", cuda), ("torch.cuda.memory", memory)):
        monkeypatch.setitem(sys.modules, name, module)

    gate = CudaInitGate(lambda: calls.append("lease") or "token", lambda t: calls.append(t))
    gate.install(torch)
    assert memory._lazy_init is cuda._lazy_init is not _lazy_init
    memory._lazy_init()
    cuda._lazy_init()
    assert calls == ["lease", "init", "token"]
    gate.uninstall()
    assert memory._lazy_init is _lazy_init and cuda._lazy_init is _lazy_init
