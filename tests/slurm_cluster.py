"""A one-node Slurm cluster for end-to-end tests: Debian's ``munged``, ``slurmctld`` and ``slurmd``
run by the test as root, on a configuration generated in a directory of its own.

The node is this machine as ``slurmd -C`` reads it (its real CPUs and memory) with one GPU
(``gpu:1``, a device node made for it) cut into :data:`SHARDS` shards, as a GPU node whose
notebook jobs share their GPU is configured (docs/deploy/slurm.md). The partition lets jobs share
CPUs, so that this test's notebook servers all run on a small machine. Users' commands (``sbatch``,
``squeue``) find the cluster through ``SLURM_CONF`` (:attr:`SlurmCluster.env`); munge's socket and
the configuration are readable by every user, its key only by root.

Without Slurm's daemons and commands the tests are skipped, unless
``SINGULARITY_REQUIRE_HUB_TESTS=1`` (CI): then they fail (see :func:`hub.require_hub`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hub import terminate_with_parent
from servers import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "squeue", "scancel", "sinfo")
PARTITION = "notebooks"
#: The GPU's shards: how many notebook jobs may hold a piece of it at once.
SHARDS = 4
#: Where an NVIDIA GPU's device node is (``/dev/nvidia0``: character device 195, 0); Slurm only
#: checks that the gres file is a device, nothing opens it.
GPU_DEVICE = os.makedev(195, 0)

SLURM_CONF = """\
# Written by tests/slurm_cluster.py: a one-node cluster for one test session.
ClusterName=sgtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
# No cgroups (a container may not delegate them): processes tracked by parentage, no binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
GresTypes=gpu,shard
NodeName={node} NodeAddr=127.0.0.1 {hardware} Gres=gpu:1,shard:{shards} State=UNKNOWN
PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:{shards}
"""

GRES_CONF = """\
Name=gpu File={gpu_device}
Name=shard Count={shards}
"""


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run the cluster (empty: nothing)."""
    missing = []
    if absent := [tool for tool in (*DAEMONS, *COMMANDS) if not shutil.which(tool)]:
        missing.append(f"{', '.join(absent)} on PATH (apt-get install slurmctld slurmd munge)")
    try:
        socket.gethostbyname(node_name())
    except OSError:
        missing.append(
            f"a resolvable host name ({node_name()!r}: the hub reaches a job at its node)"
        )
    return missing


def node_name() -> str:
    """The node's name in Slurm: this machine's short host name."""
    return socket.gethostname().split(".")[0]


@dataclass
class SlurmCluster:
    """The running cluster: ``node`` its one node's name, ``root`` its directory."""

    node: str
    root: Path

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to use the cluster's commands."""
        return {"SLURM_CONF": str(self.root / "slurm.conf")}

    def command(self, *args: str) -> str:
        """A Slurm command as root (``squeue``, ``scontrol``...); its output."""
        done = subprocess.run(
            args, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            pytest.fail(f"{' '.join(args)}: {done.stderr.strip()}\n{self.log()}")
        return done.stdout

    def jobs(self) -> list[dict[str, str]]:
        """The cluster's jobs as ``squeue`` lists them: id, user, state, node, gres."""
        fields = ("id", "user", "state", "node", "gres")
        lines = self.command("squeue", "--noheader", "--format=%i %u %T %N %b").splitlines()
        return [dict(zip(fields, line.split(), strict=True)) for line in lines]

    def log(self, tail: int = 3000) -> str:
        """The end of each daemon's log and error output, for a test's failure message."""
        parts = []
        for name in (*(f"{d}.log" for d in DAEMONS), *(f"{d}.err" for d in DAEMONS)):
            path = self.root / name
            text = path.read_text(errors="replace")[-tail:] if path.exists() else "(none)"
            parts.append(f"--- {name}\n{text}")
        return "\n".join(parts)


@contextmanager
def slurm_cluster(root: Path) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd on a configuration in ``root`` (a new directory; its
    parents must let every user through); cancel every job and stop the daemons at the end."""
    root.mkdir(mode=0o755)
    for part in ("ctld", "spool"):
        (root / part).mkdir(mode=0o755)
    secret = root / "munge"  # the key, and munged's own files: root's alone
    secret.mkdir(mode=0o700)
    key = secret / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    gpu_device = root / "nvidia0"
    os.mknod(gpu_device, stat.S_IFCHR | 0o600, GPU_DEVICE)
    node = node_name()
    hardware = subprocess.run(
        ["slurmd", "-C"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    settings = {"root": root, "node": node, "shards": SHARDS, "partition": PARTITION}
    (root / "slurm.conf").write_text(
        SLURM_CONF.format(
            **settings,
            ctld_port=free_port(),
            slurmd_port=free_port(),
            munge_socket=root / "munge.socket",
            hardware=hardware.split(" ", 1)[1],  # CPUs=... RealMemory=..., without its NodeName
        )
    )
    (root / "gres.conf").write_text(GRES_CONF.format(**settings, gpu_device=gpu_device))
    cluster = SlurmCluster(node, root)
    env = {**os.environ, **cluster.env}
    daemons: list[subprocess.Popen] = []
    try:
        daemons.append(
            daemon(
                ["munged", "--foreground", f"--key-file={key}", f"--socket={root / 'munge.socket'}",
                 f"--pid-file={secret / 'munged.pid'}", f"--seed-file={secret / 'munged.seed'}",
                 f"--log-file={root / 'munged.log'}"],
                env,
                root,
            )
        )  # fmt: skip
        wait_for(lambda: (root / "munge.socket").exists(), "munged's socket", cluster)
        daemons.append(daemon(["slurmctld", "-D", "-i"], env, root))
        daemons.append(daemon(["slurmd", "-D", "-N", node], env, root))
        wait_for(lambda: node_state(cluster) == "idle", f"node {node} idle", cluster)
        yield cluster
    finally:
        try:
            if len(daemons) == len(DAEMONS):
                cluster.command("scancel", f"--partition={PARTITION}")
                wait_for(lambda: not cluster.jobs(), "end of every job", cluster, timeout=60)
        finally:
            for process in reversed(daemons):
                stop(process)


def daemon(args: list[str], env: dict[str, str], root: Path) -> subprocess.Popen:
    """A daemon in the foreground, ended with the test process if that dies first; what it says
    before its log file is open goes to ``<root>/<name>.err``."""
    with (root / f"{args[0]}.err").open("wb") as err:
        return subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=terminate_with_parent,
        )


def node_state(cluster: SlurmCluster) -> str:
    done = subprocess.run(
        ["sinfo", "--noheader", "--format=%t", f"--nodes={cluster.node}"],
        env={**os.environ, **cluster.env},
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip()


def wait_for(ready, what: str, cluster: SlurmCluster, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"Slurm: no {what} after {timeout} s\n{cluster.log()}")
        time.sleep(0.2)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it outlives 30 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
