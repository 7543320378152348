"""Tests for ``jupyter singularity simulate``: the trace formats, the generator, the replay through
the real decision core against hand-computed cases, the baselines on tiny traces, the ledger as a
trace source (a real SQLite ledger), and the command line end to end.

Hand-computed cases use round numbers: GPUs of 10 GB, footprints of 6 GB (two never fit at
once), copies at 6 GB/s (1 s per footprint) and a driver tier of 0.5 s, so one offload or
restore of a footprint through host memory takes 1.5 s.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from jupyter_singularity.broker.ledger import Ledger
from jupyter_singularity.broker.model import Policy
from jupyter_singularity.broker.settings import ConfigError
from jupyter_singularity.simulate.baselines import (
    IDLE_CULLER,
    TIME_SLICING,
    WHOLE_GPU,
    SharedGpus,
    baselines,
)
from jupyter_singularity.simulate.generator import PRESETS, generate, parse_workload
from jupyter_singularity.simulate.ledger_trace import read_ledger
from jupyter_singularity.simulate.outcome import NEVER, percentile
from jupyter_singularity.simulate.replay import Replay
from jupyter_singularity.simulate.site import load_site, parse_pools
from jupyter_singularity.simulate.sweep import simulate
from jupyter_singularity.simulate.trace import TraceError, build_trace, read_trace
from jupyter_singularity.simulate.transfers import Transfers

REPO_ROOT = Path(__file__).resolve().parent.parent
GB = 10**9
GiB = 1 << 30
SWAP = 1.5
"""One offload or restore of a 6 GB footprint in these tests: 6 GB at 6 GB/s, then 0.5 s."""
TRANSFERS = Transfers(pinned_gbps=6, pageable_gbps=6, disk_gbps=2, context_seconds=0.5)
POLICY = Policy(pinned_per_kernel=8 * GiB)


def trace_of(*cells: tuple, ends: dict[str, float] | None = None):
    """A trace from ``(user, kernel, start, duration, memory)`` tuples."""
    rows = []
    for number, (user, kernel, start, duration, memory) in enumerate(cells, start=1):
        row = {"user": user, "kernel": kernel, "start": start, "duration": duration}
        row["memory"] = memory
        if ends and kernel in ends:
            row["kernel_end"] = ends[kernel]
        rows.append((f"row {number}", row))
    return build_trace(rows, source="test")


def waits(outcome) -> dict[str, list[float]]:
    return {user: [round(w, 6) for w in ws] for user, ws in outcome.waits.items()}


def replay(trace, pool="1x10GB", policy=POLICY):
    return Replay(trace, parse_pools(pool)[0], policy, None, TRANSFERS).run()


ALTERNATING = trace_of(
    ("alice", "a", 0, 10, 6 * GB),
    ("bob", "b", 50, 10, 6 * GB),
    ("alice", "a", 100, 10, 6 * GB),
    ("bob", "b", 150, 10, 6 * GB),
    ends={"a": 300, "b": 300},
)


# ------------------------------------------------------------------------------ trace files

CSV = """user,kernel,start,duration,memory,kernel_end,groups
alice,k1,2026-01-05T09:00:00,12.5,4GiB,2026-01-05T10:00:00,ml;staff
alice,k1,2026-01-05T09:01:00,3,4GiB,,
bob,k2,1767603660,60,2147483648,,
"""


def test_csv_and_jsonl_traces_read_the_same(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text(CSV)
    lines = [
        {"user": "alice", "kernel": "k1", "start": "2026-01-05T09:00:00", "duration": 12.5,
         "memory": "4GiB", "kernel_end": "2026-01-05T10:00:00", "groups": ["ml", "staff"]},
        {"user": "alice", "kernel": "k1", "start": "2026-01-05T09:01:00", "duration": 3,
         "memory": "4GiB"},
        {"user": "bob", "kernel": "k2", "start": 1767603660, "duration": 60, "memory": 2 * GiB},
    ]  # fmt: skip
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    from_csv, from_jsonl = read_trace(tmp_path / "t.csv"), read_trace(tmp_path / "t.jsonl")
    assert from_csv.sessions == from_jsonl.sessions
    alice, bob = from_csv.sessions
    nine = 1767603600.0  # 2026-01-05 09:00:00 UTC
    assert (alice.kernel, alice.user, alice.groups) == ("k1", "alice", ("ml", "staff"))
    assert [(c.start, c.duration, c.memory) for c in alice.cells] == [
        (nine, 12.5, 4 * GiB),
        (nine + 60, 3.0, 4 * GiB),
    ]
    assert alice.end == nine + 3600
    assert bob.end == bob.cells[-1].end == nine + 120  # no kernel_end: its last cell's end
    assert from_csv.summary()["users"] == 2 and from_csv.cells == 3


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("t.csv", "", "t.csv: empty file; expected a header line with user, kernel"),
        ("t.csv", "user,kernel,start,duration\na,k,0,1\n", "t.csv line 2: memory: missing"),
        ("t.csv", "user,kernel,start,duration,memory,size\n", "t.csv line 1: unknown column 'size'"),
        ("t.csv", "user,kernel,start,duration,memory\na,k,0,1,1GiB\na,k,5,x,1GiB\n",
         "t.csv line 3: duration: expected a number of seconds, not 'x'"),
        ("t.csv", "user,kernel,start,duration,memory\na,k,0,-1,1GiB\n",
         "t.csv line 2: duration: must be >= 0 seconds, not -1"),
        ("t.csv", "user,kernel,start,duration,memory\na,k,0,1,lots\n",
         "t.csv line 2: memory: invalid size 'lots'"),
        ("t.csv", "user,kernel,start,duration,memory\na,k,yesterday,1,1GiB\n",
         "t.csv line 2: start: expected seconds or an ISO 8601 time"),
        ("t.csv", "user,kernel,start,duration,memory\na,k,0,10,1GiB\na,k,5,1,1GiB\n",
         "t.csv line 3: start: kernel 'k' runs one cell at a time"),
        ("t.csv", "user,kernel,start,duration,memory\na,k,0,1,1GiB\nb,k,5,1,1GiB\n",
         "t.csv line 3: user: kernel 'k' belongs to 'a', not 'b'"),
        ("t.csv", "user,kernel,start,duration,memory,kernel_end\na,k,0,10,1GiB,5\n",
         "t.csv line 2: kernel_end: kernel 'k' ends at 5, before its last cell ends (10)"),
        ("t.csv", "user,kernel,start,duration,memory\na,k,0,1,1GiB,extra\n",
         "t.csv line 2: more fields than the header has columns"),
        ("t.jsonl", '{"user": "a"\n', "t.jsonl line 1: not JSON"),
        ("t.jsonl", '\n[1, 2]\n', "t.jsonl line 2: expected a JSON object"),
        ("t.jsonl", '{"user": "a", "kernel": "k", "start": 0, "duration": 1, "memory": 1.5}\n',
         "t.jsonl line 1: memory: size must be an int or a string, not float"),
        ("t.jsonl", '{"user": "", "kernel": "k", "start": 0, "duration": 1, "memory": 1}\n',
         "t.jsonl line 1: user: expected a name"),
        ("t.jsonl", '{"user": "a", "kernel": "k", "start": NaN, "duration": 1, "memory": 1}\n',
         "t.jsonl line 1: start: expected a number of seconds, not nan"),
        ("t.jsonl", "\n", "t.jsonl: no cells in the trace"),
    ],
)  # fmt: skip
def test_a_bad_trace_says_where_and_what(tmp_path: Path, name: str, text: str, message: str):
    (tmp_path / name).write_text(text)
    with pytest.raises(TraceError) as err:
        read_trace(tmp_path / name)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_a_missing_trace_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"nope\.csv: cannot read the trace"):
        read_trace(tmp_path / "nope.csv")


# -------------------------------------------------------------------------------- generator


def test_the_generator_is_deterministic_for_a_seed() -> None:
    one, again = (
        generate(parse_workload("users=20,seed=7")),
        generate(parse_workload("users=20,seed=7")),
    )
    other = generate(parse_workload("users=20,seed=8"))
    assert one == again
    assert one.sessions != other.sessions
    assert len(one.users) == 20 and len(one.sessions) == 40  # two sessions each


def test_the_lab_preset_is_60_students_in_one_two_hour_session() -> None:
    trace = generate(parse_workload("lab"))
    lab = PRESETS["lab"]
    assert len(trace.users) == 60 and len(trace.sessions) == 60
    first = min(s.cells[0].start for s in trace.sessions)
    for session in trace.sessions:
        begin = session.cells[0].start
        assert begin - first <= 10 * 60  # everyone arrives in the first ten minutes
        assert session.end == pytest.approx(begin + 2 * 3600)
        assert all(c.start <= begin + lab.length for c in session.cells)
        assert len({c.memory for c in session.cells}) == 1
        assert 256 << 20 <= session.cells[0].memory <= lab.max_memory


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lecture", "unknown preset 'lecture' (known: day, lab)"),
        ("lab,usres=3", "unknown parameter 'usres' (known: users, days"),
        ("users=many", "users: expected a whole number, not 'many'"),
        ("memory=big", "memory: expected a size, not 'big'"),
        ("users=0", "users: must be between 1 and 100000"),
        ("think=0", "think: must be > 0 seconds"),
        ("start=18,end=9", "start, end: hours of the day"),
    ],
)
def test_bad_generator_parameters_are_named(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_workload(spec)
    assert str(err.value).startswith(message), str(err.value)


# ------------------------------------------------------------------------ the pool's replay


def test_two_users_alternating_on_one_gpu_wait_for_the_modelled_swaps() -> None:
    """Each cell's kernel was offloaded by the other one's cell: it waits for the other's
    offload, then its own restore. Bob's first cell waits only for alice's offload (he has
    nothing to restore); alice's first cell finds the GPU empty."""
    outcome = replay(ALTERNATING)
    assert waits(outcome) == {"alice": [0.0, 2 * SWAP], "bob": [SWAP, 2 * SWAP]}
    assert outcome.evictions == 3
    assert outcome.moved == {"offloaded": 18 * GB, "restored": 12 * GB}
    assert outcome.failures == {}
    # Every cell held the GPU for its 10 s, the restoring ones also for their restore.
    assert dict(outcome.gpu_seconds) == pytest.approx({"alice": 20 + SWAP, "bob": 20 + SWAP})


def test_offloaded_state_beyond_the_host_budget_goes_to_disk_and_comes_back_slower() -> None:
    """With 2 GB of host memory for offloaded state, alice's offload keeps 2 GB in memory and
    writes 4 GB to disk (2 GB/s); bob's then finds the budget full and goes to disk whole."""
    policy = Policy(pinned_per_kernel=8 * GiB, host_memory_limit=2 * GB)
    outcome = replay(ALTERNATING, policy=policy)
    partly = 2 / 6 + 4 / 2 + 0.5  # 2 GB through memory, 4 GB to disk, the driver tier
    whole = 6 / 2 + 0.5
    assert waits(outcome) == {
        "alice": pytest.approx([0.0, whole + partly]),
        "bob": pytest.approx([partly, partly + whole]),
    }


def test_idle_timeout_offloads_a_lone_kernel_and_its_next_cell_restores() -> None:
    trace = trace_of(("alice", "a", 0, 10, 6 * GB), ("alice", "a", 100, 10, 6 * GB))
    assert waits(replay(trace)) == {"alice": [0.0, 0.0]}
    outcome = replay(trace, policy=Policy(pinned_per_kernel=8 * GiB, idle_timeout=30))
    assert waits(outcome) == {"alice": [0.0, SWAP]}
    assert outcome.evictions == 1


def test_a_late_cell_delays_the_next_cell_of_its_kernel() -> None:
    """Bob's cells ask 1 s apart; the first waits for alice's offload, so the second, which
    the kernel runs after it, starts as late as the first ended."""
    trace = trace_of(
        ("alice", "a", 0, 10, 6 * GB),
        ("bob", "b", 50, 0.2, 6 * GB),
        ("bob", "b", 51, 1, 6 * GB),
        ends={"a": 300},
    )
    assert waits(replay(trace)) == {"alice": [0.0], "bob": pytest.approx([SWAP, SWAP - 0.8])}


def test_cells_larger_than_any_gpu_fail_in_every_model() -> None:
    trace = trace_of(("alice", "a", 0, 10, 6 * GB), ("alice", "a", 20, 10, 12 * GB))
    result = simulate(trace, parse_pools("1x10GB"), load_site(None), baselines(3600))
    for outcome in result.pools[0].outcomes:
        assert outcome.failures == {"larger than any GPU": 1}, outcome.model
        assert outcome.wait(50) == NEVER and outcome.wait(0) == 0.0


def test_quotas_of_the_config_file_apply(tmp_path: Path) -> None:
    """A daily GPU-time quota of 15 s: alice's second cell (her 11th-20th second) runs, the
    third is denied; the waits percentiles then count it as never run."""
    config = tmp_path / "broker_config.json"
    config.write_text(
        json.dumps({"SingularityBroker": {"quotas": {"user:alice": {"gpu_seconds_per_day": 15}}}})
    )
    site = load_site(str(config))
    trace = trace_of(*(("alice", "a", t, 10, 1 * GB) for t in (0, 20, 40)))
    outcome = simulate(trace, parse_pools("1x10GB"), site, []).pools[0].outcomes[0]
    assert outcome.failures == {"denied": 1}
    assert waits(outcome) == {"alice": [0.0, 0.0, NEVER]}
    assert outcome.wait(95) == NEVER


def test_a_bad_config_file_names_the_setting(tmp_path: Path) -> None:
    config = tmp_path / "broker_config.py"
    config.write_text("c = get_config()\nc.SingularityBroker.idle_timeout = -5\n")
    with pytest.raises(ConfigError, match=r"SingularityBroker\.idle_timeout = -5.0: must be"):
        load_site(str(config))
    config.write_text("c = get_config()\nc.SingularityBroker.first_cell_memory = '8 apples'\n")
    with pytest.raises(
        ConfigError, match=r"SingularityBroker\.first_cell_memory = '8 apples': inv"
    ):
        load_site(str(config))
    config.write_text("c = get_config()\nc.SingularityBroker.quotas = {'user:x': {'gpus': 1}}\n")
    with pytest.raises(ConfigError, match=r"SingularityBroker\.quotas: quota 'user:x'"):
        load_site(str(config))
    with pytest.raises(ConfigError, match=r"--config .*nope\.py: no such file"):
        load_site(str(tmp_path / "nope.py"))
    config.write_text("c = get_config(\n")  # not Python: not read as if it were empty
    with pytest.raises(ConfigError, match=r"--config .*broker_config\.py: cannot read it \("):
        load_site(str(config))


def test_the_config_file_sets_the_cores_policy(tmp_path: Path) -> None:
    config = tmp_path / "broker_config.py"
    config.write_text(
        "c = get_config()\n"
        "c.SingularityBroker.idle_timeout = 120\n"
        "c.SingularityBroker.host_memory_limit = '64GiB'\n"
        "c.SingularityBroker.pinned_memory_limit = '2GiB'\n"
        "c.SingularityBroker.migration = False\n"
        "c.SingularityBroker.first_cell_memory = '8GiB'\n"
    )
    policy = load_site(str(config)).policy(parse_pools("2x80GiB")[0])
    assert (policy.idle_timeout, policy.migration) == (120, False)
    assert policy.first_cell_memory == 8 * GiB
    assert (policy.host_memory_limit, policy.pinned_per_kernel) == (64 * GiB, 2 * GiB)
    assert policy.pinned_total == 64 * GiB  # pinned_memory_total "0": host_memory_limit
    # Without a host_memory_limit: twice the pool's GPU memory, whatever this machine has.
    default = load_site(None).policy(parse_pools("2x80GiB")[0])
    assert default.host_memory_limit == 320 * GiB
    assert load_site(None, 8 * GiB).policy(parse_pools("2x80GiB")[0]).host_memory_limit == 8 * GiB


def test_a_cell_over_its_lease_and_the_room_left_runs_out_of_memory() -> None:
    """First cells of 2 GB by the policy: bob's (6 GB) starts beside alice's running 6 GB cell and
    fails as it would on a GPU; his next cell books what he could take, so alice is offloaded
    for it. By default his first cell books the whole GPU and waits for alice's instead."""
    trace = trace_of(
        ("alice", "a", 0, 10, 6 * GB),
        ("bob", "b", 5, 10, 6 * GB),
        ("bob", "b", 30, 10, 6 * GB),
        ends={"a": 100, "b": 100},
    )
    small = replay(trace, policy=replace(POLICY, first_cell_memory=2 * GB))
    assert small.failures == {"out of memory": 1}
    assert waits(small) == {"alice": [0.0], "bob": [NEVER, 1.5]}  # (1 s offload + 0.5 s)
    whole = replay(trace)
    assert whole.failures == {}
    assert waits(whole) == {"alice": [0.0], "bob": [6.5, 0.0]}


def test_a_cell_within_its_lease_runs_out_of_memory_while_another_holds_more_than_its_own():
    """First cells of 2 GB by the policy: alice's takes 6 GB; the bookings (4 x 2 GB) let bob's,
    carol's and dave's 2 GB cells start beside it, but only two of them find the room."""
    trace = trace_of(
        ("alice", "a", 0, 10, 6 * GB),
        *(
            (user, user[0], start, 10, 2 * GB)
            for start, user in enumerate(("bob", "carol", "dave"))
        ),
    )
    outcome = replay(trace, policy=replace(POLICY, first_cell_memory=2 * GB))
    assert outcome.failures == {"out of memory": 1}
    assert waits(outcome)["dave"] == [NEVER]


def test_the_answer_suggests_a_first_cell_memory_where_whole_gpu_first_cells_cost_users(
    tmp_path: Path,
) -> None:
    """Two 1 GB kernels start together: by default bob's first cell waits a minute for alice's
    (each books the whole GPU), so time-slicing serves both on one GPU and the pool does not.
    The hint's setting, given back through --config, makes the pool serve them there too."""
    trace = trace_of(("alice", "a", 0, 60, 1 * GB), ("bob", "b", 0, 60, 1 * GB))
    pools = parse_pools("1x10GB,2x10GB")
    default = simulate(trace, pools, load_site(None), baselines(3600))
    assert default.users_per_gpu()["singularity"]["users_per_gpu"] == 1.0
    hint = default.first_cell_hint()
    assert hint is not None and "time-slicing and idle culler serve more users" in hint, hint
    assert 'first_cell_memory = "954MiB"' in hint and "953.7 MiB at most" in hint, hint
    config = tmp_path / "broker_config.py"
    config.write_text('c = get_config()\nc.SingularityBroker.first_cell_memory = "954MiB"\n')
    tuned = simulate(trace, pools, load_site(str(config)), baselines(3600))
    assert tuned.users_per_gpu()["singularity"] == {"users_per_gpu": 2.0, "pool": "1x10GB"}
    assert tuned.first_cell_hint() is None


def test_percentiles_count_cells_that_did_not_run_as_never() -> None:
    assert percentile([], 95) is None
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)
    assert percentile([0.0, 1.0, NEVER], 50) == 1.0
    assert percentile([0.0, 1.0, NEVER], 95) == NEVER


# -------------------------------------------------------------------------------- baselines

# Alice's kernel lives from 0 to 100; bob's asks at 50 and 70; both use 6 GB of a 10 GB GPU.
OVERLAPPING = trace_of(
    ("alice", "a", 0, 10, 6 * GB),
    ("bob", "b", 50, 10, 6 * GB),
    ("bob", "b", 70, 10, 6 * GB),
    ends={"a": 100, "b": 200},
)


def run_baseline(trace, name: str, pool: str = "1x10GB", cull_after: float = 20):
    baseline = next(b for b in baselines(cull_after) if b.name == name)
    return SharedGpus(trace, parse_pools(pool)[0], baseline).run()


@pytest.mark.parametrize("name", [WHOLE_GPU, TIME_SLICING])
def test_without_eviction_bob_waits_for_alices_idle_kernel_to_end(name: str) -> None:
    """Bob's kernel starts when alice's ends (at 100): his first cell waits 50 s, the second
    (asked at 70) runs after it, 40 s late. On two GPUs nobody waits."""
    assert waits(run_baseline(OVERLAPPING, name)) == {"alice": [0.0], "bob": [50.0, 40.0]}
    assert waits(run_baseline(OVERLAPPING, name, "2x10GB")) == {"alice": [0.0], "bob": [0.0, 0.0]}


def test_time_slicing_shares_a_gpu_while_memory_fits_but_a_whole_gpu_does_not() -> None:
    small = trace_of(
        ("alice", "a", 0, 10, 6 * GB), ("bob", "b", 50, 10, 3 * GB), ends={"a": 100, "b": 200}
    )
    assert waits(run_baseline(small, TIME_SLICING)) == {"alice": [0.0], "bob": [0.0]}
    assert waits(run_baseline(small, WHOLE_GPU)) == {"alice": [0.0], "bob": [50.0]}


def test_time_slicing_fails_a_cell_that_outgrows_the_memory_left() -> None:
    """Alice's second cell needs 8 GB while bob's idle kernel holds 6: out of memory."""
    trace = trace_of(
        ("alice", "a", 0, 10, 3 * GB),
        ("bob", "b", 20, 10, 6 * GB),
        ("alice", "a", 40, 10, 8 * GB),
        ("alice", "a", 60, 10, 3 * GB),
        ends={"b": 300},
    )
    outcome = run_baseline(trace, TIME_SLICING)
    assert outcome.failures == {"out of memory": 1}
    assert waits(outcome) == {"alice": [0.0, NEVER, 0.0], "bob": [0.0]}


def test_the_idle_culler_frees_memory_and_costs_a_rerun() -> None:
    """Culled after 20 s idle (at 30), alice's kernel lets bob's start at once; her cell at 100
    first re-runs her 10 s cell: it waits 10 s, and one cell was run again."""
    trace = trace_of(
        ("alice", "a", 0, 10, 6 * GB),
        ("bob", "b", 50, 10, 6 * GB),
        ("alice", "a", 100, 10, 6 * GB),
        ends={"a": 200, "b": 60},
    )
    culled = run_baseline(trace, IDLE_CULLER)
    assert waits(culled) == {"alice": [0.0, 10.0], "bob": [0.0]}
    assert culled.rerun_cells == 1
    assert culled.gpu_seconds["alice"] == 30.0  # two cells and the re-run
    sliced = run_baseline(trace, TIME_SLICING)
    assert waits(sliced) == {"alice": [0.0, 0.0], "bob": [150.0]}  # until alice's kernel ends


def test_users_per_gpu_is_users_over_the_smallest_pool_that_meets_the_target() -> None:
    result = simulate(OVERLAPPING, parse_pools("2x10GB,1x10GB"), load_site(None), baselines(20))
    answer = result.users_per_gpu()
    assert answer["singularity"] == {"users_per_gpu": 2.0, "pool": "1x10GB"}
    assert answer[WHOLE_GPU] == {"users_per_gpu": 1.0, "pool": "2x10GB"}
    assert answer[TIME_SLICING] == {"users_per_gpu": 1.0, "pool": "2x10GB"}
    # Culled after 20 s idle, alice's kernel makes room for bob's in time: 1 GPU is enough.
    assert answer[IDLE_CULLER] == {"users_per_gpu": 2.0, "pool": "1x10GB"}


# ---------------------------------------------------------------------------------- ledger

T = 1_767_600_000.0


def write_ledger(path: Path) -> None:
    """Kernel k1 of alice: a first cell of 10 s; a second cell that queued at +20, was granted
    at +25, restored until +26 and ran until +36; the kernel left at +100. Kernel k2 of bob:
    one cell; a lease still open is left out."""
    ledger = Ledger(f"sqlite:///{path}")

    def change(time: float, kernel: str, user: str, old: str | None, new: str) -> None:
        ledger.state_changed(time=time, kernel_id=kernel, user=user, old=old, new=new)

    def lease(kernel: str, user: str, lid: str, start: float, end: float | None, peak: int):
        ledger.lease_started(
            lease_id=lid, kernel_id=kernel, user=user, device_index=0, device_uuid="GPU-0",
            reservation_bytes=16 * GiB, start=start,
        )  # fmt: skip
        if end is not None:
            ledger.lease_ended(lid, end, peak)

    change(T, "k1", "alice", None, "cold")
    lease("k1", "alice", "k1:r1", T + 1, T + 11, 2 * GiB)
    change(T + 1, "k1", "alice", "cold", "running")
    change(T + 11, "k1", "alice", "running", "resident")
    change(T + 15, "k1", "alice", "resident", "offloaded")
    change(T + 20, "k1", "alice", "offloaded", "queued")
    lease("k1", "alice", "k1:r2", T + 25, T + 36, 3 * GiB)
    change(T + 25, "k1", "alice", "queued", "restoring")
    change(T + 26, "k1", "alice", "restoring", "running")
    change(T + 36, "k1", "alice", "running", "resident")
    change(T + 100, "k1", "alice", "resident", "gone")
    change(T + 5, "k2", "bob", None, "cold")
    lease("k2", "bob", "k2:r1", T + 40, T + 45, 1 * GiB)
    lease("k2", "bob", "k2:r2", T + 50, None, 0)
    ledger.close()


def test_a_ledger_is_read_as_a_trace_without_its_waits(tmp_path: Path) -> None:
    write_ledger(tmp_path / "ledger.sqlite")
    trace = read_ledger(str(tmp_path / "ledger.sqlite"))
    alice, bob = trace.sessions
    assert [(c.start - T, c.duration, c.memory) for c in alice.cells] == [
        (1.0, 10.0, 2 * GiB),
        (20.0, 10.0, 3 * GiB),  # asked at +20 (queued), ran 10 s after its restore
    ]
    assert alice.end - T == 100 - 6  # its 6 s of waiting taken out
    assert [(c.start - T, c.duration, c.memory) for c in bob.cells] == [(40.0, 5.0, GiB)]
    assert bob.end - T == 45  # (no "gone": its last cell's end)


def test_a_missing_or_empty_ledger_is_named(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"--ledger .*nope\.sqlite: no such ledger file"):
        read_ledger(str(tmp_path / "nope.sqlite"))
    Ledger(f"sqlite:///{tmp_path / 'empty.sqlite'}").close()
    with pytest.raises(TraceError, match=r"no ended leases in the ledger"):
        read_ledger(f"sqlite:///{tmp_path / 'empty.sqlite'}")


# ---------------------------------------------------------------------------- command line


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jupyter_singularity.cli", "simulate", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_command_answers_in_json_for_a_trace_file(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text(
        "user,kernel,start,duration,memory,kernel_end\n"
        "alice,a,0,10,6GB,100\nbob,b,50,10,6GB,200\nbob,b,70,10,6GB,200\n"
    )
    done = cli("--trace", str(path), "--devices", "1x10GB,2x10GB", "--format", "json",
               "--cull-idle", "20")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress bar without a terminal
    report = json.loads(done.stdout)
    assert report["trace"] == {
        "source": str(path), "users": 2, "kernels": 2, "cells": 3, "hours": round(200 / 3600, 3)
    }  # fmt: skip
    assert report["users_per_gpu"] == {
        "singularity": {"users_per_gpu": 2.0, "pool": "1x10GB"},
        WHOLE_GPU: {"users_per_gpu": 1.0, "pool": "2x10GB"},
        TIME_SLICING: {"users_per_gpu": 1.0, "pool": "2x10GB"},
        IDLE_CULLER: {"users_per_gpu": 2.0, "pool": "1x10GB"},
    }
    one_gpu = report["pools"][0]
    assert (one_gpu["devices"], one_gpu["gpus"]) == ("1x10GB", 1)
    ours = one_gpu["models"]["singularity"]
    assert ours["evictions"] == 1 and ours["failed_cells"] == 0
    assert ours["bytes_moved"] == {"offloaded": 6 * GB}
    assert [u["user"] for u in ours["users"]] == ["alice", "bob"]
    assert one_gpu["models"][TIME_SLICING]["p95_wait_s"] == pytest.approx(49.0)


def test_the_text_report_keeps_its_columns_when_waits_pass_a_day(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"  # (bob's cell waits three days for alice's)
    path.write_text(
        "user,kernel,start,duration,memory,kernel_end\n"
        "alice,a,0,259200,6GB,300000\nbob,b,10,10,6GB,300000\n"
    )
    done = cli("--trace", str(path), "--devices", "1x10GB")
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("  singularity "))
    model, p50, p95, p99, failed, rerun, *_ = row.split()
    assert (model, p50, p95, p99, failed, rerun) == (
        "singularity",
        "36h",
        "68h",
        "71h",
        "0",
        "0",
    ), row
    assert "past a day in hours (h)" in done.stdout


def test_the_command_reads_ledgers_and_draws_a_plot(tmp_path: Path) -> None:
    write_ledger(tmp_path / "ledger.sqlite")
    plot = tmp_path / "waits.html"
    done = cli("--ledger", f"sqlite:///{tmp_path / 'ledger.sqlite'}", "--devices", "1x16GiB",
               "--plot", str(plot), "--per-user")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "users per GPU at p95 wait <= 10 s:" in done.stdout
    assert "  singularity    2 (on 1x16GiB)" in done.stdout
    assert "\n  alice " in done.stdout and "\n  bob " in done.stdout  # the per-user table
    html = plot.read_text()
    assert "vega-embed" in html and '"model": "whole GPU"' in html.replace("'", '"')
    assert "cdn.jsdelivr.net" not in html  # (Vega travels in the page: it opens offline)
    picture = tmp_path / "waits.png"
    done = cli("--ledger", str(tmp_path / "ledger.sqlite"), "--devices", "1x16GiB",
               "--plot", str(picture))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert picture.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give one trace: --trace FILE, --ledger DB_URL or --generate SPEC"),
        (("--generate", "lab", "--trace", "x.csv"), "give one trace"),
        (("--generate", "lab,users=x"), "--generate: users: expected a whole number"),
        (("--generate", "lab", "--devices", "2y80"), "--devices: '2y80': invalid size"),
        (("--generate", "lab", "--devices", "0x80GiB"), "--devices: '0x80GiB': between 1 and"),
        (("--generate", "lab", "--disk-gbps", "0"), "--disk-gbps: must be > 0 GB/s"),
        (("--generate", "lab", "--host-memory", "lots"), "--host-memory: invalid size 'lots'"),
        (("--generate", "lab", "--target", "nan"), "--target: must be a number of seconds > 0"),
        (("--trace", "missing.csv"), "missing.csv: cannot read the trace"),
        (("--generate", "lab", "--plot", "w.pdf"), "--plot w.pdf: the file's suffix names the"),
    ],
)
def test_the_command_refuses_bad_input_in_one_line(args: tuple, message: str) -> None:
    done = cli(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(f"jupyter singularity simulate: {message}"), done.stderr
    assert done.stderr.count("\n") == 1


def test_the_command_says_a_bad_quota_file_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "quotas.yaml").write_text("user:alice: [1\n")
    config = tmp_path / "broker_config.py"
    config.write_text(
        f"c = get_config()\nc.SingularityBroker.quota_file = '{tmp_path}/quotas.yaml'\n"
    )
    done = cli("--generate", "lab", "--config", str(config))
    assert done.returncode == 2
    assert done.stderr.startswith(
        f"jupyter singularity simulate: SingularityBroker.quota_file = '{tmp_path}/quotas.yaml':"
        " quota file"
    ), done.stderr
    assert "not valid YAML" in done.stderr and done.stderr.count("\n") == 1


def test_the_command_names_the_bad_line_of_a_trace(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text('{"user": "a", "kernel": "k", "start": 0, "duration": 1, "memory": "1GiB"}\n'
                    '{"user": "a", "kernel": "k", "start": 5, "duration": 1}\n')  # fmt: skip
    done = cli("--trace", str(path))
    assert done.returncode == 2
    assert done.stderr == "jupyter singularity simulate: trace.jsonl line 2: memory: missing\n"


def test_the_generated_day_is_replayed_for_each_pool() -> None:
    """A small generated day on two pools: every model replays every cell, and the numbers
    are what a person would read (no cell lost, percentiles in order)."""
    trace = generate(parse_workload("day,users=12,cells=8,seed=3"))
    result = simulate(trace, parse_pools("1x80GiB,2x80GiB"), load_site(None), baselines(600))
    assert [r.pool.gpus for r in result.pools] == [1, 2]
    for pool in result.pools:
        assert [o.model for o in pool.outcomes] == ["singularity", *(b.name for b in baselines(0))]
        for outcome in pool.outcomes:
            assert sum(map(len, outcome.waits.values())) == trace.cells, outcome.model
            assert outcome.wait(50) <= outcome.wait(95) <= outcome.wait(99)
            assert not math.isnan(outcome.wait(95))
