"""Users per GPU at a p95 cell wait <= 10 s: the pool against the three baselines.

Runs ``jupyter singularity simulate``'s replay (the real decision core, a virtual clock) on:

1. a generated teaching lab (``--generate lab``: 60 students, each one kernel for one 2-hour
   session, all arriving within the first 10 minutes; GPU cells of a median 10 s, a median 90 s
   between them, each kernel a model of a median 2 GiB (log-normal, at most 8 GiB); seed 0), on
   pools of 1 to 8, 16 and 60 H100s (80 GiB: 60 is a GPU per student); ours once with the
   broker's defaults (a kernel's first cell books the whole GPU) and once with the setting the
   course's admin would choose (``first_cell_memory = "8GiB"``, its largest model);
2. the project's own CI ledger: the ledgers of ``tests/test_runtime.py`` (real kernels on two
   simulated 16 GiB devices). Without ``--ledger``, the script runs that test file with
   ``--basetemp DIR`` (``--ci-dir``, kept afterwards, about 2 minutes) and reads every test's
   ``singularity.sqlite`` there; ``--ledger URL`` (repeatable) reads ledgers made earlier, such
   as a site's own;
3. the replay speed: a generated day of 200 users (``--generate day``) on 8 H100s, timed.

Goal (issue 12): the pool serves more users per GPU than each baseline at p95 <= 10 s, and a
day of 200 users replays in under 10 s. Run: ``python bench/users_per_gpu.py [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from jupyter_singularity.simulate.baselines import baselines
from jupyter_singularity.simulate.generator import generate, parse_workload
from jupyter_singularity.simulate.ledger_trace import read_ledger
from jupyter_singularity.simulate.replay import MODEL, Replay
from jupyter_singularity.simulate.site import load_site, parse_pools
from jupyter_singularity.simulate.sweep import Simulation, simulate
from jupyter_singularity.simulate.trace import Trace, merge_traces

REPO = Path(__file__).resolve().parent.parent
TARGET = 10.0
LAB_POOLS = "1x80GiB,2x80GiB,3x80GiB,4x80GiB,6x80GiB,8x80GiB,16x80GiB,60x80GiB"
CI_POOLS = "1x16GiB,2x16GiB"
DAY_POOL = "8x80GiB"
LAB_FIRST_CELL = "8GiB"
"""What an admin who knows the course's notebooks sets for a kernel's first cell: the lab's
largest model (the broker's ``first_cell_memory``; by default a first cell books the whole GPU)."""


def ci_ledgers(directory: Path) -> list[str]:
    """Run the runtime tests with their temporary folders kept in ``directory``; their ledgers."""
    print(f"running tests/test_runtime.py, ledgers kept in {directory} ...", file=sys.stderr)
    command = ["pytest", "-q", "-p", "no:cacheprovider", "tests/test_runtime.py"]
    subprocess.run([sys.executable, "-m", *command, "--basetemp", str(directory)], cwd=REPO)
    # pytest links "<name>current" to each test's folder: read each ledger once.
    found = {p.resolve() for p in directory.glob("*/singularity.sqlite")}
    return [str(p) for p in sorted(found)]


def answer(
    name: str, trace: Trace, simulation: Simulation, configured: Simulation | None = None
) -> dict:
    """Print and return users per GPU for each model; ``configured``: ours again, with the
    site's setting (its row is judged against the same baselines)."""
    users = simulation.users_per_gpu()
    ours = users[MODEL]["users_per_gpu"]
    print(f"\n{name}: {len(trace.users)} users, {len(trace.sessions)} kernels, {trace.cells} cells")
    print(f"  {'model':<14}{'users/GPU':>10}  {'pool':<10} {'p95 wait on it':>15}")
    for index, model in enumerate(simulation.models()):
        found = users[model]
        if found["users_per_gpu"] is None:
            largest = simulation.pools[-1].pool.name
            print(f"  {model:<14}{'-':>10}  no pool up to {largest} meets p95 <= {TARGET:g} s")
            continue
        pool = next(r for r in simulation.pools if r.pool.name == found["pool"])
        p95 = pool.outcomes[index].wait(95)
        line = f"  {model:<14}{found['users_per_gpu']:>10g}  {found['pool']:<10} {p95:>14.1f}s"
        if model != MODEL and ours is not None:
            line += f"  (ours: {ours / found['users_per_gpu']:.2f}x)"
        print(line)
    others = [users[m]["users_per_gpu"] or 0 for m in simulation.models() if m != MODEL]
    met = ours is not None and all(ours > other for other in others)
    verdict = "met" if met else "NOT met"
    if len(trace.users) == 1:
        met, verdict = None, "not measurable: one user is served by one GPU in every model"
    print(f"  goal: more users per GPU than each baseline at p95 <= {TARGET:g} s: {verdict}")
    result = {"trace": trace.summary(), "users_per_gpu": users, "goal_met": met}
    if configured is not None:
        found = configured.users_per_gpu()[MODEL]
        served = found["users_per_gpu"]
        pool = next((r for r in configured.pools if r.pool.name == found["pool"]), None)
        p95 = "" if pool is None else f"{pool.outcomes[0].wait(95):>14.1f}s"
        print(f"  with the course's setting: first_cell_memory = {LAB_FIRST_CELL!r}")
        if served is None:
            print(f"  {MODEL:<14}{'-':>10}  no pool up to {configured.pools[-1].pool.name}")
        else:
            best = max(others)
            ratio = f"  (the best baseline: {served / best:.2f}x)" if best else ""
            print(f"  {MODEL:<14}{served:>10g}  {found['pool']:<10} {p95}{ratio}")
        met = served is not None and all(served > other for other in others)
        print(f"  goal, with it: {'met' if met else 'NOT met'}")
        result["with_first_cell_memory"] = {"users_per_gpu": found, "goal_met": met}
    return result


def replay_speed() -> dict:
    trace = generate(parse_workload("day"))
    pool = parse_pools(DAY_POOL)[0]
    site = load_site(None)
    started, cpu = time.perf_counter(), time.process_time()
    outcome = Replay(trace, pool, site.policy(pool), site.quotas).run()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(
        f"\nreplay speed: a day of 200 users ({trace.cells} cells) on {DAY_POOL}: {wall:.1f} s "
        f"wall, {cpu:.1f} s CPU (goal < 10 s; p95 wait {outcome.wait(95):.1f} s)"
    )
    return {"cells": trace.cells, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ledger", action="append", help="ledger DB URL or SQLite file")
    parser.add_argument("--ci-dir", default="/tmp/jupyter-singularity-ci-ledger")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    site = load_site(None)
    results = {}
    lab = generate(parse_workload("lab"))
    sweep = simulate(lab, parse_pools(LAB_POOLS), site, baselines(3600), TARGET)
    course = load_site(None)
    course.settings.first_cell_memory = LAB_FIRST_CELL
    configured = simulate(lab, parse_pools(LAB_POOLS), course, [], TARGET)
    results["lab"] = answer("teaching lab (generated: lab)", lab, sweep, configured)
    urls = args.ledger or ci_ledgers(Path(args.ci_dir))
    ci = merge_traces([read_ledger(url) for url in urls])
    sweep = simulate(ci, parse_pools(CI_POOLS), site, baselines(3600), TARGET)
    origin = "" if args.ledger else ": tests/test_runtime.py"
    results["ledger"] = answer(f"ledger ({len(urls)} file(s){origin})", ci, sweep)
    results["speed"] = replay_speed()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
