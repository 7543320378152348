"""The gpu marker's gate (gpu_gate.py): a run that asks for the GPU cannot pass without running the
gpu tests. Each case runs pytest on a small test file in a subprocess, as the GPU check does; a
conftest there can stand in for a machine that has a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent

CASES = """
import pytest


@pytest.mark.gpu
def test_runs():
    pass


@pytest.mark.gpu
def test_skips_itself():
    pytest.skip("torch is missing")


@pytest.mark.gpu(min_devices=2)
def test_two_gpus():
    pass


@pytest.mark.gpu(remap=True)
def test_remap():
    pass


@pytest.mark.gpu(simulate=True)
def test_also_simulated(gpu_mode):
    print("mode", gpu_mode)


def test_not_a_gpu_test():
    pass
"""

#: A machine with one GPU whose driver has the checkpoint API but no UUID remap.
ONE_GPU = """
import gpu_gate

gpu_gate.facts = lambda: gpu_gate.GpuFacts(
    devices=1, uuids=("GPU-1",), torch_cuda="13.0", checkpoint=True, remap=False
)
"""


def _run(tmp_path: Path, mode: str | None, conftest: str = "") -> tuple[int, dict[str, dict]]:
    (tmp_path / "test_cases.py").write_text(textwrap.dedent(CASES))
    (tmp_path / "conftest.py").write_text(textwrap.dedent(conftest))
    report = tmp_path / "report.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
        "JUPYTER_SINGULARITY_GPU_REPORT": str(report),
    }
    env.pop("JUPYTER_SINGULARITY_GPU", None)
    if mode is not None:
        env["JUPYTER_SINGULARITY_GPU"] = mode
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "gpu_gate", "-p", "no:cacheprovider", "-q"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    tests = json.loads(report.read_text())["tests"]
    return done.returncode, {k.split("::")[-1]: v for k, v in tests.items()}


def _outcomes(tests: dict[str, dict]) -> dict[str, str]:
    return {name: entry["outcome"] for name, entry in tests.items()}


def test_without_a_gpu_the_gpu_tests_skip(tmp_path: Path) -> None:
    rc, tests = _run(
        tmp_path,
        None,
        "import gpu_gate\ngpu_gate.facts = lambda: "
        "gpu_gate.GpuFacts(0, (), None, False, False, why_not='no GPU (test)')\n",
    )
    assert rc == 0
    assert set(_outcomes(tests).values()) == {"skipped"}
    assert tests["test_runs"]["reason"] == "needs a GPU: no GPU (test)"


def test_a_run_that_requires_the_gpu_fails_without_one(tmp_path: Path) -> None:
    rc, tests = _run(
        tmp_path,
        "require",
        "import gpu_gate\ngpu_gate.facts = lambda: "
        "gpu_gate.GpuFacts(0, (), None, False, False, why_not='no GPU (test)')\n",
    )
    assert rc == 1
    assert _outcomes(tests) == {name: "error" for name in tests}
    assert (
        "JUPYTER_SINGULARITY_GPU=require, but this machine cannot run it: no GPU (test)"
        in (tests["test_runs"]["reason"])
    )


def test_with_a_gpu_a_skip_fails_and_only_the_gate_says_not_applicable(tmp_path: Path) -> None:
    rc, tests = _run(tmp_path, "require", ONE_GPU)
    assert rc == 1
    assert _outcomes(tests) == {
        "test_runs": "passed",
        "test_skips_itself": "failed",  # a gpu test passes only by running
        "test_two_gpus": "not_applicable",
        "test_remap": "not_applicable",
        "test_also_simulated": "passed",
    }
    assert "may not be skipped (torch is missing)" in tests["test_skips_itself"]["reason"]
    assert tests["test_two_gpus"]["reason"] == ("not applicable: needs 2 GPUs, this machine has 1")


def test_simulate_runs_only_what_can_run_without_a_gpu(tmp_path: Path) -> None:
    rc, tests = _run(tmp_path, "simulate")
    assert rc == 0
    assert _outcomes(tests) == {
        "test_runs": "not_applicable",
        "test_skips_itself": "not_applicable",
        "test_two_gpus": "not_applicable",
        "test_remap": "not_applicable",
        "test_also_simulated": "passed",
    }
