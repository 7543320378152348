"""What one batch of the pool's events tells the browser (broker/pool_events.py)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from jupyter_singularity.broker.pool_events import (
    KERNEL_STATE_SCHEMA,
    LEASE_SCHEMA,
    PIN_SCHEMA,
    coalesce,
    lease_event,
)


def state(kernel: str, old: str | None, new: str | None, device: int | None = 0) -> tuple:
    data = {"kernel_id": kernel, "user": "u", "old": old, "new": new, "device": device}
    return (KERNEL_STATE_SCHEMA, {**data, "reason": ""})


def lease(kernel: str, request: str, action: str) -> tuple:
    return (LEASE_SCHEMA, lease_event(kernel, request, action, device=0))


def cell(
    kernel: str, request: str, around: str = "resident", device: int | None = 0
) -> list[tuple]:
    return [
        lease(kernel, request, "granted"),
        state(kernel, around, "running", device),
        lease(kernel, request, "ended"),
        state(kernel, "running", around, device),
    ]


def test_a_lease_in_passing_is_told_by_its_end_whatever_other_kernels_did_meanwhile() -> None:
    a, b = cell("a", "r1"), cell("b", "r2")
    interleaved = [a[0], b[0], a[1], b[1], b[2], a[2], a[3], b[3]]
    assert coalesce(interleaved) == [b[2], a[2]]


def test_what_a_browser_must_hear_is_kept() -> None:
    first = [  # a first cell: the kernel ends in another state than it started in
        lease("a", "r1", "granted"),
        state("a", "cold", "running"),
        lease("a", "r1", "ended"),
        state("a", "running", "resident"),
    ]
    assert coalesce(first) == first
    pinned = cell("a", "r2")
    pinned.insert(2, (PIN_SCHEMA, {"kernel_id": "a", "pinned": True}))
    assert coalesce(pinned) == pinned
    moved = cell("a", "r3")
    moved[3] = state("a", "running", "resident", device=1)
    assert coalesce(moved) == moved
    gone = [  # a kernel registered and gone: never mistaken for a state it went back to
        lease("a", "r4", "granted"),
        state("a", None, "running"),
        lease("a", "r4", "ended"),
        state("a", "running", None),
    ]
    assert coalesce(gone) == gone
    unfinished = cell("a", "r5")[:3]
    assert coalesce(unfinished) == unfinished


STEPS = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),
        st.sampled_from(["cell", "move", "pin"]),
        st.sampled_from(["resident", "running", "offloaded"]),
        st.sampled_from([0, 1]),
    ),
    max_size=12,
)
START = {"a": ("resident", 0), "b": ("cold", None)}


def batch(steps: list[tuple]) -> list[tuple]:
    """A batch two kernels could cause, each event of a kernel from where the last one left it."""
    now, events = dict(START), []
    for number, (kernel, kind, to, device) in enumerate(steps):
        old, at = now[kernel]
        if kind == "cell" and old != "running":
            events += cell(kernel, f"r{number}", old, at)
        elif kind == "pin":
            events.append((PIN_SCHEMA, {"kernel_id": kernel, "pinned": True}))
        else:
            events.append(state(kernel, old, to, device))
            now[kernel] = (to, device)
    return events


def last_states(events: list[tuple]) -> dict:
    states = dict(START)
    for name, data in events:
        if name == KERNEL_STATE_SCHEMA:
            states[data["kernel_id"]] = (data["new"], data["device"])
    return states


@given(STEPS, st.randoms())
@settings(max_examples=300, deadline=None)
def test_a_batch_tells_the_same_end_states_and_every_other_event(steps, random) -> None:
    """Whatever the batch: the states it leaves kernels in are the same, it is the same events
    in the same order less some, and only granted and state events are ever left out."""
    events = batch(steps)
    if random.random() < 0.5:  # (interleave the kernels' events, each kernel's in its order)
        by_kernel: dict[str, list] = {}
        for event in events:
            by_kernel.setdefault(event[1]["kernel_id"], []).append(event)
        events = []
        while any(by_kernel.values()):
            kernel = random.choice([k for k, v in by_kernel.items() if v])
            events.append(by_kernel[kernel].pop(0))
    kept = coalesce(events)
    assert last_states(kept) == last_states(events)
    at = iter(events)
    assert all(any(event is other for other in at) for event in kept)  # (a subsequence)
    left_out = [event for event in events if not any(event is k for k in kept)]
    for name, data in left_out:
        assert name == KERNEL_STATE_SCHEMA or data.get("action") == "granted"
    ended = [e for e in events if e[0] == LEASE_SCHEMA and e[1]["action"] == "ended"]
    assert all(any(e is k for k in kept) for e in ended)
