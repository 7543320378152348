"""``jupyter singularity simulate``: the command line (see docs/simulate.md).

Its options are declared here and the work is imported only when it runs, so that other
subcommands start as fast as before.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

DEFAULT_POOLS = "1x80GiB,2x80GiB,4x80GiB,8x80GiB"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("trace (one of)")
    source.add_argument("--trace", metavar="FILE", help="a trace file: CSV, or JSON Lines (.jsonl)")
    source.add_argument(
        "--ledger",
        metavar="DB_URL",
        action="append",
        help="the usage ledger of a pool (SQLAlchemy URL or SQLite file; repeat to merge several)",
    )
    source.add_argument(
        "--generate",
        metavar="SPEC",
        help="a generated trace: PRESET[,KEY=VALUE...], presets 'day' and 'lab' "
        "(e.g. lab,users=30,seed=2)",
    )
    parser.add_argument(
        "--devices",
        default=DEFAULT_POOLS,
        metavar="POOLS",
        help=f"pools to try, NxSIZE separated by commas (default {DEFAULT_POOLS})",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="the node broker's configuration file (quotas, idle_timeout, host_memory_limit...)",
    )
    parser.add_argument(
        "--host-memory",
        metavar="SIZE",
        help="host memory for offloaded state (default: the config's host_memory_limit, else "
        "twice the pool's GPU memory)",
    )
    parser.add_argument(
        "--target", type=float, default=10.0, metavar="SECONDS", help="p95 cell wait to meet"
    )
    parser.add_argument(
        "--cull-idle",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="the idle culler baseline's timeout (default 3600)",
    )
    transfers = parser.add_argument_group("transfer model (defaults: an H100 on PCIe Gen5)")
    transfers.add_argument("--pinned-gbps", type=float, default=55.0, metavar="GB/s")
    transfers.add_argument("--pageable-gbps", type=float, default=10.0, metavar="GB/s")
    transfers.add_argument("--disk-gbps", type=float, default=2.0, metavar="GB/s")
    transfers.add_argument("--context-seconds", type=float, default=0.4, metavar="SECONDS")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument(
        "--per-user", action="store_true", help="print the per-user table of the pool's replay"
    )
    parser.add_argument(
        "--plot",
        metavar="FILE",
        help="write a chart of waits by pool size: FILE.html (a page that opens offline), "
        "FILE.png or FILE.svg",
    )


def run(args: argparse.Namespace) -> int:
    from ..broker.settings import ConfigError
    from ..units import parse_size
    from .baselines import baselines
    from .generator import generate, parse_workload
    from .ledger_trace import read_ledger
    from .plot import plot_format, save_plot
    from .progress import ProgressBar
    from .report import to_json, to_text
    from .site import load_site, parse_pools
    from .sweep import simulate
    from .trace import TraceError, merge_traces, read_trace
    from .transfers import Transfers

    chosen = [name for name in ("trace", "ledger", "generate") if getattr(args, name)]
    if len(chosen) != 1:
        return _fail("give one trace: --trace FILE, --ledger DB_URL or --generate SPEC")
    for name in ("target", "cull_idle"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            return _fail(f"--{name.replace('_', '-')}: must be a number of seconds > 0")
    try:
        pools = parse_pools(args.devices)
    except ValueError as err:
        return _fail(f"--devices: {err}")
    if args.plot:
        try:
            plot_format(args.plot)
        except (ValueError, RuntimeError) as err:
            return _fail(f"--plot {args.plot}: {err}")
    try:
        transfers = Transfers(
            args.pinned_gbps, args.pageable_gbps, args.disk_gbps, args.context_seconds
        )
    except ValueError as err:  # "pinned_gbps: must be > 0 GB/s..."
        name, _, why = str(err).partition(": ")
        return _fail(f"--{name.replace('_', '-')}: {why}")
    try:
        host_memory = None if args.host_memory is None else parse_size(args.host_memory)
    except (ValueError, TypeError) as err:
        return _fail(f"--host-memory: {err}")
    try:
        if args.generate:
            trace = generate(parse_workload(args.generate))
        elif args.ledger:
            trace = merge_traces([read_ledger(url) for url in args.ledger])
        else:
            trace = read_trace(args.trace)
        site = load_site(args.config, host_memory)
    except ValueError as err:  # TraceError, ConfigError, a bad --generate
        where = "" if isinstance(err, TraceError | ConfigError) else "--generate: "
        return _fail(f"{where}{err}")
    bar = ProgressBar()
    try:
        simulation = simulate(
            trace, pools, site, baselines(args.cull_idle), args.target, transfers, bar
        )
    finally:
        bar.close()
    if args.plot:
        try:
            save_plot(simulation, args.plot)
        except (RuntimeError, OSError) as err:
            return _fail(f"--plot {args.plot}: {err}")
    if args.format == "json":
        json.dump(to_json(simulation), sys.stdout, indent=1)
        print()
    else:
        print(to_text(simulation, per_user=args.per_user))
    return 0


def _fail(message: str) -> int:
    """One line on stderr (a YAML error quoted in a quota error spans several)."""
    print(f"jupyter singularity simulate: {' '.join(message.split())}", file=sys.stderr)
    return 2
