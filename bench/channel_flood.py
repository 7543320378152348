"""Flood the broker's kernel channel and watch the server (issue 8, item 5).

Starts a real ``python -m jupyter_server`` with the pool (one simulated device) and one kernel,
reads the kernel channel's endpoint from the kernel's environment, then, from a separate process
of the same user (the strongest attacker that can still reach the channel), floods it for
``--seconds`` each with

* ``junk``: small frames that are not the protocol at all;
* ``huge``: frames of 16 MiB less 1 KiB (a signed-looking message whose header is padded);
* ``forged``: well-formed messages for the running kernel, signed with a wrong key.

Before the floods it measures the quiet server for as long. For each phase it reports the
latency of ``GET /singularity/api/pool`` (p50/p99 of back-to-back requests), the server's RSS
(at the start, its peak, at the end) and the lines and bytes the server logged. The flooder is
built from the checkout's own ``protocol.encode``, so the same script measures an older
checkout: run a copy of it from there (``cp bench/channel_flood.py OLD/bench/``).

Run: ``python bench/channel_flood.py [--seconds 10] [--json FILE]``. No goal is asserted; the
figures go into the issue's closing note (before and after, same machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from gpu_check import REPO_ROOT, ApiError, Server  # noqa: E402  (puts the checkout on sys.path)

MODES = ("junk", "huge", "forged")
HUGE_FRAME = (16 << 20) - 1024
SETTLE = 11.0  # seconds after a flood, longer than the server's interval between drop summaries
READ_ENDPOINT = 'import os; print("ENDPOINT", os.environ["SINGULARITY_BROKER_URL"])'


# ------------------------------------------------------------------------------ the flooder


def frames_for(mode: str, kernel_id: str) -> list[bytes]:
    """One message of the flood, built with this checkout's framing."""
    from jupyter_singularity.protocol import Sequencer, Signer, encode, generate_key

    if mode == "junk":
        return [os.urandom(16) for _ in range(4)]
    message = Sequencer(kernel_id, "kernel").make("acquire", {"request_id": "flood", "memory": 1})
    frames = encode(message, Signer(generate_key()))  # a wrong key: the signature cannot verify
    if mode == "huge":
        header = json.loads(frames[-2])  # the header is the frame before the body
        header["pad"] = "x" * (HUGE_FRAME - len(frames[-2]) - 10)
        frames[-2] = json.dumps(header).encode()
    return frames


def flood(mode: str, endpoint: str, kernel_id: str, seconds: float) -> None:
    """Send as fast as the channel takes it; print how many messages were queued."""
    import zmq

    frames = frames_for(mode, kernel_id)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0  # what is still queued at the end is dropped, not waited for
    sock.sndtimeo = 100
    sock.connect(endpoint)
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sock.send_multipart(frames)
            sent += 1
        except zmq.Again:  # the server is not reading, or cut this peer off: keep trying
            pass
    sock.close()
    print(json.dumps({"sent": sent, "bytes_each": sum(len(f) for f in frames)}), flush=True)


# ------------------------------------------------------------------------------ the watcher


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(server: Server, seconds: float) -> dict:
    """REST latency and RSS of the server over ``seconds``."""
    assert server.process is not None
    pid = server.process.pid
    rss = [rss_bytes(pid)]
    done = threading.Event()

    def sample_rss() -> None:
        while not done.wait(0.1):
            rss.append(rss_bytes(pid))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    latencies: list[float] = []
    failures = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            server.api("singularity/api/pool", timeout=60)
        except (OSError, ApiError):
            failures += 1
            continue
        latencies.append(time.perf_counter() - started)
    done.set()
    sampler.join()
    rss.append(rss_bytes(pid))
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "requests": len(latencies),
        "failed_requests": failures,
        "p50_ms": round(cuts[49] * 1e3, 2) if cuts else None,
        "p99_ms": round(cuts[98] * 1e3, 2) if cuts else None,
        "max_ms": round(max(latencies) * 1e3, 2) if latencies else None,
        "rss_start_mib": round(rss[0] / 2**20, 1),
        "rss_peak_mib": round(max(rss) / 2**20, 1),
        "rss_end_mib": round(rss[-1] / 2**20, 1),
    }


def logged_since(server: Server, start: int) -> dict:
    """Lines and bytes the server logged after the first ``start`` characters of its log."""
    added = server.log_text()[start:]
    return {"log_lines": added.count("\n"), "log_bytes": len(added.encode())}


def phase(server: Server, mode: str, endpoint: str, kernel_id: str, seconds: float) -> dict:
    log_before = len(server.log_text())
    flooder = subprocess.Popen(
        [sys.executable, __file__, "--flood", mode, endpoint, kernel_id, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    result = measure(server, seconds)
    out, _ = flooder.communicate(timeout=120)
    result.update(json.loads(out.strip().splitlines()[-1]))
    # The server works off what was queued, and a rate-limited log sums the flood up within an
    # interval (10 s): measured as the phase's tail, and its lines counted with the phase's.
    result["after"] = measure(server, SETTLE)
    result.update(logged_since(server, log_before))
    return result


def run(seconds: float, modes: list[str]) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="channel-flood-"))
    env = {
        **os.environ,
        "JUPYTER_RUNTIME_DIR": str(workdir / "runtime"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    server = Server(workdir, "simulated:1x16GiB", env, log=print)
    try:
        server.start(timeout=120)
        kernel_id = server.start_kernel()
        cell = asyncio.run(server.run_cell(kernel_id, READ_ENDPOINT, timeout=60))
        endpoint = cell.text.split("ENDPOINT", 1)[1].split()[0]
        print(f"checkout {REPO_ROOT}, kernel channel {endpoint}", flush=True)
        log_start = len(server.log_text())
        quiet = {**measure(server, seconds), **logged_since(server, log_start)}
        results = {"checkout": str(REPO_ROOT), "endpoint": endpoint, "quiet": quiet}
        print("quiet", json.dumps(results["quiet"]), flush=True)
        for mode in modes:
            results[mode] = phase(server, mode, endpoint, kernel_id, seconds)
            print(mode, json.dumps(results[mode]), flush=True)
        return results
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--modes", default=",".join(MODES), help="floods to run, in order")
    parser.add_argument("--json", help="write the figures to this file too")
    parser.add_argument("--flood", nargs=4, metavar=("MODE", "ENDPOINT", "KERNEL", "SECONDS"))
    args = parser.parse_args()
    if args.flood:
        mode, endpoint, kernel_id, seconds = args.flood
        flood(mode, endpoint, kernel_id, float(seconds))
        return
    results = run(args.seconds, [m for m in args.modes.split(",") if m])
    quiet = results["quiet"]
    print(
        f"\n{'phase':8} {'p50 ms':>9} {'p99 ms':>9} {'RSS MiB start/peak/end':>24} {'log lines':>10}"
    )
    for name in ("quiet", *MODES):
        if name in results:
            r = results[name]
            rss = f"{r['rss_start_mib']}/{r['rss_peak_mib']}/{r['rss_end_mib']}"
            p50, p99 = str(r["p50_ms"]), str(r["p99_ms"])
            print(f"{name:8} {p50:>9} {p99:>9} {rss:>24} {r['log_lines']:>10}")
    for mode in MODES:
        if mode in results and quiet["p50_ms"] and results[mode]["p50_ms"]:
            r = results[mode]
            print(
                f"{mode}: p50 x{r['p50_ms'] / quiet['p50_ms']:.1f}, p99 x"
                f"{r['p99_ms'] / quiet['p99_ms']:.1f} of quiet; {r['sent']} messages sent"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
