"""The kernel channel: the broker's RPC server and the kernel's client over real ZeroMQ sockets (a
Unix socket in a private directory), hostile peers and floods, sessions, the checks of numbers that
kernels report, and the kernel's wait for a broker that disappears (through a real server)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import gc
import json
import logging
import os
import re
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from broker_service import BROKER_LOG, GiB, call, wait_until
from cells import record_of
from hypothesis import given, settings
from hypothesis import strategies as st
from zmq.utils.monitor import parse_monitor_message

from jupyter_singularity import protocol
from jupyter_singularity.broker import rpc
from jupyter_singularity.broker import service as service_module
from jupyter_singularity.broker.identity import Identity
from jupyter_singularity.broker.model import Policy
from jupyter_singularity.broker.pool_events import LEASE_SCHEMA, QUEUE_SCHEMA
from jupyter_singularity.broker.quotas import Quotas
from jupyter_singularity.broker.rpc import MAX_MESSAGE_BYTES, RPCServer
from jupyter_singularity.kernel import client as client_module
from jupyter_singularity.kernel import membership
from jupyter_singularity.kernel import runtime as runtime_module
from jupyter_singularity.kernel.client import MAX_RESENDS, BrokerClient, BrokerError, Heartbeat
from jupyter_singularity.kernel.gate import LeaseDenied
from jupyter_singularity.protocol import (
    ENV_BROKER_URL,
    ENV_KERNEL_ID,
    ENV_KERNEL_KEY,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_KERNEL_FRAME_BYTES,
    ORIGIN_BROKER,
    ORIGIN_KERNEL,
    RENEW_SESSION,
    Message,
    Sequencer,
    SessionError,
    Signer,
    decode,
    encode,
    encode_parts,
    generate_key,
    join_parts,
)

pytestmark = pytest.mark.timeout(60)

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


def held_lease(broker: Broker) -> asyncio.Event:
    """A "lease" route that answers ``{"granted": <kernel id>}`` once the returned event is set."""
    granted = asyncio.Event()

    async def lease(msg: Message) -> dict:
        await granted.wait()
        return {"granted": msg.kernel_id}

    broker.handlers.routes["lease"] = lease
    return granted


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
    granted = held_lease(broker)
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


def takers(client: BrokerClient, keys: dict[str, bytes]) -> list[tuple[str, str]]:
    """(thread, message type) of each message ``client`` takes in from now on, in order."""
    taken_in_by: list[tuple[str, str]] = []
    dispatch = client._dispatch

    def recording(frames: list[bytes]) -> None:
        taken_in_by.append((threading.current_thread().name, decode(frames, keys.get).type))
        dispatch(frames)

    client._dispatch = recording
    return taken_in_by


async def test_a_waiting_caller_takes_its_reply_in_itself(
    broker: Broker, connect, keys: dict[str, bytes]
) -> None:
    """While a thread waits for its reply it takes the broker's messages in itself (no hand-over
    from the I/O thread): its reply, pushes, and the reply of another thread waiting meanwhile;
    once it is done, the I/O thread takes messages in again."""
    granted = held_lease(broker)
    client = connect(broker.endpoint)
    notices: list[dict] = []
    client.on("notice", notices.append)
    taken_in_by = takers(client, keys)
    replies: dict[str, dict] = {}
    waiter = threading.Thread(
        target=lambda: replies.update(lease=client.request("lease", {}, timeout=10)),
        name="waiting-cell",
    )
    waiter.start()
    await wait_until(lambda: broker.handlers.seen)
    await broker.server.push("k1", "notice", {"n": 1})
    await wait_until(lambda: notices)
    assert await call(client, "echo", {"other": True}) == {"echo": {"other": True}, "kernel": "k1"}
    granted.set()
    await asyncio.to_thread(waiter.join, 10)
    assert replies == {"lease": {"granted": "k1"}}
    assert ("waiting-cell", "lease_reply") in taken_in_by
    assert ("waiting-cell", "notice") in taken_in_by
    assert ("waiting-cell", "echo_reply") in taken_in_by  # the other thread's, taken in for it
    assert not any(name == "singularity-io" for name, _ in taken_in_by)
    await broker.server.push("k1", "notice", {"n": 2})
    await wait_until(lambda: len(notices) == 2)
    assert taken_in_by[-1] == ("singularity-io", "notice")


async def test_a_reply_its_caller_will_collect_is_left_on_the_socket_for_it(
    broker: Broker, connect, keys: dict[str, bytes], monkeypatch
) -> None:
    """A cell's acquire goes out as ipykernel dispatches the cell, and the gate waits for it
    later: meanwhile the I/O thread leaves the reply on the socket, for the gate to take in (no
    hand-over between threads); a reply nobody came for is taken in once the window ends."""
    monkeypatch.setattr(client_module, "COLLECT_WINDOW", 5.0)  # (however slow the machine)
    client = connect(broker.endpoint)
    taken_in_by = takers(client, keys)
    answer = client.submit("echo", {"n": 1}, collect=True)
    await wait_until(lambda: broker.handlers.seen)
    await asyncio.sleep(0.2)  # (the reply waits on the socket)
    assert not answer.done() and not taken_in_by
    assert await asyncio.to_thread(client.wait, answer, 10)
    assert answer.result() == {"echo": {"n": 1}, "kernel": "k1"}
    assert [type for _, type in taken_in_by] == ["echo_reply"], taken_in_by
    assert taken_in_by[0][0] != "singularity-io", taken_in_by  # (the waiting thread took it)
    monkeypatch.setattr(client_module, "COLLECT_WINDOW", 0.3)
    taken_in_by.clear()
    never_collected = client.submit("echo", {"n": 2}, collect=True)
    await asyncio.to_thread(concurrent.futures.wait, [never_collected], 10)
    assert never_collected.result() == {"echo": {"n": 2}, "kernel": "k1"}
    assert taken_in_by == [("singularity-io", "echo_reply")], taken_in_by


async def test_ping_answered_while_main_thread_blocks_in_request(broker: Broker, connect) -> None:
    granted = held_lease(broker)
    client = connect(broker.endpoint)
    waiting = asyncio.ensure_future(call(client, "lease", {}, timeout=10))
    await wait_until(lambda: broker.handlers.seen)
    for _ in range(3):
        reply = await broker.server.request("k1", "ping", {}, timeout=2)
        assert reply["pid"] == os.getpid()
        assert abs(reply["time"] - time.time()) < 5
    assert not waiting.done()
    granted.set()
    assert await waiting == {"granted": "k1"}


async def test_nothing_is_missed_while_both_ends_send(broker: Broker, connect) -> None:
    """Both ends read their socket when its descriptor signals, and a send may take that signal
    in: what arrives while a thread sends must still be read (pings while the kernel chatters)."""

    client = connect(broker.endpoint)
    await call(client, "echo", {})
    stop = threading.Event()

    def chatter() -> None:  # (paced by the replies: a flood would overrun the queues)
        while not stop.is_set():
            client.request("echo", {}, timeout=5)

    thread = threading.Thread(target=chatter)
    thread.start()
    try:
        for _ in range(20):
            pings = [broker.server.request("k1", "ping", {}, timeout=5) for _ in range(10)]
            assert all(r["pid"] == os.getpid() for r in await asyncio.gather(*pings))
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)  # (its last request needs this loop's broker)
    assert await call(client, "echo", {"last": 1}) == {"echo": {"last": 1}, "kernel": "k1"}


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


@pytest.mark.faults
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

    tampered = encode_parts(kernel.make("echo", {"n": 2}), signer)
    tampered[4] = b'{"n":666}'
    stale = kernel.make("echo", {})
    stale.time -= 3600
    future = kernel.make("echo", {})
    future.time += 3600
    reflected = Sequencer("k1", ORIGIN_BROKER).make("echo", {})
    unsigned = encode_parts(kernel.make("echo", {}), signer)
    unsigned[2] = b""
    oversized = encode_parts(kernel.make("echo", {}), signer)
    oversized[3] = b" " * 2000
    hostile = [
        captured,  # replayed verbatim
        encode(kernel.make("echo", {}), Signer(generate_key())),  # wrong key
        [join_parts(unsigned)],
        [join_parts(tampered)],
        encode(Sequencer("intruder", ORIGIN_KERNEL).make("echo", {}), signer),
        encode(stale, signer),
        encode(future, signer),
        encode(reflected, signer),
        [join_parts(oversized)],
        [b"junk"],
        [b"\xff" * 8] * 5,
        [MAGIC + b"\xff" * 8],
        [join_parts([MAGIC, b"k1", b"0" * 64, b"{not json", b"{}"])],
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
        "expected 1 frame, got 5",
        "truncated frame of 12 bytes",
        "wrong magic",
    ]:
        assert reason in logged
    assert logged.count("bad signature") == 3  # wrong key, tampered body, forged junk


async def test_a_node_broker_keeps_an_unknown_kernels_messages_until_it_is_registered(
    keys: dict[str, bytes], connect, monkeypatch, caplog
) -> None:
    """A node broker's kernels speak before their server registered them with a restarted run:
    their messages are handled once it did; those of a kernel never registered are dropped,
    and logged as such, after PARK_SECONDS."""
    monkeypatch.setattr(rpc, "PARK_SECONDS", 0.5)
    known = {"k1": keys["k1"]}
    server = RPCServer(known.get, echo, logging.getLogger(BROKER_LOG), drop_log_interval=0)
    with tempfile.TemporaryDirectory(prefix="sg-park-") as folder:
        endpoint = await server.start_shared(Path(folder) / "kernels.sock")
        try:
            late, never = connect(endpoint, "k2"), connect(endpoint, "k1")
            answer = late.submit("echo", {"n": 1})
            await asyncio.sleep(0.2)
            assert not answer.done()
            known["k2"] = keys["k2"]
            server.known("k2")
            assert await asyncio.to_thread(answer.result, 5) == {"echo": {"n": 1}, "kernel": "k2"}

            del known["k1"]  # (a kernel unregistered: nothing of its is kept for long)
            lost = never.submit("echo", {"n": 2})
            await asyncio.sleep(1.0)
            assert not lost.done()
            assert "unknown kernel 'k1'" in warnings_of(caplog, BROKER_LOG)
            known["k1"] = keys["k1"]
            server.known("k1")
            await asyncio.sleep(0.2)
            assert not lost.done()
        finally:
            await server.stop()


def test_parked_messages_keep_a_bounded_number_of_bytes_oldest_out_first() -> None:
    parked = rpc.ParkedMessages(limit=1000)

    def message(kernel_id: str, size: int, at: float) -> rpc._Parked:
        return rpc._Parked(protocol.UnknownKernel(kernel_id), b"r", [b"x" * (size - 1)], None, at)

    assert parked.add(message("a", 400, 1.0)) == []
    assert parked.add(message("b", 400, 2.0)) == []
    pushed_out = parked.add(message("a", 400, 3.0))
    assert [(p.error.kernel_id, p.at) for p in pushed_out] == [("a", 1.0)]
    assert [p.at for p in parked.expire(horizon=2.5)] == [2.0]
    assert parked.oldest() == 3.0
    assert [p.at for p in parked.take("a")] == [3.0]
    assert parked.take("a") == [] and parked.oldest() is None
    assert parked.add(message("c", 1000, 4.0)) == []  # room again: the bytes were given back


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


@pytest.mark.faults
async def test_oversized_message_disconnects_only_its_sender(
    broker: Broker, raw_dealer: zmq.asyncio.Socket, connect
) -> None:
    monitor = raw_dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        await raw_dealer.send_multipart([MAGIC + b"x" * MAX_MESSAGE_BYTES])
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
    assert summary.endswith("last: wrong magic b'garbage'")


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
    lambda kernel_id, sig, header, body: [join_parts([MAGIC, kernel_id, sig, header, body])],
    st.sampled_from([b"k1", b"k2", b""]) | st.binary(max_size=140),
    st.binary(min_size=64, max_size=64) | st.binary(max_size=70),
    st.dictionaries(
        st.sampled_from(["type", "msg_id", "seq", "time", "reply_to", "origin", "session"]),
        st.none() | st.integers() | st.text(max_size=8) | st.sampled_from(["k1", "k2"]),
    ).map(lambda header: json.dumps(header).encode()),
    st.binary(max_size=64),
)


@pytest.mark.faults
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


# -- where the channel listens ---------------------------------------------------------


def socket_path(endpoint: str) -> Path:
    assert endpoint.startswith("ipc://"), endpoint
    return Path(endpoint[len("ipc://") :])


def assert_private(directory: Path) -> None:
    info = os.lstat(directory)
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == os.getuid()


async def test_channel_is_a_unix_socket_in_a_private_directory(keys, connect) -> None:
    runtime_dir = Path(tempfile.mkdtemp(prefix="rt-"))  # short: the socket path fits under it
    server = RPCServer(keys.get, echo, logging.getLogger(BROKER_LOG))
    try:
        path = socket_path(await server.start(runtime_dir))
        assert path.parent.parent == runtime_dir and path.parent == server.socket_dir
        assert_private(path.parent)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        client = connect(f"ipc://{path}")
        assert await call(client, "echo", {}) == {"echo": {}, "kernel": "k1"}
    finally:
        await server.stop()
    assert not path.parent.exists()  # removed at stop, socket and all
    runtime_dir.rmdir()


async def test_socket_directory_falls_back_when_the_path_would_be_too_long(keys) -> None:
    deep = Path(tempfile.mkdtemp(prefix="rt-")) / ("d" * 80)
    server = RPCServer(keys.get, echo, logging.getLogger(BROKER_LOG))
    try:
        path = socket_path(await server.start(deep))
        assert len(os.fsencode(path)) <= rpc.MAX_SOCKET_PATH
        assert path.parent.parent == Path(tempfile.gettempdir())
        assert_private(path.parent)
        assert not deep.exists()  # nothing made where the socket could not go
    finally:
        await server.stop()
        deep.parent.rmdir()


def connect_as(uid: int, path: Path) -> int:
    """Connect to the Unix socket at ``path`` from a child process running as ``uid``; returns the
    child's errno (0: connected)."""
    pid = os.fork()
    if pid == 0:  # the child: no Python cleanup, no pytest, just the answer in the exit status
        code = 0
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(path))
        except OSError as err:
            code = err.errno or 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.faults
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
async def test_another_user_cannot_connect(broker: Broker) -> None:
    path = socket_path(broker.endpoint)
    nobody = 65534
    assert connect_as(nobody, path) == errno.EACCES
    # Control: with the directory opened up, the same child does connect; the directory is
    # what keeps other users out.
    os.chmod(path.parent, 0o711)
    os.chmod(path, 0o777)
    assert connect_as(nobody, path) == 0


async def test_tcp_only_where_ipc_is_unavailable(keys, connect, monkeypatch) -> None:
    monkeypatch.setattr(rpc, "ipc_supported", lambda: False)
    server = RPCServer(keys.get, echo, logging.getLogger(BROKER_LOG))
    try:
        endpoint = await server.start(Path(tempfile.gettempdir()))
        assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", endpoint) and server.socket_dir is None
        assert await call(connect(endpoint), "echo", {}) == {"echo": {}, "kernel": "k1"}
    finally:
        await server.stop()


# -- floods and oversized frames -------------------------------------------------------


@pytest.mark.faults
async def test_forged_huge_header_is_dropped_unparsed(
    broker: Broker, raw_dealer: zmq.asyncio.Socket, keys: dict[str, bytes], monkeypatch, caplog
) -> None:
    parsed: list[bytes] = []
    real = protocol._loads_object
    monkeypatch.setattr(
        protocol, "_loads_object", lambda data, what: parsed.append(data) or real(data, what)
    )
    kernel = Sequencer("k1", ORIGIN_KERNEL)
    header = json.dumps({"type": "echo", "pad": "x" * (MAX_KERNEL_FRAME_BYTES // 2)}).encode()
    small_header = encode_parts(kernel.make("echo", {}), Signer(keys["k1"]))[3]
    for forged_header in (header, small_header):  # over the header cap; under it, wrongly signed
        await raw_dealer.send_multipart(
            [join_parts([MAGIC, b"k1", b"0" * 64, forged_header, b"{}"])]
        )
    good = kernel.make("echo", {"n": 1})
    await raw_dealer.send_multipart(encode(good, Signer(keys["k1"])))
    reply = decode(await asyncio.wait_for(raw_dealer.recv_multipart(), 5), keys.get)
    assert reply.reply_to == good.msg_id
    logged = warnings_of(caplog, BROKER_LOG)
    assert f"oversized header ({len(header)} bytes)" in logged and "bad signature" in logged
    assert all(len(data) <= MAX_HEADER_BYTES for data in parsed) and small_header not in parsed
    assert [m.body for m in broker.handlers.seen] == [{"n": 1}]


async def test_client_refuses_frames_the_broker_would_cut_off(broker: Broker, connect) -> None:
    client = connect(broker.endpoint)
    client.on("offload", lambda body: {"listing": "x" * MAX_KERNEL_FRAME_BYTES})
    with pytest.raises(ValueError, match="the channel takes at most 65536"):
        await call(client, "echo", {"x": "x" * MAX_KERNEL_FRAME_BYTES})
    await call(client, "echo", {})
    reply = await broker.server.request("k1", "offload", {}, timeout=5)
    assert reply["error"].startswith("unencodable reply: 'offload_reply' has a frame of")
    assert await call(client, "echo", {"still": "served"}) == {
        "echo": {"still": "served"},
        "kernel": "k1",
    }


@pytest.mark.faults
async def test_a_flood_of_junk_logs_a_bounded_number_of_lines(keys, caplog) -> None:
    caplog.set_level(logging.WARNING, BROKER_LOG)
    handlers = Handlers(routes={"echo": echo})
    server = RPCServer(keys.get, handlers, logging.getLogger(BROKER_LOG))  # the default interval
    endpoint = await server.start()
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    kernel = Sequencer("k1", ORIGIN_KERNEL)
    forged = encode(kernel.make("echo", {}), Signer(generate_key()))
    try:
        for i in range(3000):
            await sock.send_multipart([b"junk"] if i % 3 else forged)
        good = kernel.make("echo", {"n": 1})
        await sock.send_multipart(encode(good, Signer(keys["k1"])))
        reply = decode(await asyncio.wait_for(sock.recv_multipart(), 30), keys.get)
        assert reply.reply_to == good.msg_id  # served after the whole flood
    finally:
        sock.close()
        await server.stop()  # logs what was still being summed up
    lines = warnings_of(caplog, BROKER_LOG).splitlines()
    assert len(lines) == 2, lines
    assert lines[0] == "dropped message on the kernel channel: bad signature from 'k1'"
    assert lines[1].startswith("dropped messages on the kernel channel: 2999 in ")
    assert "(2000 malformed, 999 bad signature); last: wrong magic b'junk'" in lines[1]


# -- sessions ----------------------------------------------------------------------------


@pytest.mark.faults
async def test_client_renews_a_poisoned_or_stolen_session(
    broker: Broker, connect, raw_dealer: zmq.asyncio.Socket, keys: dict[str, bytes]
) -> None:
    signer = Signer(keys["k1"])
    broker.handlers.routes["note"] = echo
    client = connect(broker.endpoint)
    assert await call(client, "echo", {"n": 1}) == {"echo": {"n": 1}, "kernel": "k1"}

    # A process holding the key pushes the counter of the client's session far ahead...
    poison = Sequencer("k1", ORIGIN_KERNEL).make("echo", {"poison": 1})
    poison.session, poison.seq = client._sequencer.session, 2**62
    await raw_dealer.send_multipart(encode(poison, signer))
    await wait_until(lambda: len(broker.handlers.seen) == 2)
    # ... the client's next request is refused for its session, sent again in a fresh one.
    assert await call(client, "echo", {"n": 2}) == {"echo": {"n": 2}, "kernel": "k1"}

    # Another takes the session over with a nonce of its own: a notification still arrives.
    await raw_dealer.send_multipart(encode(Sequencer("k1", ORIGIN_KERNEL).make("note", {}), signer))
    await wait_until(lambda: len(broker.handlers.seen) == 4)
    client.send("note", {"n": 3})
    await wait_until(lambda: len(broker.handlers.seen) == 5)
    assert [m.body for m in broker.handlers.seen] == [
        {"n": 1},
        {"poison": 1},
        {"n": 2},
        {},
        {"n": 3},
    ]


async def test_resending_in_fresh_sessions_is_bounded(broker: Broker, connect, monkeypatch) -> None:
    refusals: list[str] = []

    def refuse(msg: Message) -> None:
        refusals.append(msg.session)
        raise SessionError("refused for the test")

    monkeypatch.setattr(broker.server._guard, "check", refuse)
    client = connect(broker.endpoint)
    with pytest.raises(BrokerError, match="keeps refusing the session: refused for the test"):
        await call(client, "echo", {})
    assert len(refusals) == MAX_RESENDS + 1 and len(set(refusals)) == MAX_RESENDS + 1
    assert broker.handlers.seen == []


async def test_heartbeat_notices_a_broker_that_stopped(broker: Broker, connect) -> None:
    client = connect(broker.endpoint)
    heartbeat = Heartbeat(client, interval=0.5, misses=3)

    async def beat(until: Callable[[], bool]) -> str | None:
        while not until():
            if (lost := heartbeat.lost()) is not None:
                return lost
            await asyncio.sleep(0.01)
        return None

    broker.handlers.routes["ping"] = echo
    assert await beat(lambda: sum(m.type == "ping" for m in broker.handlers.seen) >= 2) is None
    assert heartbeat.missed == 0
    await broker.server.stop()
    lost = await asyncio.wait_for(beat(lambda: False), 30)
    assert lost == "the GPU pool's broker stopped answering (3 pings over 2 s went unanswered)"


async def test_a_grant_after_the_cell_gave_up_is_given_back(
    broker: Broker, connect, monkeypatch
) -> None:
    """A broker that stalls (pings unanswered) and grants later: the cell fails, the lease that
    comes after it is released at once instead of being held by a kernel that never used it."""
    monkeypatch.setattr(membership, "Heartbeat", functools.partial(Heartbeat, interval=0.1))
    grant, stalled = asyncio.Event(), asyncio.Event()

    async def acquire(msg: Message) -> dict:
        await grant.wait()
        return {"granted": True, "device": {"index": 0}, "reservation": 0, "restore": False}

    async def never(msg: Message) -> dict:
        await stalled.wait()
        return {}

    async def notice(msg: Message) -> None:
        return None

    broker.handlers.routes.update(acquire=acquire, ping=never, cancel=notice, release=notice)
    runtime = runtime_module.Runtime(connect(broker.endpoint), simulated=True)
    with pytest.raises(LeaseDenied, match="the GPU pool's broker stopped answering"):
        await asyncio.to_thread(runtime.acquire, None, top_of_cell=False)
    assert runtime.lease is None
    grant.set()
    await wait_until(lambda: any(m.type == "release" for m in broker.handlers.seen))
    (request,) = [m.body["request_id"] for m in broker.handlers.seen if m.type == "acquire"]
    assert [m.body for m in broker.handlers.seen if m.type in ("cancel", "release")] == [
        {"request_id": request},
        {"request_id": request},
    ]


# -- numbers kernels report, through the broker service ---------------------------------


async def test_a_waiting_cell_hears_when_it_moves_up_the_queue(service, pooled) -> None:
    """A decision tells a cell where it waits when it starts waiting or its reason changes, not
    each time it moves up (a grant near the head would tell everyone behind it, within the
    decision): the service tells the cells that moved up their new place soon after."""
    runner, *waiting = [await pooled(f"k{i}") for i in range(4)]
    heard: list[dict] = []
    waiting[2].on("queued", lambda body: heard.append(body) or None)
    await call(runner, "acquire", {"request_id": "r1", "memory": 16 * GiB})
    cells = []
    for client in waiting:  # one after the other: the queue is in this order
        body = {"request_id": "r1", "memory": 16 * GiB}
        cells.append(asyncio.ensure_future(call(client, "acquire", body, 20)))
        await wait_until(lambda c=client: service.kernel(c.kernel_id)["state"] == "queued")
    await wait_until(lambda: [b["position"] for b in heard] == [3])
    service.unregister_kernel("k1")  # the first waiting cell's kernel is gone
    await wait_until(lambda: [b["position"] for b in heard] == [3, 2])
    assert heard[1]["reason"] == heard[0]["reason"], heard  # (same reason: moved up only)
    assert [r["position"] for r in service.pool()["queue"]] == [1, 2]
    runner.on("offload", lambda body: {"host_bytes": GiB, "gpu_bytes": 0})
    runner.send("release", {"request_id": "r1", "peak_bytes": GiB, "gpu_bytes": GiB})
    assert (await cells[1])["granted"]
    for cell in (cells[0], cells[2]):  # (the kernel gone, and the one still waiting)
        cell.cancel()


async def test_a_cell_granted_before_the_next_positions_tick_never_hears_it_waited(
    service, pooled, monkeypatch
) -> None:
    """Telling a cell it waits costs its kernel and the broker a message each: a request queued
    behind a lease that ends before the next positions tick is granted without one; one still
    waiting then hears where and why it waits, once."""
    monkeypatch.setattr(service_module, "POSITIONS_DELAY", 1.0)
    runner, waiter = await pooled("k0"), await pooled("k1")
    heard: list[dict] = []
    waiter.on("queued", lambda body: heard.append(body) or None)
    events: list[dict] = []
    service.emit = lambda schema, data: schema == QUEUE_SCHEMA and events.append(data)
    whole = {"memory": 16 * GiB}
    for round_, release_at_once in (("r1", True), ("r2", False)):
        await call(runner, "acquire", {"request_id": round_, **whole})
        cell = asyncio.ensure_future(call(waiter, "acquire", {"request_id": round_, **whole}, 20))
        await wait_until(lambda: service.pool()["queue"])
        if not release_at_once:
            await wait_until(lambda: heard, timeout=10)
        runner.send("release", {"request_id": round_, "peak_bytes": GiB, "gpu_bytes": 0})
        assert (await cell)["granted"]
        waiter.send("release", {"request_id": round_, "peak_bytes": GiB, "gpu_bytes": 0})
        await wait_until(lambda: service.kernel("k1")["state"] == "resident")
    await asyncio.sleep(1.5)  # (a tick after the last decision tells nobody)
    assert [(b["request_id"], b["position"]) for b in heard] == [("r2", 1)], heard
    assert [(e["request_id"], e["position"]) for e in events] == [("r2", 1)], events


async def test_a_grant_goes_out_before_the_events_of_its_decision(service, pooled) -> None:
    """Each event a listening browser gets is validated against its schema first (about 0.2 ms):
    the grant a cell waits for must not wait for them."""
    client = await pooled("k0")
    order: list[str] = []
    sending = service._rpc._send

    def send(kernel_id: str, identity: bytes, type: str, body: dict, reply_to=None):
        order.append(type)
        return sending(kernel_id, identity, type, body, reply_to)

    service._rpc._send = send
    service.emit = lambda schema, data: order.append(f"{schema}:{data.get('action', '')}")
    granted = await call(client, "acquire", {"request_id": "r1", "memory": GiB})
    assert granted["granted"], granted
    await wait_until(lambda: "lease:granted" in order)
    assert order.index("acquire_reply") < order.index("lease:granted"), order
    assert "kernel_state:" in order[order.index("acquire_reply") :], order


async def test_an_event_that_fails_to_go_out_costs_the_others_nothing(
    service, pooled, caplog
) -> None:
    """Events go out in batches: a listener that raises on one is logged, and the rest of the
    batch still goes out."""
    client = await pooled("k0")
    emitted: list[str] = []

    def emit(schema: str, data: dict) -> None:
        if schema == LEASE_SCHEMA and data.get("action") == "granted":
            raise RuntimeError("a listener failed")
        emitted.append(f"{schema}:{data.get('action') or data.get('new')}")

    service.emit = emit
    assert (await call(client, "acquire", {"request_id": "r1", "memory": GiB}))["granted"]
    await wait_until(lambda: "kernel_state:running" in emitted)  # (the lease outlived its batch)
    assert "could not emit the lease event" in caplog.text
    client.send("release", {"request_id": "r1", "peak_bytes": GiB, "gpu_bytes": GiB})
    await wait_until(lambda: "lease:ended" in emitted)
    assert "kernel_state:resident" in emitted, emitted


async def test_a_lease_that_began_and_ended_within_a_batch_is_told_by_its_end_alone(
    service, pooled, monkeypatch
) -> None:
    """Cells run back to back cost the browser one event each (the lease's end), not four; a
    lease that outlives its batch is told whole, and so is a kernel's first cell (it leaves the
    kernel in another state than it found it)."""
    monkeypatch.setattr(service_module, "EVENTS_DELAY", 1.0)  # (however slow the machine)
    client = await pooled("k0")
    emitted: list[tuple[str, str, str]] = []

    def emit(schema: str, data: dict) -> None:
        detail = data.get("action") or f"{data.get('old')}>{data.get('new')}"
        emitted.append((schema, str(data.get("request_id", "")), detail))

    service.emit = emit
    for request_id in ("r1", "r2", "r3"):
        await call(client, "acquire", {"request_id": request_id, "memory": GiB})
        client.send("release", {"request_id": request_id, "peak_bytes": GiB, "gpu_bytes": GiB})
    await wait_until(lambda: ("lease", "r3", "ended") in emitted)
    assert [event for event in emitted if event[2] != "None>cold"] == [  # (the registration)
        ("lease", "r1", "granted"),
        ("kernel_state", "", "cold>running"),
        ("lease", "r1", "ended"),
        ("kernel_state", "", "running>resident"),
        ("lease", "r2", "ended"),
        ("lease", "r3", "ended"),
    ], emitted
    emitted.clear()
    await call(client, "acquire", {"request_id": "r4", "memory": GiB})
    await wait_until(lambda: len(emitted) == 2)
    client.send("release", {"request_id": "r4", "peak_bytes": GiB, "gpu_bytes": GiB})
    await wait_until(lambda: len(emitted) == 4)
    assert [detail for _, _, detail in emitted] == [
        "granted",
        "resident>running",
        "ended",
        "running>resident",
    ], emitted


async def test_release_books_the_drivers_figure_where_it_is_larger(service, pooled) -> None:
    client = await pooled("k1")
    await call(client, "acquire", {"request_id": "r1", "memory": 2 * GiB})
    service.inventory.held = {os.getpid(): 5 * GiB}  # the context and more than the kernel said
    client.send("release", {"request_id": "r1", "peak_bytes": GiB, "gpu_bytes": GiB})
    await wait_until(lambda: service.kernel("k1")["state"] == "resident")
    assert service.kernel("k1")["gpu_bytes"] == 5 * GiB
    await call(client, "acquire", {"request_id": "r2"})
    service.inventory.held = {os.getpid(): GiB // 2, 1: 9 * GiB}  # another process's is not its
    client.send("release", {"request_id": "r2", "peak_bytes": 3 * GiB, "gpu_bytes": 3 * GiB})
    await wait_until(lambda: service.kernel("k1")["state"] == "resident")
    assert service.kernel("k1")["gpu_bytes"] == 3 * GiB


@pytest.fixture
def collector_back() -> Iterator[None]:
    """The garbage collector on again after a test whose kernel held it off (see gc_hold)."""
    yield
    gc.enable()


async def test_a_cell_that_starts_cuda_outside_torch_books_its_gpu_and_gates_the_next(
    service, pooled, monkeypatch, collector_back
) -> None:
    """CuPy, JAX or torch's pinned memory start CUDA without torch's gate. At the end of that
    cell the kernel takes a lease on its GPU and gives it back with what the driver says it
    holds; its later cells are gated; an offload leaves all of it to the driver tier."""
    from jupyter_singularity.kernel import process_probes

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-test")  # (a grant names its GPU there)
    runtime = runtime_module.Runtime(await pooled("k0"), simulated=False)
    initialised = False
    for module in (runtime_module, process_probes):
        monkeypatch.setattr(module, "cuda_driver_initialised", lambda: initialised)
    monkeypatch.setattr(process_probes, "nvml_process_bytes", lambda pid: 3 * GiB)

    def cell() -> None:
        runtime._pre_execute()
        runtime.gate_cell()
        runtime._post_execute()

    await asyncio.to_thread(cell)  # no CUDA: no lease, nothing booked
    assert not runtime.gpu_used and service.kernel("k0")["state"] == "cold"
    initialised = True  # this cell started CUDA
    await asyncio.to_thread(cell)
    assert runtime.gpu_used
    await wait_until(lambda: service.kernel("k0")["state"] == "resident")
    assert service.kernel("k0")["gpu_bytes"] == 3 * GiB
    assert service.kernel("k0")["device"] == 0
    runtime._pre_execute()
    await asyncio.to_thread(runtime.gate_cell)  # the next cell is gated
    assert runtime.lease is not None and service.kernel("k0")["state"] == "running"
    runtime._post_execute()
    await wait_until(lambda: runtime.lease is None)  # (kept for a next cell a moment: lease_keep)
    assert runtime.on_offload({})["gpu_bytes"] == 3 * GiB  # the driver tier's to move
    assert not gc.isenabled()  # (held off while the driver may hold the process)


async def test_state_the_tensor_tier_refuses_is_left_to_the_driver_with_the_collector_held(
    pooled, monkeypatch, collector_back
) -> None:
    """A CUDA graph (or memory torch does not own) makes the tensor tier refuse: the kernel's
    reply leaves all of its GPU memory to the driver tier and says why. Until its next lease the
    garbage collector is held off: a finalizer's CUDA call would stop the whole process while
    the driver holds it checkpointed."""
    from types import SimpleNamespace

    from jupyter_singularity.kernel import process_probes
    from jupyter_singularity.kernel.offload import UnsafeStateError

    graphs = "1 live CUDA graph(s): they replay fixed device addresses"

    def refuse(**kwargs) -> None:
        raise UnsafeStateError(graphs)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-test")
    monkeypatch.setattr(process_probes, "cuda_driver_initialised", lambda: True)
    monkeypatch.setattr(process_probes, "nvml_process_bytes", lambda pid: 5 * GiB)
    runtime = runtime_module.Runtime(await pooled("k0"), simulated=False)
    runtime.engine = SimpleNamespace(offload=refuse)
    assert gc.isenabled()
    reply = runtime.on_offload({"reason": "requested"})
    assert (reply["host_bytes"], reply["gpu_bytes"], reply["tensor_refused"]) == (
        0,
        5 * GiB,
        graphs,
    )
    assert runtime.state == "offloaded" and not gc.isenabled()
    runtime._granted("r1", {"device": {"index": 0, "uuid": "GPU-test"}, "reservation": 0})
    assert gc.isenabled()


async def test_a_thread_left_running_keeps_the_kernel_and_shared_memory_goes_whole(
    pooled, monkeypatch, collector_back
) -> None:
    """A thread a cell started that still runs: neither tier moves state under it (the kernel
    stays on its GPU, saying why). Another CUDA library that may share torch's memory through
    DLPack: the tensor tier leaves the storages alone, the driver tier moves the whole process,
    its addresses kept."""
    from types import SimpleNamespace

    from jupyter_singularity.kernel import process_probes

    def must_not_move(**kwargs) -> None:
        raise AssertionError("the tensor tier moved storages it had to leave alone")

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-test")
    monkeypatch.setattr(process_probes, "cuda_driver_initialised", lambda: True)
    monkeypatch.setattr(process_probes, "nvml_process_bytes", lambda pid: 5 * GiB)
    runtime = runtime_module.Runtime(await pooled("k0"), simulated=False)
    runtime.engine = SimpleNamespace(offload=must_not_move)
    runtime.outliving.first_cell()  # the threads alive now are the kernel's
    stop = threading.Event()
    loader = threading.Thread(target=stop.wait, name="pin-memory")
    loader.start()
    try:
        reply = runtime.on_offload({})
    finally:
        stop.set()
        loader.join()
    assert reply["error"].startswith("thread(s) started by its cells still run (pin-memory):")
    assert runtime.state != "offloaded" and gc.isenabled()
    monkeypatch.setitem(sys.modules, "cupy", SimpleNamespace())
    reply = runtime.on_offload({})
    assert (reply["host_bytes"], reply["gpu_bytes"]) == (0, 5 * GiB)
    assert reply["tensor_refused"].startswith(
        "cupy may share torch's GPU memory (DLPack, __cuda_array_interface__)"
    )


@pytest.mark.parametrize(
    ("type", "body", "field_name"),
    [
        ("release", {"request_id": "r1", "gpu_bytes": -8 * GiB}, "gpu_bytes"),
        ("release", {"request_id": "r1", "gpu_bytes": 16 * GiB + 1}, "gpu_bytes"),
        ("release", {"request_id": "r1", "peak_bytes": True}, "peak_bytes"),
        ("release", {"request_id": "r1", "gpu_bytes": 1.5}, "gpu_bytes"),
        ("release", {"request_id": 7}, "request_id"),
        ("restored", {"gpu_bytes": -1}, "gpu_bytes"),
        ("restored", {"gpu_bytes": 1, "transfer": {"nbytes": 1, "seconds": -1}}, "seconds"),
        ("hello", {"pid": 0}, "pid"),
        ("hello", {"pid": True}, "pid"),
        ("pin", {"pinned": "yes"}, "pinned"),
        ("acquire", {"request_id": "r2", "memory": -1}, "memory"),
    ],
)
@pytest.mark.faults
async def test_bad_numbers_are_refused_and_change_nothing(
    service, pooled, type: str, body: dict, field_name: str
) -> None:
    client = await pooled("k1")
    await call(client, "acquire", {"request_id": "r1", "memory": 3 * GiB})
    before = service.pool()
    with pytest.raises(BrokerError, match=f"{type} refused: (transfer: )?field '{field_name}'"):
        await call(client, type, body)
    after = service.pool()
    assert record_of(after, "k1") == record_of(before, "k1")
    assert after["devices"] == before["devices"] and after["queue"] == before["queue"]


@pytest.mark.faults
async def test_bad_offload_reply_fails_the_offload(service, pooled, caplog) -> None:
    client = await pooled("k1")
    client.on("offload", lambda body: {"host_bytes": -GiB, "gpu_bytes": 0})
    await call(client, "acquire", {"request_id": "r1", "memory": 2 * GiB})
    client.send("release", {"request_id": "r1", "peak_bytes": 2 * GiB, "gpu_bytes": 2 * GiB})
    await wait_until(lambda: service.kernel("k1")["state"] == "resident")
    service.offload("k1")
    await wait_until(lambda: service.core.kernels["k1"].refused)
    record = service.kernel("k1")
    assert (record["state"], record["gpu_bytes"], record["host_bytes"]) == ("resident", 2 * GiB, 0)
    assert "bad offload reply: field 'host_bytes' must be an integer" in caplog.text


async def _offloaded_beside_a_victim(service, incoming, victim, context: int = 0) -> list[dict]:
    """Kernel "in" offloaded (6 GiB in host memory, ``context`` left on the GPU), "v" resident
    with 12 GiB of the 16 GiB GPU; the room pushes "in" hears from now on."""
    incoming.on("offload", lambda body: {"host_bytes": 6 * GiB, "gpu_bytes": context})
    await call(incoming, "acquire", {"request_id": "r1", "memory": 6 * GiB})
    incoming.send("release", {"request_id": "r1", "peak_bytes": 6 * GiB, "gpu_bytes": 6 * GiB})
    await wait_until(lambda: service.kernel("in")["state"] == "resident")
    service.offload("in")
    await wait_until(lambda: service.kernel("in")["state"] == "offloaded")
    await call(victim, "acquire", {"request_id": "r1", "memory": 12 * GiB})
    victim.send("release", {"request_id": "r1", "peak_bytes": 12 * GiB, "gpu_bytes": 12 * GiB})
    await wait_until(lambda: service.kernel("v")["state"] == "resident")
    rooms: list[dict] = []
    incoming.on("room", lambda body: rooms.append(body) or None)
    return rooms


@pytest.mark.parametrize(
    "quota, context, at_once",
    [(None, 0, 4 * GiB), (14 * GiB, 0, 2 * GiB), (None, GiB // 2, 7 * GiB // 2)],
    ids=["free", "within-quota", "context-left-on-the-gpu"],
)
async def test_room_no_booking_holds_goes_to_the_incoming_kernel_before_any_is_freed(
    service, pooled, quota: int | None, context: int, at_once: int
) -> None:
    """A request reserves its peak plus a margin, often more than the state it restores: what
    the device has free beside the victim's booking (within the user's GPU memory quota) is the
    incoming kernel's at once, while the victim has freed nothing yet; then what the victim
    frees, up to the incoming kernel's state. An incoming kernel whose CUDA context stayed on
    the GPU (no driver tier here) restores early too, its context booked there."""
    if quota is not None:
        service.set_quotas(Quotas({"default": {"gpu_memory": quota}}))
    incoming, victim = await pooled("in"), await pooled("v")
    rooms = await _offloaded_beside_a_victim(service, incoming, victim, context)
    let_go = threading.Event()

    def offload_when_let_go(body: dict) -> dict:
        let_go.wait(10)
        victim.send("freed", {"bytes": 12 * GiB})
        return {"host_bytes": 12 * GiB, "gpu_bytes": 0}

    victim.on("offload", offload_when_let_go)
    cell = asyncio.ensure_future(call(incoming, "acquire", {"request_id": "r2"}, 20))
    await wait_until(lambda: rooms == [{"bytes": at_once}])  # 16 GiB, 12 booked by the victim
    let_go.set()
    await wait_until(lambda: rooms == [{"bytes": at_once}, {"bytes": 6 * GiB}])
    assert (await cell)["granted"]


@pytest.mark.parametrize("service", [Policy(fair_share_rate=1e9)], indirect=True)
async def test_a_grant_over_room_lent_in_a_swap_waits_until_it_is_given_back(
    service, pooled
) -> None:
    """Kernel "in" restores early into the room victim "v" frees for it; "q" of a user with no
    GPU time today overtakes it and is granted the GPU once "v" is off it, too much of it for
    both. The room "in" filled is revoked first, and "q" hears of its grant only once "in" gave
    that room back: the device never holds both."""
    incoming, victim = await pooled("in"), await pooled("v")
    other = await pooled("q", Identity("quinn", (), uid=os.getuid()))
    rooms = await _offloaded_beside_a_victim(service, incoming, victim)
    let_go = threading.Event()

    def offload_with_room(body: dict) -> dict:
        assert body["room"] is True  # paired with the swap of "in"
        victim.send("freed", {"bytes": 6 * GiB})
        let_go.wait(10)
        return {"host_bytes": 12 * GiB, "gpu_bytes": 0}

    victim.on("offload", offload_with_room)
    incoming_cell = asyncio.ensure_future(call(incoming, "acquire", {"request_id": "r2"}, 20))
    # The 4 GiB no booking holds at once, then the victim's freed bytes, up to "in"'s state.
    await wait_until(lambda: rooms == [{"bytes": 4 * GiB}, {"bytes": 6 * GiB}])
    # quinn has no GPU time today, "in"'s user has some: quinn's request goes first.
    other_cell = asyncio.ensure_future(
        call(other, "acquire", {"request_id": "r1", "memory": 11 * GiB}, 20)
    )
    await wait_until(lambda: service.kernel("q")["state"] == "queued")
    let_go.set()
    await wait_until(lambda: len(rooms) == 3)
    assert "revoke" in rooms[2], rooms
    await asyncio.sleep(0.3)
    assert not other_cell.done()  # granted in the core, not told until the room is back
    incoming.send("room_returned", {})
    assert (await other_cell)["granted"]
    other.send("release", {"request_id": "r1", "peak_bytes": GiB, "gpu_bytes": GiB})
    assert (await incoming_cell)["granted"]


# -- through a real server and real kernels ----------------------------------------------

KERNEL_CLIENT = """
from jupyter_singularity.kernel.runtime import Runtime
from jupyter_singularity.kernel.client import BrokerError
client = Runtime.current.client
"""


def metric_values(text: str) -> dict[str, float]:
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    return {name: float(value) for name, value in samples}


@pytest.mark.parametrize(
    "singularity_config", [{"quotas": {"default": {"gpu_memory": "3GiB"}}}], indirect=True
)
@pytest.mark.faults
async def test_negative_release_is_refused_and_the_quota_holds(
    start_kernel, wait_in_pool, execute, get_pool, get_json, jp_fetch, state, wait_for
) -> None:
    """The issue's attack: a release with gpu_bytes = -8 GiB made bookings negative, bypassed a
    3 GiB quota and let another kernel be granted memory still in use."""
    a, b = await start_kernel(), await start_kernel()
    await wait_in_pool([a, b])
    status, out = await execute(
        a,
        KERNEL_CLIENT
        + """
print(client.request("acquire", {"request_id": "a1", "memory": 3 << 30})["granted"])
try:
    client.request("release", {"request_id": "a1", "gpu_bytes": -(8 << 30)}, timeout=10)
    print("accepted")
except BrokerError as err:
    print("refused:", err)
except TimeoutError:
    print("no answer")
""",
    )
    assert status == "ok", out
    assert out.splitlines()[0] == "True"
    assert "refused: release refused: field 'gpu_bytes' must be an integer from 0 to" in out, out

    async def booked() -> int:
        pool = await get_pool()
        return sum(d["booked_bytes"] for d in pool["devices"])

    assert record_of(await get_pool(), a)["state"] == "running"  # its lease is still held
    assert await booked() == 3 * GiB
    metrics = metric_values((await jp_fetch("singularity", "metrics")).body.decode())
    assert min(metrics.values()) >= 0, metrics
    # Another kernel of the same user waits: the quota is spent by the lease still held.
    status, out = await execute(
        b, KERNEL_CLIENT + 'b1 = client.submit("acquire", {"request_id": "b1", "memory": 1 << 30})'
    )
    assert status == "ok", out
    await state(b, "queued")
    assert await booked() == 3 * GiB
    # A's proper release: B is granted once A's memory is offloaded, within the quota.
    status, out = await execute(
        a,
        'client.send("release", {"request_id": "a1", "peak_bytes": 3 << 30, "gpu_bytes": 3 << 30})',
    )
    assert status == "ok", out
    status, out = await execute(b, "print(b1.result(30)['granted'])")
    assert (status, out.strip()) == ("ok", "True")
    pool = await state(a, "offloaded")
    assert record_of(pool, a)["gpu_bytes"] == 0
    quota = await get_json("singularity", "api", "quota")
    assert 0 <= quota["usage"]["gpu_bytes"] <= 3 * GiB
    assert 0 <= await booked() <= 3 * GiB


GPU_CELL = "%%singularity\nprint('ran on the GPU')"


@pytest.mark.faults
async def test_a_poisoned_sequence_counter_does_not_lock_the_kernel_out(
    start_kernel, wait_in_pool, run, singularity_app, state
) -> None:
    kernel_id = await start_kernel()
    await wait_in_pool(kernel_id)
    status, text, _ = await run(kernel_id, GPU_CELL)
    assert status == "ok" and "ran on the GPU" in text, text
    await state(kernel_id, "resident")  # (the lease it kept a moment is back: the kernel is quiet)
    service = singularity_app.service
    key = service._connections[kernel_id].key  # what a process holding the key could send
    window = service._rpc._guard._windows[kernel_id]
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(service.endpoint)
    try:
        poison = Sequencer(kernel_id, ORIGIN_KERNEL).make("status", {})
        poison.session, poison.seq = window.session, 2**62
        await sock.send_multipart(encode(poison, Signer(key)))
        await wait_until(lambda: window.last_seq == 2**62)
        status, text, _ = await run(kernel_id, GPU_CELL)
        assert status == "ok" and "ran on the GPU" in text, text
        await state(kernel_id, "resident")

        # A session of its own, started with a hello at seq 2**62: the kernel is not locked out.
        hello = Sequencer(kernel_id, ORIGIN_KERNEL).make("hello", {"pid": 1})
        hello.seq = 2**62
        await sock.send_multipart(encode(hello, Signer(key)))
        await wait_until(lambda: window.session == hello.session)
        status, text, _ = await run(kernel_id, GPU_CELL)
        assert status == "ok" and "ran on the GPU" in text, text
        assert window.session != hello.session
    finally:
        sock.close()


@pytest.mark.faults
@pytest.mark.parametrize("singularity_devices", ["simulated:1x16GiB"])
async def test_a_waiting_cell_fails_when_the_broker_disappears(
    start_kernel, wait_in_pool, execute, run, singularity_app, state
) -> None:
    holder, waiter = await start_kernel(), await start_kernel()
    await wait_in_pool([holder, waiter])
    status, out = await execute(
        holder,
        KERNEL_CLIENT + 'print(client.request("acquire", {"request_id": "h", "memory": 16 << 30}))',
    )
    assert status == "ok" and "'granted': True" in out, out
    cell = asyncio.ensure_future(run(waiter, "%%singularity\nprint('CELL BODY RAN')", timeout=120))
    await state(waiter, "queued")
    await singularity_app.service._rpc.stop()  # the broker's channel is gone
    status, text, _ = await cell
    assert status == "error", text
    assert "the GPU pool's broker stopped answering (3 pings over 6 s went unanswered)" in text
    assert "CELL BODY RAN" not in text
