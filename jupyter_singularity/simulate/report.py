"""The simulation's results for people (a text report) and for scripts (JSON)."""

from __future__ import annotations

from typing import Any

from ..units import format_size
from .outcome import NEVER
from .sweep import Simulation

LONG_WAIT_S = 86_400
"""Waits from a day up are shown in hours."""


def to_json(simulation: Simulation) -> dict[str, Any]:
    """Every number of the run. Waits are seconds; a percentile is null where more of the cells
    than it leaves out did not run (an infinite wait)."""
    return {
        "trace": simulation.trace.summary(),
        "target_p95_wait_s": simulation.target,
        "transfers": vars(simulation.transfers),
        "users_per_gpu": simulation.users_per_gpu(),
        "hint": simulation.first_cell_hint(),
        "pools": [
            {
                "devices": result.pool.name,
                "gpus": result.pool.gpus,
                "gpu_bytes": result.pool.largest,
                "models": {
                    outcome.model: {
                        **outcome.summary(),
                        "replay_seconds": round(result.seconds[outcome.model], 3),
                        "users": outcome.per_user(),
                    }
                    for outcome in result.outcomes
                },
            }
            for result in simulation.pools
        ],
    }


def to_text(simulation: Simulation, per_user: bool = False) -> str:
    trace = simulation.trace.summary()
    lines = [
        f"trace: {trace['source']}: {trace['users']} users, {trace['kernels']} kernels, "
        f"{trace['cells']} GPU cells over {trace['hours']:.1f} h",
        "",
    ]
    for result in simulation.pools:
        size = format_size(result.pool.largest)
        lines.append(f"{result.pool.name}: {result.pool.gpus} GPU(s) of {size}")
        lines.append(
            f"  {'MODEL':<14}{'p50':>8}{'p95':>8}{'p99':>8}  {'FAILED':>6} {'RE-RUN':>6}"
            f" {'UTIL':>5} {'EVICT/h':>8} {'MOVED':>10}"
        )
        for outcome in result.outcomes:
            s = outcome.summary()
            moved = sum(s["bytes_moved"].values())
            lines.append(
                f"  {outcome.model:<14}{_seconds(s['p50_wait_s'])}{_seconds(s['p95_wait_s'])}"
                f"{_seconds(s['p99_wait_s'])}  {s['failed_cells']:>6} {s['rerun_cells']:>6}"
                f" {_percent(s['gpu_utilisation'])} {s['evictions_per_hour'] or 0:>8.1f}"
                f" {format_size(moved):>10}"
            )
        if per_user:
            lines.extend(_per_user(result.outcomes[0].per_user()))
        lines.append("")
    lines.append(f"users per GPU at p95 wait <= {simulation.target:g} s:")
    for model, answer in simulation.users_per_gpu().items():
        if answer["users_per_gpu"] is None:
            lines.append(f"  {model:<14} none of these pools")
        else:
            lines.append(f"  {model:<14} {answer['users_per_gpu']:g} (on {answer['pool']})")
    hint = simulation.first_cell_hint()
    if hint:
        lines.append(f"hint: {hint}")
    lines.append(
        "(waits in seconds, past a day in hours (h): how late a cell started computing; a cell "
        "that did not run counts as waiting forever, shown as 'never')"
    )
    return "\n".join(lines)


def _per_user(rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"  {'USER':<16}{'CELLS':>6}{'p50':>8}{'p95':>8}{'MAX':>8} {'FAILED':>6} {'GPU-h':>7}"]
    for row in rows:
        lines.append(
            f"  {row['user'][:16]:<16}{row['cells']:>6}{_seconds(row['p50_wait_s'])}"
            f"{_seconds(row['p95_wait_s'])}{_seconds(row['max_wait_s'])} {row['failed_cells']:>6}"
            f" {row['gpu_hours']:>7.2f}"
        )
    return lines


def _seconds(value: float | None) -> str:
    """A wait in a column of 8: a space, then seconds, or hours past a day (an overloaded pool's
    waits would run into the next column)."""
    if value is None or value == NEVER:
        return f" {'never':>7}"
    if value < LONG_WAIT_S:
        return f" {value:>7.1f}"
    return f" {value / 3600:>6.0f}h"


def _percent(value: float | None) -> str:
    return f"{'-':>5}" if value is None else f"{value:>5.0%}"
