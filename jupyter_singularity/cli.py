"""``jupyter singularity``: the pool from the command line.

``status`` prints the pool: the node's, from its broker, where one serves this machine, else that of
each running server; ``lab`` starts JupyterLab with the pool, on simulated devices sized from the
machine's memory when it has no NVIDIA GPU (and says so); ``broker`` runs the node broker;
``simulate`` replays notebook activity on pools of several sizes (how many users a GPU serves);
``usage`` prints the ledger's GPU-hours per user, group or node.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from . import usage as usage_command
from .devices import default_simulated_spec, open_inventory, usable_memory
from .simulate import command as simulate_command
from .units import format_size


def _running_servers() -> list[dict]:
    from jupyter_server.serverapp import list_running_servers

    return list(list_running_servers())


def _node_socket() -> str | None:
    """The node broker's socket at its usual place, if a broker serves this machine."""
    from .broker.app import SingularityBroker

    default = SingularityBroker.socket.default_value
    return default if os.path.exists(default) else None


def fetch_pool(server: dict, timeout: float = 10.0) -> dict:
    """``GET singularity/api/pool`` of one running server, authenticated with its token."""
    request = urllib.request.Request(
        server["url"].rstrip("/") + "/singularity/api/pool",
        headers={"Authorization": f"token {server.get('token', '')}"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def format_pool(pool: dict) -> str:
    """The pool as a table a person reads at a glance."""
    inventory = pool.get("inventory", {})
    lines = []
    if not pool["devices"]:
        lines.append(f"no devices ({inventory.get('reason') or 'empty pool'})")
    for device in pool["devices"]:
        simulated = " (simulated)" if inventory.get("simulated") else ""
        lines.append(
            f"GPU {device['index']}  {device['name']}{simulated}  "
            f"{format_size(device['booked_bytes'])} booked of {format_size(device['total_bytes'])}"
        )
    lines.append("")
    header = f"{'KERNEL':<10} {'USER':<12} {'STATE':<11} {'DEVICE':<6} {'GPU':>10} {'HOST':>10}  NOTEBOOK"
    lines.append(header)
    for kernel in pool["kernels"]:
        device = "-" if kernel["device"] is None else str(kernel["device"])
        pin = " (pinned)" if kernel["pinned"] else ""
        lines.append(
            f"{kernel['kernel_id'][:8]:<10} {kernel['user'][:12]:<12} {kernel['state']:<11} "
            f"{device:<6} {format_size(kernel['gpu_bytes']):>10} "
            f"{format_size(kernel['host_bytes']):>10}  {kernel['notebook']}{pin}"
        )
    if not pool["kernels"]:
        lines.append("(no kernels)")
    if pool["queue"]:
        lines.append("")
        lines.append("QUEUE")
        for entry in pool["queue"]:
            lines.append(f"  #{entry['position']} {entry['kernel_id'][:8]}: {entry['reason']}")
    return "\n".join(lines)


def node_status(socket: str) -> int:
    """The whole node's pool, from its broker (kernels of other users without notebook paths,
    unless you are an admin)."""
    from .broker.control import ask
    from .broker.frontend import PoolError

    try:
        pool = ask(socket, "pool")
    except PoolError as err:
        print(f"{socket}: {err.message}", file=sys.stderr)
        return 1
    print(f"node broker at {socket}")
    print(format_pool(pool))
    return 0


def status(args: argparse.Namespace) -> int:
    socket = args.socket or (None if args.url else _node_socket())
    if socket:
        return node_status(socket)
    servers = _running_servers()
    if args.url:
        servers = [s for s in servers if s["url"].rstrip("/") == args.url.rstrip("/")] or [
            {"url": args.url, "token": args.token or ""}
        ]
    if not servers:
        print(
            "no running Jupyter server found (start one with: jupyter singularity lab)",
            file=sys.stderr,
        )
        return 1
    code = 0
    for server in servers:
        try:
            pool = fetch_pool(server)
        except urllib.error.HTTPError as err:
            print(
                f"{server['url']}: {err.code} {err.reason} (is jupyter-singularity enabled?)",
                file=sys.stderr,
            )
            code = 1
            continue
        except (urllib.error.URLError, OSError) as err:
            print(f"{server['url']}: cannot reach the server ({err})", file=sys.stderr)
            code = 1
            continue
        print(f"{server['url']}")
        print(format_pool(pool))
    return code


def lab(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Run ``jupyter lab`` with the pool; without a GPU, on simulated devices."""
    argv = [sys.executable, "-m", "jupyterlab", *extra]
    if not any(arg.startswith("--SingularityApp.devices") for arg in extra):
        inventory = open_inventory("auto")
        if not inventory.devices():
            spec, why = default_simulated_spec(usable_memory())
            print(
                f"jupyter-singularity: no NVIDIA GPU found ({inventory.reason}); starting with "
                f"simulated devices: --SingularityApp.devices={spec} ({why})",
                file=sys.stderr,
            )
            argv.append(f"--SingularityApp.devices={spec}")
        inventory.close()
    os.execv(sys.executable, argv)
    return 0  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jupyter singularity", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    status_parser = commands.add_parser("status", help="print the pool of a running server")
    status_parser.add_argument("--url", help="server URL (default: every running server)")
    status_parser.add_argument("--token", help="token for --url when it is not a listed server")
    status_parser.add_argument(
        "--socket",
        help="the node broker's socket (default: /run/jupyter-singularity/broker.sock when it "
        "exists; else the running servers' pools)",
    )
    commands.add_parser("lab", help="start JupyterLab with the pool (simulated without a GPU)")
    commands.add_parser(
        "broker",
        help="run the node broker that every user's server of this machine joins "
        "(options: --SingularityBroker.<setting>=...; --help-all lists them)",
        add_help=False,
    )
    simulate_command.add_arguments(
        commands.add_parser(
            "simulate",
            help="replay notebook activity on pools of several sizes: how many users a GPU "
            "serves, and how long they wait (docs/simulate.md)",
        )
    )
    usage_command.add_arguments(
        commands.add_parser(
            "usage",
            help="GPU-hours from the node broker's ledger, per user, group or node (a table or CSV)",
        )
    )
    args, extra = parser.parse_known_args(argv)
    if args.command == "lab":
        return lab(args, extra)
    if args.command == "broker":
        from .broker.app import main as broker

        broker(list(extra))
        return 0
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "simulate":
        return simulate_command.run(args)
    if args.command == "usage":
        return usage_command.run(args)
    return status(args)


if __name__ == "__main__":
    sys.exit(main())
