"""The ``gpu`` marker: tests of the real GPU path, and a run that cannot pass without them.

``@pytest.mark.gpu`` tests need an NVIDIA GPU, torch with CUDA and the driver's checkpoint API.
The environment variable ``JUPYTER_SINGULARITY_GPU`` says what a run wants of them:

- unset: they run where a GPU is found and are skipped elsewhere (the CPU suite stays green);
- ``require`` (the GPU check): a run without a GPU *fails* them, and every skip of a gpu test is a
  failure too, except "not applicable" ones that the marker itself declares for this machine
  (``gpu(min_devices=2)`` on a one-GPU machine, ``gpu(remap=True)`` where the driver has no UUID
  remap): a gpu test passes only by running;
- ``simulate`` (``bench/gpu_check.py --simulate``): tests marked ``gpu(simulate=True)`` run on
  simulated devices (the ``gpu_mode`` fixture says "simulate"), the others are not applicable.

``JUPYTER_SINGULARITY_GPU_REPORT=path.json`` writes every gpu test's outcome (passed, failed,
skipped, not applicable), why, and the figures it recorded with ``record_property``: the GPU check
reads them from there.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MODE_VARIABLE = "JUPYTER_SINGULARITY_GPU"
REPORT_VARIABLE = "JUPYTER_SINGULARITY_GPU_REPORT"
MODES = ("", "require", "simulate")
#: How the gate's own "not applicable" skips start (any other skip fails in require mode).
NOT_APPLICABLE = "not applicable"


def mode() -> str:
    value = os.environ.get(MODE_VARIABLE, "").strip().lower()
    if value not in MODES:
        raise pytest.UsageError(
            f"{MODE_VARIABLE}={value!r}: use 'require' (a GPU must be there), 'simulate', or "
            "leave it unset"
        )
    return value


@dataclass(frozen=True)
class GpuFacts:
    """What this machine offers the gpu tests, found without starting CUDA in this process."""

    devices: int
    uuids: tuple[str, ...]
    torch_cuda: str | None
    checkpoint: bool
    remap: bool
    why_not: str = ""
    notes: dict[str, Any] = field(default_factory=dict)


@functools.cache
def facts() -> GpuFacts:
    from jupyter_singularity.broker.checkpoint import detect
    from jupyter_singularity.devices.nvml import NvmlInventory

    inventory = NvmlInventory.open()
    try:
        uuids = tuple(d.uuid for d in inventory.devices())
        reason = inventory.reason
    finally:
        inventory.close()
    try:
        import torch

        torch_cuda = torch.version.cuda
    except ImportError:
        torch_cuda = None
    capability = detect()
    why = []
    if not uuids:
        why.append(f"no GPU ({reason})")
    if torch_cuda is None:
        why.append("torch has no CUDA")
    if not capability.available:
        why.append(f"no driver checkpoint API ({capability.reason})")
    return GpuFacts(
        devices=len(uuids),
        uuids=uuids,
        torch_cuda=torch_cuda,
        checkpoint=capability.available,
        remap=capability.migration,
        why_not="; ".join(why),
        notes={"inventory": reason, "driver": capability.log_line()},
    )


_RESULTS = pytest.StashKey[dict]()
#: Why the gate itself found a gpu test not applicable here: the only skip require mode allows.
_DECLARED = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """(The marker itself is registered in pyproject.toml.)"""
    config.stash[_RESULTS] = {}
    mode()  # a bad value stops the run at once


def _not_applicable(item: pytest.Item, found: GpuFacts, current: str) -> str:
    """Why the marker declares this test not applicable here ("": it applies)."""
    marker = item.get_closest_marker("gpu")
    assert marker is not None
    if current == "simulate":
        if marker.kwargs.get("simulate"):
            return ""
        return f"{NOT_APPLICABLE} in simulate mode: needs a real GPU"
    needed = int(marker.kwargs.get("min_devices", 1))
    if found.devices and found.devices < needed:
        return f"{NOT_APPLICABLE}: needs {needed} GPUs, this machine has {found.devices}"
    if marker.kwargs.get("remap") and found.checkpoint and not found.remap:
        return f"{NOT_APPLICABLE}: the driver has no GPU UUID remap (needs driver >= 580)"
    return ""


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is None:
        return
    current = mode()
    found = facts_for_simulate() if current == "simulate" else facts()
    why = _not_applicable(item, found, current)
    if why:
        item.stash[_DECLARED] = why
        pytest.skip(why)
    if current == "simulate":
        return
    if found.why_not:
        if current == "require":
            pytest.fail(f"{MODE_VARIABLE}=require, but this machine cannot run it: {found.why_not}")
        pytest.skip(f"needs a GPU: {found.why_not}")


def facts_for_simulate() -> GpuFacts:
    """Simulate mode asks nothing of the machine."""
    return GpuFacts(devices=0, uuids=(), torch_cuda=None, checkpoint=False, remap=False)


@pytest.fixture
def gpu_mode() -> str:
    """ "gpu" on a real GPU, "simulate" for gpu(simulate=True) tests in simulate mode."""
    return "simulate" if mode() == "simulate" else "gpu"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    if item.get_closest_marker("gpu") is None:
        return
    report = outcome.get_result()
    reason = ""
    declared = item.stash.get(_DECLARED, "")
    if report.skipped:
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else ""
        reason = reason.removeprefix("Skipped: ")
        if mode() == "require" and not declared:
            # A gpu test passes only by running: a skip from inside it is a failure here.
            report.outcome = "failed"
            report.longrepr = f"{MODE_VARIABLE}=require: a gpu test may not be skipped ({reason})"
    results = item.config.stash[_RESULTS]
    entry = results.setdefault(
        item.nodeid, {"outcome": "passed", "reason": "", "seconds": 0.0, "properties": {}}
    )
    entry["seconds"] += report.duration
    entry["properties"].update({name: value for name, value in item.user_properties})
    if report.failed:
        entry["outcome"] = "failed" if report.when == "call" else "error"
        entry["reason"] = str(report.longrepr)[-3000:]
    elif report.skipped:
        entry["outcome"] = "not_applicable" if declared else "skipped"
        entry["reason"] = reason


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    results = session.config.stash.get(_RESULTS, {})
    if mode() == "require" and not results and session.testscollected:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED  # asked for the GPU, ran no gpu test
    path = os.environ.get(REPORT_VARIABLE)
    if not path:
        return
    current = mode()
    found = facts_for_simulate() if current == "simulate" else facts()
    Path(path).write_text(
        json.dumps(
            {
                "mode": current or "auto",
                "machine": {
                    "devices": found.devices,
                    "uuids": list(found.uuids),
                    "torch_cuda": found.torch_cuda,
                    "checkpoint": found.checkpoint,
                    "remap": found.remap,
                    "why_not": found.why_not,
                    **found.notes,
                },
                "tests": results,
            },
            indent=2,
            default=str,
        )
    )
