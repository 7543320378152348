"""A real JupyterHub for end-to-end tests: real Unix users, their servers spawned as them.

The hub runs as root from the test's own interpreter, with configurable-http-proxy in front and
LocalProcessSpawner starting each user's ``jupyterhub-singleuser`` from a virtualenv that those
users can execute (built on Debian's ``/usr/bin/python3``: the test's interpreter lives where only
root may enter). This checkout's package is copied where the users can import it, laid out as its
wheel installs it, so the servers load the extension and kernels join its pool.

Fixtures (registered for the whole suite by ``pytest_plugins`` in conftest.py):

- ``hub`` (session): the running :class:`Hub`, its test users ``alice``, ``bob`` and ``carol``.
- ``alice``, ``bob``, ``carol``: that user's :class:`HubClient` (a token of their own); their
  server, if one runs, is stopped after the test.
- ``hub_users``, ``hub_venv``, ``hub_install`` (session): the parts of the hub, for a module that
  starts a hub of its own with :func:`running_hub` (a broker as a hub service, say).
- ``hub_shared_dir`` (session): a world-readable directory of the session (a broker's socket...).
- ``node``: the node broker (``jupyter singularity broker``, run as root like a system service) on
  one simulated 512 MiB GPU, where the hub's users reach it: carol is an admin of its pool, alice
  has 20 s of GPU time a day. :func:`join` starts a user's server joined to it.

Without root (or useradd, /usr/bin/python3, jupyterhub, batchspawner, configurable-http-proxy)
the tests are skipped, unless ``SINGULARITY_REQUIRE_HUB_TESTS=1`` (CI): then they fail, never
skipped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cells import cell_messages, kernel_websocket, run_cell
from servers import NodeBroker, free_port, node_broker
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.websocket import WebSocketClientConnection

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIRE_ENV = "SINGULARITY_REQUIRE_HUB_TESTS"
CACHE_ENV = "SINGULARITY_HUB_TEST_CACHE"
DEFAULT_CACHE = Path("/var/tmp/jupyter-singularity-hub-tests")
SYSTEM_PYTHON = Path("/usr/bin/python3")
USER_PREFIX = "sgtest-"
USER_COMMENT = "jupyter-singularity test user of pid"
ROLES = ("alice", "bob", "carol")
ADMIN_SERVICE = "sgtest-admin"
# The servers' own pool in embedded mode; a test adds or overrides settings per spawn.
DEFAULT_SERVER_ARGS = ("--SingularityApp.devices=simulated:1x4GiB",)
SERVER_START_TIMEOUT = 180.0


# ------------------------------------------------------------------------------ prerequisites


def missing_prerequisites() -> list[str]:
    """What this machine lacks to run a hub with real users (empty: nothing)."""
    missing = []
    if sys.version_info < (3, 11):
        missing.append("Python 3.11+ to run the tests (tomllib)")
    if os.geteuid() != 0:
        missing.append("root (to create Unix users and spawn their servers as them)")
    missing += [f"{tool} on PATH" for tool in ("useradd", "userdel") if not shutil.which(tool)]
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        missing.append(f"{SYSTEM_PYTHON} (the users' interpreter)")
    missing += [
        f"{package} (pip install -e '.[test]')"
        for package in ("jupyterhub", "batchspawner")
        if importlib.util.find_spec(package) is None
    ]
    if not shutil.which("configurable-http-proxy"):
        missing.append(
            "configurable-http-proxy on PATH (npm install -g configurable-http-proxy@5.2)"
        )
    return missing


def require_hub(also: Sequence[str] = (), tests: str = "the JupyterHub tests") -> None:
    """Skip the test for want of a prerequisite (``also``: more that ``tests`` need, a Slurm
    cluster's, say); fail instead where CI requires the hub tests."""
    missing = [*missing_prerequisites(), *also]
    if not missing:
        return
    reason = f"{tests} need " + ", ".join(missing)
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}; {REQUIRE_ENV}=1 forbids skipping them", pytrace=False)
    pytest.skip(reason)


# ------------------------------------------------------------------------------ Unix users


@dataclass(frozen=True)
class UnixUser:
    """A Unix user created for the session; the hub knows them by the same name."""

    name: str
    uid: int
    gid: int
    home: Path


def create_user(role: str) -> UnixUser:
    """``useradd`` of a fresh ``sgtest-<role>-<random>`` with a home; the comment names this
    process, so that a later session removes the user if this one dies without doing it."""
    name = f"{USER_PREFIX}{role}-{secrets.token_hex(3)}"
    comment = f"{USER_COMMENT} {os.getpid()}"
    subprocess.run(
        ["useradd", "--create-home", "--shell", "/bin/bash", "--comment", comment, name],
        check=True,
        capture_output=True,
    )
    entry = pwd.getpwnam(name)
    return UnixUser(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))


def processes_of(uid: int) -> list[int]:
    """The live processes of ``uid`` (zombies are dead already: their parent reaps them)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid and not is_zombie(entry.path):
                    pids.append(int(entry.name))
    return pids


def is_zombie(proc_dir: str) -> bool:
    with open(f"{proc_dir}/stat", "rb") as file:
        return file.read().rsplit(b")", 1)[1].split()[0] == b"Z"


def kill_processes_of(uid: int, timeout: float = 10.0) -> None:
    """SIGKILL every process of a test user (its servers and kernels) until none is left."""
    deadline = time.monotonic() + timeout
    while pids := processes_of(uid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of uid {uid} outlived SIGKILL: {pids}")
        time.sleep(0.05)


def remove_user(name: str) -> None:
    """End the user's processes, then ``userdel --remove`` (home included)."""
    with contextlib.suppress(KeyError):
        kill_processes_of(pwd.getpwnam(name).pw_uid)
    # userdel warns (and exits 12) when the user has no mail spool: the user is gone all the same.
    subprocess.run(["userdel", "--remove", name], capture_output=True, check=False)
    with contextlib.suppress(KeyError):
        pwd.getpwnam(name)
        raise RuntimeError(f"userdel left the test user {name}")


def is_dead(pid: str) -> bool:
    return pid.isdigit() and not Path(f"/proc/{pid}").exists()


def remove_stale_sessions() -> None:
    """Remove the test users and shared directories of sessions that died before removing them
    (killed: the process named in a user's comment or a directory's name is gone)."""
    for entry in pwd.getpwall():
        if not (entry.pw_name.startswith(USER_PREFIX) and entry.pw_gecos.startswith(USER_COMMENT)):
            continue
        if is_dead(entry.pw_gecos.rsplit(" ", 1)[-1]):
            remove_user(entry.pw_name)
    for path in Path(tempfile.gettempdir()).glob(f"{USER_PREFIX}*-*"):
        if is_dead(path.name.removeprefix(USER_PREFIX).split("-", 1)[0]):
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------ the users' venv


def pyproject() -> dict[str, Any]:
    import tomllib  # Python 3.11+, a prerequisite of the hub tests

    with (REPO_ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def venv_requirements() -> list[str]:
    """What a user's server needs: the package's dependencies and its ``lab`` extra, the hub's
    own jupyterhub (for ``jupyterhub-singleuser``) and batchspawner (``batchspawner-singleuser``,
    for a server started as a batch job), and the test interpreter's torch (the CPU build this
    machine keeps)."""
    project = pyproject()["project"]
    return [
        *project["dependencies"],
        *project["optional-dependencies"]["lab"],
        *(
            f"{package}=={importlib.metadata.version(package)}"
            for package in ("jupyterhub", "batchspawner")
        ),
        f"torch=={importlib.metadata.version('torch')}",
    ]


def make_world_readable(root: Path) -> None:
    """a+rX over a tree, so that the test users may read (and enter) all of it."""
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        extra = 0o555 if stat.S_ISDIR(mode) or mode & 0o100 else 0o444
        if mode & extra != extra:
            path.chmod(stat.S_IMODE(mode) | extra)


@contextmanager
def users_venv(cache: Path) -> Iterator[Path]:
    """The users' virtualenv, built once for its inputs and reused by later sessions.

    Keyed by a hash of the interpreter's version and :func:`venv_requirements`. A session holds a
    shared lock on its venv while it runs; building takes the lock exclusively, and venvs of other
    keys are removed only when nobody holds theirs.
    """
    cache.mkdir(parents=True, exist_ok=True)
    cache.chmod(0o755)
    version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(sys.version)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    requirements = venv_requirements()
    key = hashlib.sha256(json.dumps([version, requirements]).encode()).hexdigest()[:16]
    venv = cache / f"venv-{key}"
    with (cache / f"venv-{key}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        complete = venv / "requirements.json"
        if not complete.exists():
            started = time.monotonic()
            shutil.rmtree(venv, ignore_errors=True)
            # No pip inside (Debian's ensurepip is a package of its own): this pip installs into it.
            # umask 022: every file readable (and every directory enterable) by the test users.
            subprocess.run(
                [SYSTEM_PYTHON, "-m", "venv", "--without-pip", venv], check=True, umask=0o022
            )
            subprocess.run(
                [sys.executable, "-m", "pip", "--python", venv / "bin/python", "install",
                 "--quiet", "--no-input", *requirements],
                check=True,
                umask=0o022,
            )  # fmt: skip
            complete.write_text(json.dumps({"python": version, "requirements": requirements}))
            log.info("users' venv built in %.0f s: %s", time.monotonic() - started, venv)
        fcntl.flock(lock, fcntl.LOCK_SH)
        remove_unused_venvs(cache, keep=venv)
        yield venv


def remove_unused_venvs(cache: Path, keep: Path) -> None:
    for lock_path in cache.glob("venv-*.lock"):
        venv = lock_path.with_suffix("")
        if venv == keep:
            continue
        with lock_path.open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another session runs on it
            shutil.rmtree(venv, ignore_errors=True)
            lock_path.unlink()


def install_checkout(prefix: Path) -> dict[str, str]:
    """Copy this checkout's package under ``prefix`` as its wheel lays it out (the package, the
    server config that enables the extension, the built labextension if there is one); return the
    environment that makes a server find them there."""
    site = prefix / "site"
    shutil.copytree(
        REPO_ROOT / "jupyter_singularity",
        site / "jupyter_singularity",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "labextension"),
    )
    built = (REPO_ROOT / "jupyter_singularity/labextension/package.json").is_file()
    shared_data = pyproject()["tool"]["hatch"]["build"]["targets"]["wheel"]["shared-data"]
    for source, target in shared_data.items():
        if target.startswith("share/jupyter/labextensions/") and not built:
            continue  # not built in this checkout: JupyterLab runs without the panel
        if (REPO_ROOT / source).is_dir():
            shutil.copytree(REPO_ROOT / source, prefix / target, dirs_exist_ok=True)
        else:
            (prefix / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO_ROOT / source, prefix / target)
    make_world_readable(prefix)
    # Bytecode now: the users' processes (servers, kernels) cannot write it there.
    subprocess.run([SYSTEM_PYTHON, "-m", "compileall", "-q", site], check=True, umask=0o022)
    return {
        "PYTHONPATH": str(site),
        "JUPYTER_CONFIG_PATH": str(prefix / "etc/jupyter"),
        "JUPYTER_PATH": str(prefix / "share/jupyter"),
    }


# ------------------------------------------------------------------------------ the hub

HUB_CONFIG = """\
# Written by tests/hub.py for one test session.
c = get_config()  # noqa
c.JupyterHub.bind_url = {bind_url!r}
c.JupyterHub.hub_bind_url = {hub_bind_url!r}
c.JupyterHub.db_url = {db_url!r}
c.JupyterHub.cookie_secret_file = {cookie_secret_file!r}
c.ConfigurableHTTPProxy.api_url = {proxy_api_url!r}
c.ConfigurableHTTPProxy.auth_token = {proxy_token!r}
c.ConfigurableHTTPProxy.command = [{proxy_command!r}]
c.ConfigurableHTTPProxy.pid_file = {proxy_pid_file!r}

# One password for every test user (a browser test logs in with it); scripts use API tokens.
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = {password!r}
c.Authenticator.allowed_users = set({user_names!r})
c.JupyterHub.services = [{{"name": {admin_service!r}, "api_token": {admin_token!r}}}]
c.JupyterHub.load_roles = [{{"name": "admin", "services": [{admin_service!r}]}}]

c.JupyterHub.spawner_class = "localprocess"
c.Spawner.cmd = [{singleuser!r}]
c.Spawner.notebook_dir = "~"
c.Spawner.env_keep = []
c.Spawner.start_timeout = {start_timeout!r}
c.Spawner.http_timeout = {start_timeout!r}
SERVER_ARGS = {server_args!r}
SERVER_ENV = {server_env!r}


def spawn_options(spawner, options):
    # A test's settings for one spawn, the body of its spawn request (user_options):
    # {{"env": {{NAME: VALUE}}, "args": ["--Class.trait=value", ...]}}, on top of this session's;
    # an argument naming a trait of the session's replaces it (traitlets refuses a trait given
    # twice). Every spawn sends both (the hub reuses the last options for an empty body).
    env, args = options.get("env", {{}}), options.get("args", [])
    if not (isinstance(env, dict) and isinstance(args, list)):
        raise ValueError(f"user_options: env must be an object and args a list, not {{options}}")
    args = [str(arg) for arg in args]
    replaced = {{arg.split("=", 1)[0] for arg in args}}
    spawner.environment = {{**SERVER_ENV, **{{str(k): str(v) for k, v in env.items()}}}}
    spawner.args = [arg for arg in SERVER_ARGS if arg.split("=", 1)[0] not in replaced] + args


c.Spawner.apply_user_options = spawn_options
"""


async def fetch(
    method: str, url: str, token: str | None = None, body: Any = None, timeout: float = 60.0
) -> HTTPResponse:
    """One HTTP request; the response whatever its status (tests look at ``.code``)."""
    return await AsyncHTTPClient().fetch(
        url,
        method=method,
        headers={"Authorization": f"token {token}"} if token else {},
        body=None if body is None else json.dumps(body),
        allow_nonstandard_methods=True,
        request_timeout=timeout,
        raise_error=False,
    )


def decoded(response: HTTPResponse, *expected: int) -> Any:
    """The JSON body of a response whose status is one of ``expected`` (else the test fails)."""
    if response.code not in expected:
        body = response.body.decode(errors="replace") if response.body else response.error
        pytest.fail(f"{response.request.method} {response.effective_url}: {response.code} {body}")
    return json.loads(response.body) if response.body else None


@dataclass
class Hub:
    """A running JupyterHub: ``url`` is its public URL (the proxy)."""

    url: str
    admin_token: str
    password: str
    users: dict[str, UnixUser]
    log_path: Path
    process: subprocess.Popen
    shared_dir: Path
    venv: Path  # the users' interpreter
    server_env: dict[str, str]  # what every user's server gets (PATH, this checkout's package)

    def log(self, tail: int = 8000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    async def api(self, method: str, path: str, body: Any = None, *expected: int) -> Any:
        """The hub's REST API as the admin service: ``await hub.api("GET", "users")``."""
        response = await fetch(method, f"{self.url}hub/api/{path}", self.admin_token, body)
        return decoded(response, *(expected or (200, 201)))

    async def new_token(self, name: str, scopes: list[str] | None = None) -> str:
        """An API token of user ``name``, created through the hub (by default it has the user's
        own permissions: their servers, their kernels)."""
        body: dict[str, Any] = {"note": "test", "expires_in": 3600}
        if scopes is not None:
            body["scopes"] = scopes
        reply = await self.api("POST", f"users/{quote(name)}/tokens", body, 201)
        return reply["token"]

    async def server(self, name: str) -> dict | None:
        """The hub's record of user ``name``'s default server (None when it has none)."""
        user = await self.api("GET", f"users/{quote(name)}")
        return user["servers"].get("")

    async def start_server(
        self,
        name: str,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        timeout: float = SERVER_START_TIMEOUT,
    ) -> None:
        """Spawn user ``name``'s server through the hub's API and wait until the hub says it is
        ready (routed by the proxy). ``env`` and ``args`` are added to the session's for this
        spawn (``JUPYTER_SINGULARITY_BROKER_URL``, ``--SingularityApp.<trait>=``...)."""
        started = time.monotonic()
        body = {"env": env or {}, "args": args or []}
        await self.api("POST", f"users/{quote(name)}/server", body, 201, 202)
        while not ((server := await self.server(name)) and server["ready"]):
            if server is None or time.monotonic() - started > timeout:
                pytest.fail(f"the server of {name} did not start ({server}):\n{self.log()}")
            await asyncio.sleep(0.2)
        log.info("server of %s ready in %.1f s", name, time.monotonic() - started)

    async def stop_server(self, name: str, timeout: float = 60.0) -> None:
        """Stop user ``name``'s server (and so its kernels) and wait until it is gone."""
        deadline = time.monotonic() + timeout
        await self.api("DELETE", f"users/{quote(name)}/server", None, 202, 204, 400)
        while await self.server(name) is not None:
            if time.monotonic() > deadline:
                pytest.fail(f"the server of {name} did not stop:\n{self.log()}")
            await asyncio.sleep(0.2)

    def run_python(
        self, user: UnixUser, code: str, timeout: float = 60.0
    ) -> subprocess.CompletedProcess:
        """Run ``code`` in the users' interpreter as ``user`` (not through the hub), with the
        environment their servers get: a process of theirs that is not a kernel, say."""
        return subprocess.run(
            [self.venv / "bin/python", "-c", code],
            user=user.uid,
            group=user.gid,
            extra_groups=os.getgrouplist(user.name, user.gid),
            cwd=user.home,
            env={**self.server_env, "HOME": str(user.home), "USER": user.name},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@dataclass
class HubClient:
    """One test user as a browser or script drives the hub: their own token, their server at
    ``/user/<name>/`` through the proxy."""

    hub: Hub
    user: UnixUser
    token: str

    @property
    def name(self) -> str:
        return self.user.name

    def server_url(self, path: str = "", server: str | None = None) -> str:
        """The URL of ``path`` on a user's server (this user's unless ``server`` names another)."""
        return f"{self.hub.url}user/{quote(server or self.name)}/{path}"

    async def start_server(
        self, env: dict[str, str] | None = None, args: list[str] | None = None
    ) -> None:
        """Start this user's server through the hub (see :meth:`Hub.start_server`)."""
        await self.hub.start_server(self.name, env, args)

    async def stop_server(self) -> None:
        await self.hub.stop_server(self.name)

    async def request(
        self, method: str, path: str, body: Any = None, server: str | None = None
    ) -> HTTPResponse:
        """``method path`` on a user's server with this user's token; any status comes back."""
        return await fetch(method, self.server_url(path, server), self.token, body)

    async def get_json(self, path: str, server: str | None = None) -> Any:
        return decoded(await self.request("GET", path, server=server), 200)

    async def pool(self) -> dict:
        """``GET singularity/api/pool`` on this user's server."""
        return await self.get_json("singularity/api/pool")

    async def start_kernel(self, name: str = "python3") -> str:
        """Start a kernel through the server's REST API; its id."""
        response = await self.request("POST", "api/kernels", {"name": name})
        return decoded(response, 201)["id"]

    async def websocket(self, kernel_id: str) -> WebSocketClientConnection:
        """The kernel's websocket through the proxy, as JupyterLab opens it."""
        url = self.server_url(f"api/kernels/{kernel_id}/channels").replace("http", "ws", 1)
        return await kernel_websocket(url, self.token)

    async def run_cell(self, kernel_id: str, code: str, timeout: float = 60.0) -> tuple[str, str]:
        """Run a cell over the kernel's websocket; its status and printed text."""
        ws = await self.websocket(kernel_id)
        try:
            return await run_cell(ws, code, timeout)
        finally:
            ws.close()

    async def cell_messages(self, kernel_id: str, code: str, **kwargs: Any):
        """Every message of a cell (see :func:`cells.cell_messages`)."""
        ws = await self.websocket(kernel_id)
        try:
            return await cell_messages(ws, code, **kwargs)
        finally:
            ws.close()


@contextmanager
def running_hub(
    workdir: Path,
    shared_dir: Path,
    venv: Path,
    users: dict[str, UnixUser],
    server_env: dict[str, str],
    server_args: Sequence[str] = DEFAULT_SERVER_ARGS,
    extra_config: str = "",
) -> Iterator[Hub]:
    """Start JupyterHub (as root, from this interpreter) and its proxy; stop both at the end,
    the users' servers with them. ``workdir`` is root's (database, secrets, logs); the users'
    servers start in ``shared_dir``, which they may read, with ``server_env`` (see
    :func:`install_checkout`) and ``server_args``. ``extra_config`` is Python appended to the
    hub's config file: a service (``c.JupyterHub.services.append(...)``), more settings for every
    server (``SERVER_ENV[...] = ...``, ``SERVER_ARGS.append(...)``)..."""
    port, hub_port, proxy_port = free_port(), free_port(), free_port()
    server_env = {"PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin", **server_env}
    admin_token, password = secrets.token_hex(32), secrets.token_hex(8)
    config = workdir / "jupyterhub_config.py"
    config.write_text(
        HUB_CONFIG.format(
            bind_url=f"http://127.0.0.1:{port}",
            hub_bind_url=f"http://127.0.0.1:{hub_port}",
            db_url=f"sqlite:///{workdir / 'jupyterhub.sqlite'}",
            cookie_secret_file=str(workdir / "cookie_secret"),
            proxy_api_url=f"http://127.0.0.1:{proxy_port}",
            proxy_token=secrets.token_hex(32),
            proxy_command=shutil.which("configurable-http-proxy"),
            proxy_pid_file=str(workdir / "proxy.pid"),
            password=password,
            user_names=sorted(user.name for user in users.values()),
            admin_service=ADMIN_SERVICE,
            admin_token=admin_token,
            singleuser=str(venv / "bin/jupyterhub-singleuser"),
            start_timeout=int(SERVER_START_TIMEOUT),
            server_args=list(server_args),
            server_env=server_env,
        )
        + extra_config
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "PYTHONPATH"))}
    log_path = workdir / "jupyterhub.log"
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "jupyterhub", "-f", str(config)],
            cwd=shared_dir,  # the users' servers start here: a directory they may enter
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=terminate_with_parent,
        )
    hub = Hub(
        f"http://127.0.0.1:{port}/",
        admin_token,
        password,
        users,
        log_path,
        process,
        shared_dir,
        venv,
        server_env,
    )
    try:
        wait_until_up(hub)
        log.info("hub up in %.1f s", time.monotonic() - started)
        yield hub
    finally:
        stop_hub(hub, workdir / "proxy.pid")


def terminate_with_parent() -> None:
    """In the hub's process: SIGTERM when the test process dies (killed, say), on which the hub
    stops the users' servers and its proxy, as at the end of a session."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_until_up(hub: Hub, timeout: float = 60.0) -> None:
    """Until the hub answers through the proxy (its API's root needs no token)."""
    deadline = time.monotonic() + timeout
    while True:
        if hub.process.poll() is not None:
            pytest.fail(f"JupyterHub exited with {hub.process.returncode}:\n{hub.log()}")
        try:
            with urllib.request.urlopen(f"{hub.url}hub/api/", timeout=5):
                return
        except OSError:  # refused, or the proxy's 404 before the hub's route is in
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterHub did not answer within {timeout} s:\n{hub.log()}")
            time.sleep(0.25)


def stop_hub(hub: Hub, proxy_pid_file: Path) -> None:
    """SIGTERM the hub, which stops the users' servers and its proxy; SIGKILL what outlives it."""
    if hub.process.poll() is None:
        hub.process.send_signal(signal.SIGTERM)
        try:
            hub.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(hub.process.pid, signal.SIGKILL)
            hub.process.wait()
    with contextlib.suppress(FileNotFoundError, ValueError):
        pid = int(proxy_pid_file.read_text())
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if b"configurable-http-proxy" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def hub_users() -> Iterator[dict[str, UnixUser]]:
    """The session's Unix users, keyed by role (``alice``, ``bob``, ``carol``); removed, their
    processes killed, at the end."""
    require_hub()
    remove_stale_sessions()
    users: dict[str, UnixUser] = {}
    try:
        for role in ROLES:
            users[role] = create_user(role)
        yield users
    finally:
        for user in users.values():
            remove_user(user.name)


@pytest.fixture(scope="session")
def hub_venv() -> Iterator[Path]:
    """The users' virtualenv (see :func:`users_venv`); ``SINGULARITY_HUB_TEST_CACHE`` moves it."""
    require_hub()
    with users_venv(Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE))) as venv:
        yield venv


@pytest.fixture(scope="session")
def hub_shared_dir() -> Iterator[Path]:
    """A directory of the session that every test user may read and enter."""
    path = Path(tempfile.mkdtemp(prefix=f"{USER_PREFIX}{os.getpid()}-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def hub_install(hub_shared_dir: Path) -> dict[str, str]:
    """This checkout's package where the test users can import it; the servers' environment."""
    require_hub()
    return install_checkout(hub_shared_dir / "install")


@pytest.fixture(scope="session")
def hub(hub_users, hub_venv, hub_shared_dir, hub_install, tmp_path_factory) -> Iterator[Hub]:
    """JupyterHub with this checkout's extension in every user's server (embedded pool on
    ``simulated:1x4GiB`` unless a spawn says otherwise)."""
    workdir = tmp_path_factory.mktemp("hub")
    with running_hub(workdir, hub_shared_dir, hub_venv, hub_users, hub_install) as running:
        yield running


@pytest.fixture
async def node(hub: Hub, tmp_path: Path) -> AsyncIterator[NodeBroker]:
    """The node broker, its sockets and state where every test user may reach them."""
    alice, carol = hub.users["alice"].name, hub.users["carol"].name
    config = textwrap.dedent(
        f"""
        c.SingularityBroker.admin_users = [{carol!r}]
        c.SingularityBroker.quotas = {{"user:{alice}": {{"gpu_seconds_per_day": 20}}}}
        """
    )
    shared = hub.shared_dir / f"node-{tmp_path.name}"
    shared.mkdir(mode=0o755)
    with node_broker(
        tmp_path,
        devices="simulated:1x512MiB",
        run_dir=shared / "run",
        state_dir=shared,
        config=config,
    ) as broker:
        yield broker


async def join(client: HubClient, broker: NodeBroker) -> None:
    """Start the user's server joined to the node broker."""
    await client.start_server(env={"JUPYTER_SINGULARITY_BROKER_URL": broker.url})


def _user_fixture(role: str):
    @pytest.fixture(name=role)
    async def client(hub: Hub) -> AsyncIterator[HubClient]:
        """The user's :class:`HubClient`; their server, if one runs, is stopped after the test."""
        user = hub.users[role]
        client = HubClient(hub, user, await hub.new_token(user.name))
        yield client
        if await hub.server(user.name) is not None:
            await client.stop_server()

    return client


alice, bob, carol = (_user_fixture(role) for role in ROLES)
