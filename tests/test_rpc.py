"""The kernel channel: the broker's RPC server and the kernel's client over real ZeroMQ sockets (a
Unix socket in a private directory), hostile peers and floods, sessions, the checks of numbers that
kernels report, and the kernel's wait for a broker that disappears (through a real server)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest
import zmq
import zmq.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from zmq.utils.monitor import parse_monitor_message

from jupyter_singularity.broker.rpc import MAX_MESSAGE_BYTES, RPCServer
from jupyter_singularity.kernel.client import BrokerClient, BrokerError
from jupyter_singularity.protocol import (
    ENV_BROKER_URL,
    ENV_KERNEL_ID,
    ENV_KERNEL_KEY,
    MAGIC,
    ORIGIN_BROKER,
    ORIGIN_KERNEL,
    RENEW_SESSION,
    Message,
    Sequencer,
    Signer,
    decode,
    encode,
    generate_key,
)

pytestmark = pytest.mark.timeout(60)

BROKER_LOG = "test.rpc.broker"
CLIENT_LOG = "jupyter_singularity.kernel.client"


@pytest.fixture
def keys() -> dict[str, bytes]:
    return {"k1": generate_key(), "k2": generate_key()}


@dataclass
class Handlers:
    """The broker handler under test: routes by message type, records what ran."""

    routes: dict[str, Callable[[Message], Awaitable[dict | None]]] = field(default_factory=dict)
    seen: list[Message] = field(default_factory=list)

    async def __call__(self, msg: Message) -> dict | None:
        self.seen.append(msg)
        return await self.routes[msg.type](msg)


@dataclass
class Broker:
    server: RPCServer
    endpoint: str
    handlers: Handlers


async def echo(msg: Message) -> dict:
    return {"echo": msg.body, "kernel": msg.kernel_id}


@pytest.fixture
async def broker(keys: dict[str, bytes]) -> Broker:
    handlers = Handlers(routes={"echo": echo})
    # Every drop logged on its own line (no summing up), so tests can see each reason.
    server = RPCServer(keys.get, handlers, logging.getLogger(BROKER_LOG), drop_log_interval=0)
    endpoint = await server.start()
    yield Broker(server, endpoint, handlers)
    await server.stop()


@pytest.fixture
def connect(keys: dict[str, bytes]) -> Iterator[Callable[..., BrokerClient]]:
    """Starts kernel clients and closes them after the test."""
    made: list[BrokerClient] = []

    def make(endpoint: str, kernel_id: str = "k1") -> BrokerClient:
        client = BrokerClient(endpoint, kernel_id, keys[kernel_id])
        client.start()
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


async def call(client: BrokerClient, type: str, body: dict, timeout: float = 5) -> dict:
    """client.request() blocks, so run it off the event loop the broker needs."""
    return await asyncio.to_thread(client.request, type, body, timeout)


async def wait_until(condition: Callable[[], object], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def warnings_of(caplog: pytest.LogCaptureFixture, logger: str) -> str:
    return "\n".join(
        r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING
    )


# -- kernel -> broker ------------------------------------------------------------------


async def test_round_trip(broker: Broker, connect) -> None:
    client = connect(broker.endpoint)
    assert await call(client, "echo", {"x": [1, "ü"]}) == {"echo": {"x": [1, "ü"]}, "kernel": "k1"}
    (msg,) = broker.handlers.seen
    assert (msg.type, msg.kernel_id, msg.origin) == ("echo", "k1", ORIGIN_KERNEL)


async def test_handler_error_becomes_broker_error(broker: Broker, connect, caplog) -> None:
    async def fail(msg: Message) -> dict:
        raise ValueError("no GPU for you")

    broker.handlers.routes["lease"] = fail
    client = connect(broker.endpoint)
    with pytest.raises(BrokerError, match="no GPU for you"):
        await call(client, "lease", {})
    assert "handler for 'lease' from k1 failed" in caplog.text


async def test_unencodable_handler_result_is_an_error_reply(broker: Broker, connect) -> None:
    async def weird(msg: Message) -> dict:
        return {"value": object()}

    broker.handlers.routes["weird"] = weird
    with pytest.raises(BrokerError, match="unencodable reply"):
        await call(connect(broker.endpoint), "weird", {})


async def test_waiting_handler_does_not_block_other_kernels(broker: Broker, connect) -> None:
    granted = asyncio.Event()

    async def lease(msg: Message) -> dict:
        await granted.wait()
        return {"granted": msg.kernel_id}

    broker.handlers.routes["lease"] = lease
    waiting = asyncio.ensure_future(call(connect(broker.endpoint, "k1"), "lease", {}, timeout=10))
    await wait_until(lambda: broker.handlers.seen)
    assert await call(connect(broker.endpoint, "k2"), "echo", {"n": 2}) == {
        "echo": {"n": 2},
        "kernel": "k2",
    }
    assert not waiting.done()
    granted.set()
    assert await waiting == {"granted": "k1"}


async def test_client_request_timeout_and_fire_and_forget(broker: Broker, connect) -> None:
    never = asyncio.Event()

    async def hang(msg: Message) -> dict:
        await never.wait()
        return {}

    broker.handlers.routes["hang"] = hang
    broker.handlers.routes["note"] = echo
    client = connect(broker.endpoint)
    with pytest.raises(TimeoutError):
        await call(client, "hang", {}, timeout=0.2)
    client.send("note", {"cells": 3})
    await wait_until(lambda: any(m.type == "note" for m in broker.handlers.seen))
    assert await call(client, "echo", {}) == {"echo": {}, "kernel": "k1"}


async def test_client_rejects_unencodable_body_in_caller(broker: Broker, connect) -> None:
    client = connect(broker.endpoint)
    with pytest.raises(TypeError):
        await call(client, "echo", {"x": object()})
    assert await call(client, "echo", {"x": 1}) == {"echo": {"x": 1}, "kernel": "k1"}


async def test_close_fails_waiting_requests(broker: Broker, connect) -> None:
    never = asyncio.Event()

    async def hang(msg: Message) -> dict:
        await never.wait()
        return {}

    broker.handlers.routes["hang"] = hang
    client = connect(broker.endpoint)
    waiting = asyncio.ensure_future(call(client, "hang", {}, timeout=10))
    await wait_until(lambda: broker.handlers.seen)
    await asyncio.to_thread(client.close)
    with pytest.raises(BrokerError, match="closed"):
        await waiting
    with pytest.raises(BrokerError, match="closed"):
        client.send("echo", {})


async def test_restarted_kernel_with_same_id_is_served(broker: Broker, connect) -> None:
    """A new process for the same kernel: new socket identity, sequence starts afresh."""
    first = connect(broker.endpoint)
    await call(first, "echo", {})
    await asyncio.to_thread(first.close)
    second = connect(broker.endpoint)
    assert await call(second, "echo", {"again": True}) == {"echo": {"again": True}, "kernel": "k1"}
    assert (await broker.server.request("k1", "ping", {}, timeout=5))["pid"] == os.getpid()


# -- broker -> kernel ------------------------------------------------------------------


async def test_broker_request_to_kernel(broker: Broker, connect) -> None:
    threads: list[str] = []

    def offload(body: dict) -> dict:
        threads.append(threading.current_thread().name)
        return {"freed": body["bytes"]}

    client = connect(broker.endpoint)
    client.on("offload", offload)
    await call(client, "echo", {})  # the broker learns a kernel's route from its messages
    reply = await broker.server.request("k1", "offload", {"bytes": 123}, timeout=5)
    assert reply == {"freed": 123}
    assert threads == ["singularity-push"]
    assert await broker.server.request("k1", "bogus", {}, timeout=5) == {
        "error": "unknown request 'bogus'"
    }


async def test_push_runs_callback_and_callback_errors_are_replies(broker: Broker, connect) -> None:
    got: list[dict] = []

    def notice(body: dict) -> None:
        got.append(body)

    def broken(body: dict) -> dict:
        raise RuntimeError("cannot offload")

    client = connect(broker.endpoint)
    client.on("notice", notice)
    client.on("broken", broken)
    await call(client, "echo", {})
    await broker.server.push("k1", "notice", {"quota": 1})
    await wait_until(lambda: got)
    assert got == [{"quota": 1}]
    assert await broker.server.request("k1", "broken", {}, timeout=5) == {"error": "cannot offload"}
    with pytest.raises(ValueError):
        client.on("ping", notice)


async def test_ping_answered_while_main_thread_blocks_in_request(broker: Broker, connect) -> None:
    granted = asyncio.Event()

    async def lease(msg: Message) -> dict:
        await granted.wait()
        return {"granted": True}

    broker.handlers.routes["lease"] = lease
    client = connect(broker.endpoint)
    waiting = asyncio.ensure_future(call(client, "lease", {}, timeout=10))
    await wait_until(lambda: broker.handlers.seen)
    for _ in range(3):
        reply = await broker.server.request("k1", "ping", {}, timeout=2)
        assert reply["pid"] == os.getpid()
        assert abs(reply["time"] - time.time()) < 5
    assert not waiting.done()
    granted.set()
    assert await waiting == {"granted": True}


async def test_ping_answered_while_push_callback_is_busy(broker: Broker, connect) -> None:
    release = threading.Event()

    def slow(body: dict) -> dict:
        release.wait(10)
        return {"done": True}

    client = connect(broker.endpoint)
    client.on("slow", slow)
    await call(client, "echo", {})
    slow_reply = asyncio.ensure_future(broker.server.request("k1", "slow", {}, timeout=10))
    await asyncio.sleep(0.05)
    assert (await broker.server.request("k1", "ping", {}, timeout=2))["pid"] == os.getpid()
    assert not slow_reply.done()
    release.set()
    assert await slow_reply == {"done": True}


async def test_broker_request_timeout_and_forget(broker: Broker, connect) -> None:
    release = threading.Event()
    client = connect(broker.endpoint)
    client.on("slow", lambda body: release.wait(10) and {})
    await call(client, "echo", {})
    with pytest.raises(TimeoutError):
        await broker.server.request("k1", "slow", {}, timeout=0.1)
    waiting = asyncio.ensure_future(broker.server.request("k1", "slow", {}, timeout=10))
    await asyncio.sleep(0.05)
    broker.server.forget("k1")
    with pytest.raises(ConnectionError, match="gone"):
        await waiting
    release.set()
    with pytest.raises(ConnectionError, match="not connected"):
        await broker.server.request("k1", "ping", {}, timeout=1)


async def test_unknown_or_vanished_kernel_never_raises(broker: Broker, connect, caplog) -> None:
    await broker.server.push("never-connected", "ping", {})
    with pytest.raises(ConnectionError, match="not connected"):
        await broker.server.request("never-connected", "ping", {}, timeout=1)

    client = connect(broker.endpoint)
    await call(client, "echo", {})
    await asyncio.to_thread(client.close)
    # Once ZeroMQ notices the disconnect, ROUTER_MANDATORY makes sends fail: logged, not raised.
    deadline = time.monotonic() + 5
    while "dropped: Host unreachable" not in warnings_of(caplog, BROKER_LOG):
        assert time.monotonic() < deadline
        await broker.server.push("k1", "ping", {})
        await asyncio.sleep(0.01)
    with pytest.raises(ConnectionError, match="unreachable"):
        await broker.server.request("k1", "ping", {}, timeout=1)
    assert await call(connect(broker.endpoint, "k2"), "echo", {}) == {"echo": {}, "kernel": "k2"}


# -- hostile peers ---------------------------------------------------------------------


@pytest.fixture
async def raw_dealer(broker: Broker) -> zmq.asyncio.Socket:
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(broker.endpoint)
    yield sock
    sock.close()


async def test_forged_messages_are_dropped_and_logged(
    broker: Broker, raw_dealer: zmq.asyncio.Socket, keys: dict[str, bytes], caplog
) -> None:
    kernel = Sequencer("k1", ORIGIN_KERNEL)
    signer = Signer(keys["k1"])

    async def receive() -> Message:
        return decode(await asyncio.wait_for(raw_dealer.recv_multipart(), 5), keys.get)

    captured = encode(kernel.make("echo", {"n": 1}), signer)
    await raw_dealer.send_multipart(captured)
    await receive()

    tampered = encode(kernel.make("echo", {"n": 2}), signer)
    tampered[4] = b'{"n":666}'
    stale = kernel.make("echo", {})
    stale.time -= 3600
    future = kernel.make("echo", {})
    future.time += 3600
    reflected = Sequencer("k1", ORIGIN_BROKER).make("echo", {})
    unsigned = encode(kernel.make("echo", {}), signer)
    unsigned[2] = b""
    oversized = encode(kernel.make("echo", {}), signer)
    oversized[3] = b" " * 2000
    hostile = [
        captured,  # replayed verbatim
        encode(kernel.make("echo", {}), Signer(generate_key())),  # wrong key
        unsigned,
        tampered,
        encode(Sequencer("intruder", ORIGIN_KERNEL).make("echo", {}), signer),
        encode(stale, signer),
        encode(future, signer),
        encode(reflected, signer),
        oversized,
        [b"junk"],
        [b"\xff" * 8] * 5,
        [MAGIC, b"k1", b"0" * 64, b"{not json", b"{}"],
    ]
    for frames in hostile:
        await raw_dealer.send_multipart(frames)
    good = kernel.make("echo", {"n": 3})
    await raw_dealer.send_multipart(encode(good, signer))
    # Frames from one peer are handled in order: the replay's renewal notice, then the reply.
    renewal, reply = await receive(), await receive()
    assert (renewal.type, renewal.origin) == (RENEW_SESSION, ORIGIN_BROKER)
    assert renewal.reply_to == decode(captured, keys.get).msg_id
    assert "replayed message from 'k1'" in renewal.body["error"]
    assert (reply.reply_to, reply.body) == (good.msg_id, {"echo": {"n": 3}, "kernel": "k1"})
    assert [m.body for m in broker.handlers.seen] == [{"n": 1}, {"n": 3}]

    logged = warnings_of(caplog, BROKER_LOG)
    for reason in [
        "replayed message from 'k1'",
        "bad signature from 'k1'",
        "unsigned message",
        "unknown kernel 'intruder'",
        "stale message",
        "in the future",
        "wrong direction",
        "oversized header (2000 bytes)",
        "expected 5 frames, got 1",
        "wrong magic",
    ]:
        assert reason in logged
    assert logged.count("bad signature") == 3  # wrong key, tampered body, forged junk


async def test_replies_never_reach_the_handler(
    broker: Broker, raw_dealer: zmq.asyncio.Socket, keys: dict[str, bytes]
) -> None:
    """An unmatched reply is dropped: answering it could bounce replies back and forth."""
    kernel = Sequencer("k1", ORIGIN_KERNEL)
    signer = Signer(keys["k1"])
    await raw_dealer.send_multipart(encode(kernel.make("ping_reply", {}, reply_to="x"), signer))
    good = kernel.make("echo", {})
    await raw_dealer.send_multipart(encode(good, signer))
    reply = decode(await asyncio.wait_for(raw_dealer.recv_multipart(), 5), keys.get)
    assert reply.reply_to == good.msg_id
    assert [m.type for m in broker.handlers.seen] == ["echo"]


async def test_oversized_message_disconnects_only_its_sender(
    broker: Broker, raw_dealer: zmq.asyncio.Socket, connect
) -> None:
    monitor = raw_dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        await raw_dealer.send_multipart([MAGIC, b"", b"x" * (MAX_MESSAGE_BYTES + 1), b"{}"])
        event = parse_monitor_message(await asyncio.wait_for(monitor.recv_multipart(), 5))
        assert event["event"] == zmq.EVENT_DISCONNECTED
    finally:
        raw_dealer.disable_monitor()
        monitor.close()
    assert await call(connect(broker.endpoint), "echo", {}) == {"echo": {}, "kernel": "k1"}


async def test_kernel_drops_forged_broker_messages(keys: dict[str, bytes], caplog) -> None:
    """The client trusts only correctly signed, fresh, broker-originated messages."""
    router = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = BrokerClient(f"tcp://127.0.0.1:{port}", "k1", keys["k1"])
    client.start()
    try:
        client.send("hello", {})
        identity, *_ = await asyncio.wait_for(router.recv_multipart(), 5)
        broker_seq = Sequencer("k1", ORIGIN_BROKER)
        signer = Signer(keys["k1"])

        async def send(frames: list[bytes]) -> None:
            await router.send_multipart([identity, *frames])

        async def receive() -> Message:
            _, *frames = await asyncio.wait_for(router.recv_multipart(), 5)
            return decode(frames, keys.get)

        captured = encode(broker_seq.make("ping", {}), signer)
        await send(captured)
        first = await receive()
        assert first.type == "ping_reply"

        await send(captured)  # replayed
        await send(encode(broker_seq.make("ping", {}), Signer(generate_key())))
        await send(encode(Sequencer("k1", ORIGIN_KERNEL).make("ping", {}), signer))
        await send(encode(Sequencer("k2", ORIGIN_BROKER).make("ping", {}), signer))
        await send([b"garbage"])
        good = broker_seq.make("ping", {})
        await send(encode(good, signer))
        reply = await receive()
        assert (reply.type, reply.reply_to, reply.origin) == ("ping_reply", good.msg_id, "kernel")
        assert reply.body["pid"] == os.getpid()
    finally:
        client.close()
        router.close()
    # The first drop is logged with its reason, the others summed up in one line (at close).
    first, summary = warnings_of(caplog, CLIENT_LOG).splitlines()
    assert first.startswith("dropped message from the broker: replayed message from 'k1'")
    assert summary.startswith("dropped messages from the broker: 4 in ")
    for kind in ["1 bad signature", "1 wrong direction", "1 unknown kernel", "1 malformed"]:
        assert kind in summary
    assert summary.endswith("last: expected 5 frames, got 1")


# -- fuzzing ---------------------------------------------------------------------------


@pytest.fixture
def threaded_broker(keys: dict[str, bytes]) -> Iterator[str]:
    """A broker on its own event loop thread, so synchronous hypothesis tests can hit it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = RPCServer(keys.get, echo, logging.getLogger(BROKER_LOG))
    endpoint = asyncio.run_coroutine_threadsafe(server.start(), loop).result(5)
    yield endpoint
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


frame_lists = st.lists(st.binary(max_size=128), min_size=1, max_size=6) | st.builds(
    lambda kernel_id, sig, header, body: [MAGIC, kernel_id, sig, header, body],
    st.sampled_from([b"k1", b"k2", b""]) | st.binary(max_size=140),
    st.binary(min_size=64, max_size=64) | st.binary(max_size=70),
    st.dictionaries(
        st.sampled_from(["type", "msg_id", "seq", "time", "reply_to", "origin", "session"]),
        st.none() | st.integers() | st.text(max_size=8) | st.sampled_from(["k1", "k2"]),
    ).map(lambda header: json.dumps(header).encode()),
    st.binary(max_size=64),
)


def test_server_survives_random_frames(threaded_broker: str, keys: dict[str, bytes]) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(threaded_broker)

    @settings(max_examples=300, deadline=None)
    @given(frame_lists)
    def send(frames: list[bytes]) -> None:
        sock.send_multipart(frames)

    try:
        send()
        client = BrokerClient(threaded_broker, "k1", keys["k1"])
        client.start()
        try:
            assert client.request("echo", {"ok": 1}, timeout=5) == {
                "echo": {"ok": 1},
                "kernel": "k1",
            }
        finally:
            client.close()
    finally:
        sock.close()


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_BROKER_URL, raising=False)
    assert BrokerClient.from_env() is None
    monkeypatch.setenv(ENV_BROKER_URL, "tcp://127.0.0.1:5555")
    monkeypatch.setenv(ENV_KERNEL_ID, "k9")
    monkeypatch.setenv(ENV_KERNEL_KEY, "ab" * 32)
    client = BrokerClient.from_env()
    assert client is not None
    assert (client.endpoint, client.kernel_id) == ("tcp://127.0.0.1:5555", "k9")
    with pytest.raises(RuntimeError, match="start"):
        client.request("echo", {})
    client.close()
