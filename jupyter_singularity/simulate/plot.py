"""``--plot out.html``: the waits against pool size, for the pool and the baselines, as a Vega-Lite
chart (altair) in one HTML file that loads Vega from jsDelivr at the versions altair names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .outcome import NEVER
from .sweep import Simulation

INSTALL_HINT = "pip install 'jupyter-singularity[simulate]'"


def chart_rows(simulation: Simulation) -> list[dict[str, Any]]:
    """One row per pool, model and percentile; waits of cells that did not run (infinite) are
    left out, so the line of a model that fails cells stops where it does."""
    users = len(simulation.trace.users)
    rows = []
    for result in simulation.pools:
        for outcome in result.outcomes:
            for q in (50, 95):
                value = outcome.wait(q)
                if value != NEVER:
                    rows.append(
                        {
                            "gpus": result.pool.gpus,
                            "users_per_gpu": round(users / result.pool.gpus, 3),
                            "model": outcome.model,
                            "percentile": f"p{q}",
                            "wait_s": round(value, 3),
                        }
                    )
    return rows


def save_plot(simulation: Simulation, path: str | Path) -> None:
    """Write the chart; raises RuntimeError with the install line where altair is missing."""
    try:
        import altair as alt
    except ImportError:
        raise RuntimeError(f"--plot needs altair: {INSTALL_HINT}") from None
    trace = simulation.trace.summary()
    data = alt.Data(values=chart_rows(simulation))
    waits = (
        alt.Chart(data)
        .mark_line(point=True)
        .encode(
            x=alt.X("gpus:Q", title="GPUs in the pool", scale=alt.Scale(type="log", base=2)),
            y=alt.Y("wait_s:Q", title="cell wait (s)", scale=alt.Scale(type="symlog")),
            color=alt.Color("model:N", title="model"),
            strokeDash=alt.StrokeDash("percentile:N", title="percentile"),
            tooltip=["model:N", "percentile:N", "gpus:Q", "users_per_gpu:Q", "wait_s:Q"],
        )
    )
    target = (
        alt.Chart(alt.Data(values=[{"target": simulation.target}]))
        .mark_rule(color="gray", strokeDash=[2, 2])
        .encode(y="target:Q")
    )
    chart = (waits + target).properties(
        title=f"{trace['users']} users, {trace['cells']} GPU cells ({trace['source']}): "
        f"target p95 <= {simulation.target:g} s (dotted)",
        width=560,
        height=340,
    )
    chart.save(str(path), format="html")
