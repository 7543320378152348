"""``--plot FILE``: the waits against pool size, for the pool and the baselines, as a Vega-Lite
chart (altair). ``.html`` is one page that carries Vega with it, so it opens on a machine without
network (as many GPU clusters are); ``.png`` and ``.svg`` are pictures. vl-convert (the Vega
project's renderer, no browser) makes all three; without it an HTML page that loads Vega from
jsDelivr is written instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .outcome import NEVER
from .sweep import Simulation

INSTALL_HINT = "pip install 'jupyter-singularity[simulate]'"
FORMATS = {".html": "html", ".png": "png", ".svg": "svg"}
WAIT_TICKS = [0, 1, 10, 60, 600, 3600, 36000, 360000]
"""Seconds marked on the waits' axis (a second, ten, a minute, ten, an hour, ten, a hundred)."""


def plot_format(path: str | Path) -> str:
    """The chart's format, named by the file's suffix; raises ValueError where it names none
    and RuntimeError (with the install line) where a library it needs is missing: before a
    replay, not after it."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"the file's suffix names the format: .html, .png or .svg, not {suffix!r}")
    try:
        import altair  # noqa: F401
    except ImportError:
        raise RuntimeError(f"--plot needs altair: {INSTALL_HINT}") from None
    if FORMATS[suffix] != "html" and not _has_vl_convert():
        raise RuntimeError(f"a {suffix} picture needs vl-convert-python: {INSTALL_HINT}")
    return FORMATS[suffix]


def _has_vl_convert() -> bool:
    try:
        import vl_convert  # noqa: F401
    except ImportError:
        return False
    return True


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
    """Write the chart in the format ``path`` names (see :func:`plot_format`)."""
    form = plot_format(path)
    import altair as alt

    trace = simulation.trace.summary()
    data = alt.Data(values=chart_rows(simulation))
    base = alt.Chart(data).encode(
        x=alt.X(
            "gpus:Q",
            title="GPUs in the pool",
            scale=alt.Scale(type="log", base=2),
            axis=alt.Axis(values=sorted({r.pool.gpus for r in simulation.pools})),
        ),
        y=alt.Y(
            "wait_s:Q",
            title="cell wait (s)",
            scale=alt.Scale(type="symlog"),
            axis=alt.Axis(values=WAIT_TICKS),
        ),
        color=alt.Color("model:N", title="model"),
        tooltip=["model:N", "percentile:N", "gpus:Q", "users_per_gpu:Q", "wait_s:Q"],
    )
    # (the points in a layer of their own: on the lines' mark, they hide the dashes' legend)
    lines = base.mark_line().encode(strokeDash=alt.StrokeDash("percentile:N", title="percentile"))
    waits = lines + base.mark_point(filled=True)
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
    inline = {"inline": True} if form == "html" and _has_vl_convert() else {}
    chart.save(str(path), format=form, **inline)
