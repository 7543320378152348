"""Wire format, signatures and freshness rules of the broker <-> kernel protocol, and the checks
of the numbers kernels report."""

from __future__ import annotations

import json
import logging
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jupyter_singularity import protocol
from jupyter_singularity.protocol import (
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_ID_CHARS,
    MAX_KERNEL_ID_BYTES,
    ORIGIN_BROKER,
    ORIGIN_KERNEL,
    DropLog,
    FieldError,
    Message,
    ProtocolError,
    ReplayGuard,
    Sequencer,
    SessionError,
    Signer,
    count_field,
    decode,
    decode_parts,
    encode,
    encode_parts,
    error_text,
    flag_field,
    generate_key,
    join_parts,
    seconds_field,
    split_frame,
    text_field,
    transfer_field,
)

KEY = generate_key()
KEYS = {"k1": KEY}
HEADER_FIELDS = ("type", "msg_id", "seq", "time", "reply_to", "origin", "session")
GiB = 1 << 30


def json_trees(
    floats: st.SearchStrategy[float], integers: st.SearchStrategy[int] | None = None
) -> st.SearchStrategy[object]:
    integers = st.integers() if integers is None else integers
    return st.recursive(
        st.none() | st.booleans() | integers | floats | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=12,
    )


# Anything json.loads accepts, NaN and Infinity included.
json_values = json_trees(st.floats())
# What encode() can send: JSON proper, with integers of 64 bits at most.
json_objects = st.dictionaries(
    st.text(max_size=8),
    json_trees(
        st.floats(allow_nan=False, allow_infinity=False),
        st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    ),
    max_size=6,
)


SENDER = Sequencer("k1", ORIGIN_KERNEL)


def make(type: str = "echo", body: dict | None = None, **changes: object) -> Message:
    """A message of one session of kernel k1, with ``changes`` applied."""
    msg = SENDER.make(type, {"x": 1} if body is None else body)
    for name, value in changes.items():
        setattr(msg, name, value)
    return msg


def signed(header: dict | bytes, body: bytes = b"{}", kernel_id: bytes = b"k1") -> list[bytes]:
    """Frames with a valid signature over arbitrary header content."""
    header_raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    signature = Signer(KEY).sign(kernel_id, header_raw, body)
    return [join_parts([MAGIC, kernel_id, signature, header_raw, body])]


def test_encode_decode_round_trip() -> None:
    msg = make(body={"n": [1, 2.5, None], "s": "ü"}, reply_to="abc")
    assert decode(encode(msg, Signer(KEY)), KEYS.get) == msg


def test_signer_verifies_only_its_own_signatures() -> None:
    signature = Signer(KEY).sign(b"a", b"b")
    assert Signer(KEY).verify(signature, b"a", b"b")
    assert not Signer(KEY).verify(signature, b"a", b"c")
    assert not Signer(generate_key()).verify(signature, b"a", b"b")
    # Bytes moved from one part into the next (the kernel id into the header) break it too.
    assert not Signer(KEY).verify(signature, b"ab", b"")
    assert not Signer(KEY).verify(signature, b"", b"ab")
    with pytest.raises(ValueError):
        Signer(b"")


def test_generated_keys_are_fresh_hex() -> None:
    key = generate_key()
    assert len(key) == 64
    assert bytes.fromhex(key.decode("ascii"))
    assert key != generate_key()


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda f: [], "expected 1 frame, got 0"),
        (lambda f: [*f, b"extra"], "expected 1 frame, got 2"),
        (lambda f: [b"SNG2" + f[0][4:]], "wrong magic"),
        (lambda f: [f[0][:-60]], "truncated frame"),
        (lambda f: [f[0][:6]], "truncated frame"),
        (lambda f: ["text"], "frames must be bytes"),
    ],
)
def test_decode_rejects_broken_frames(mangle, reason: str) -> None:
    """A message is one frame (MAGIC, then each part after its length): anything else is dropped
    before any part is looked at."""
    frames = mangle(encode(make(), Signer(KEY)))
    with pytest.raises(ProtocolError, match=reason):
        decode(frames, KEYS.get)


def test_a_message_is_one_frame_of_its_parts() -> None:
    parts = encode_parts(make(), Signer(KEY))
    assert split_frame([join_parts(parts)]) == parts
    assert decode([join_parts(parts)], KEYS.get) == decode_parts(parts, KEYS.get)


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda f: [b"SNG1", *f[1:]], "wrong magic"),
        (lambda f: [f[0], f[1], b"", *f[3:]], "unsigned"),
        (lambda f: [f[0], f[1], f[2] + b"0", *f[3:]], "signature of 65 bytes"),
        (lambda f: [f[0], f[1], b"0" * 64, *f[3:]], "bad signature"),
        (lambda f: [*f[:4], b'{"x":2}'], "bad signature"),
        (lambda f: [*f[:3], f[3].replace(b'"echo"', b'"evil"'), f[4]], "bad signature"),
        (lambda f: [f[0], b"k2", *f[2:]], "unknown kernel 'k2'"),
        (lambda f: [f[0], b"", *f[2:]], "kernel id of 0 bytes"),
        (lambda f: [f[0], b"k" * (MAX_KERNEL_ID_BYTES + 1), *f[2:]], "kernel id of 129"),
        (lambda f: [f[0], b"\xff\xfe", *f[2:]], "is not UTF-8"),
        (lambda f: [*f[:3], b" " * (MAX_HEADER_BYTES + 1), f[4]], "oversized header"),
        (lambda f: f[:4], "expected 5 parts"),
        (lambda f: [f[0], f[1], "text", *f[3:]], "frames must be bytes"),
    ],
)
def test_decode_rejects_broken_parts(mangle, reason: str) -> None:
    parts = mangle(encode_parts(make(), Signer(KEY)))
    with pytest.raises(ProtocolError, match=reason):
        decode_parts(parts, KEYS.get)
    if all(isinstance(part, bytes) for part in parts) and len(parts) == 5:
        with pytest.raises(ProtocolError, match=reason):  # as they arrive, in one frame
            decode([join_parts(parts)], KEYS.get)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b"{oops", "malformed JSON in header"),
        (b"\xff\xfe", "malformed JSON in header"),
        (b"[" * 1000, "malformed JSON in header"),
        (b"[]", "header is not a JSON object"),
    ],
)
def test_decode_parses_signed_headers_strictly(header: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason) as caught:
        decode(signed(header), KEYS.get)
    assert caught.value.kind == "bad content"


def test_nothing_is_parsed_before_the_signature_verified(monkeypatch) -> None:
    """A stranger's frames, even a huge header, cost a size check or one hash: no JSON parsing."""
    parsed: list[bytes] = []
    real = protocol._loads_object
    monkeypatch.setattr(
        protocol, "_loads_object", lambda data, what: parsed.append(data) or real(data, what)
    )
    good = encode_parts(make(), Signer(KEY))
    forged = encode_parts(make(), Signer(generate_key()))
    huge = json.dumps({"type": "x", "pad": "x" * (16 << 20)}).encode()
    attempts = {
        "bad signature": forged,
        "oversized header": [*forged[:3], huge, forged[4]],
        "unknown kernel": [good[0], b"nobody", *good[2:]],
    }
    for reason, parts in attempts.items():
        with pytest.raises(ProtocolError, match=reason):
            decode([join_parts(parts)], KEYS.get)
    assert parsed == []
    assert decode([join_parts(good)], KEYS.get).body == {"x": 1}
    assert parsed == [good[3], good[4]]  # the spy does see what is parsed


def test_decode_rejects_wrong_key_and_unknown_kernel() -> None:
    forged = encode(make(), Signer(generate_key()))
    with pytest.raises(ProtocolError, match="bad signature"):
        decode(forged, KEYS.get)
    stranger = encode(make(kernel_id="k2"), Signer(KEY))
    with pytest.raises(ProtocolError, match="unknown kernel 'k2'"):
        decode(stranger, KEYS.get)


def test_encode_refuses_what_the_receiver_would_drop() -> None:
    with pytest.raises(ValueError, match="caps"):
        encode(make(kernel_id="k" * (MAX_KERNEL_ID_BYTES + 1)), Signer(KEY))
    with pytest.raises(ValueError, match="caps"):
        encode(make(type="t" * MAX_HEADER_BYTES), Signer(KEY))


def test_decode_validates_signed_content() -> None:
    good = json.loads(encode_parts(make(), Signer(KEY))[3])
    with pytest.raises(ProtocolError, match="malformed JSON in body"):
        decode(signed(good, b"{nope"), KEYS.get)
    with pytest.raises(ProtocolError, match="body is not a JSON object"):
        decode(signed(good, b"[1]"), KEYS.get)
    with pytest.raises(ProtocolError, match="missing field 'msg_id'"):
        decode(signed({k: v for k, v in good.items() if k != "msg_id"}), KEYS.get)
    for name, value in [
        ("seq", True),
        ("seq", "1"),
        ("time", "now"),
        ("reply_to", 3),
        ("session", None),
    ]:
        with pytest.raises(ProtocolError, match=f"bad field '{name}'"):
            decode(signed({**good, name: value}), KEYS.get)
    # NaN and Infinity are not JSON: a header that holds them is not parsed at all.
    for value in (float("nan"), float("inf")):
        with pytest.raises(ProtocolError, match="malformed JSON in header"):
            decode(signed({**good, "time": value}), KEYS.get)


@pytest.mark.faults
def test_replay_guard_rejects_repeats_per_sender() -> None:
    guard = ReplayGuard(ORIGIN_KERNEL)
    first, second = make(seq=5), make(seq=6)
    guard.check(first)
    guard.check(second)
    with pytest.raises(SessionError, match="replayed message from 'k1': seq 5 <= 6"):
        guard.check(first)
    with pytest.raises(SessionError, match="replayed"):
        guard.check(second)
    guard.check(make(kernel_id="k2", seq=1))  # other senders have their own counter
    guard.forget("k1")
    guard.check(first)


@pytest.mark.faults
def test_replay_guard_checks_direction_age_and_future() -> None:
    guard = ReplayGuard(ORIGIN_KERNEL, max_age=60, max_skew=5)
    with pytest.raises(ProtocolError, match="wrong direction"):
        guard.check(make(origin=ORIGIN_BROKER))
    with pytest.raises(ProtocolError, match="stale message"):
        guard.check(make(time=time.time() - 61))
    with pytest.raises(ProtocolError, match="in the future") as caught:
        guard.check(make(time=time.time() + 3600))
    assert not isinstance(caught.value, SessionError)  # a real kernel never sends that: no reply
    guard.check(make(time=time.time() - 59))
    guard.check(make(time=time.time() + 4))


def test_a_poisoned_counter_cannot_lock_the_sender_out() -> None:
    """Someone holding the key pushes the counter ahead, or takes the session over: the real
    sender starts a fresh session and is served again; copies of ended sessions stay refused."""
    guard = ReplayGuard(ORIGIN_KERNEL)
    kernel = Sequencer("k1", ORIGIN_KERNEL)
    hello = kernel.make("hello", {"pid": 1})
    guard.check(hello)
    guard.check(kernel.make("status", {}))

    poison = kernel.make("status", {})
    poison.seq = 2**62
    guard.check(poison)
    locked_out = kernel.make("acquire", {})
    with pytest.raises(SessionError, match="replayed"):
        guard.check(locked_out)
    kernel.renew()
    guard.check(kernel.make("acquire", {}))  # a fresh session: served again

    impostor = Sequencer("k1", ORIGIN_KERNEL)  # takes the session over with a nonce of its own
    guard.check(impostor.make("status", {}))
    with pytest.raises(SessionError, match="ended session"):
        guard.check(kernel.make("release", {}))
    kernel.renew()
    guard.check(kernel.make("release", {}))

    # The first message of a session (the hello) cannot open it again, nor any of its copies.
    with pytest.raises(SessionError, match="ended session"):
        guard.check(hello)
    with pytest.raises(SessionError):
        guard.check(locked_out)


def test_replay_guard_remembers_ended_sessions_within_bounds(monkeypatch) -> None:
    monkeypatch.setattr(ReplayGuard, "MAX_ENDED", 3)
    guard = ReplayGuard(ORIGIN_KERNEL)
    firsts = []
    for _ in range(6):
        first = Sequencer("k1", ORIGIN_KERNEL).make("hello", {})
        guard.check(first)
        firsts.append(first)
    window = guard._windows["k1"]
    assert len(window.ended) == 3 and window.session == firsts[-1].session
    with pytest.raises(SessionError):
        guard.check(firsts[-2])


def test_sequencer_is_strictly_increasing_across_restarts() -> None:
    before = Sequencer("k1", ORIGIN_KERNEL)
    seqs = [before.make("t", {}).seq for _ in range(100)]
    assert seqs == sorted(set(seqs))
    restarted = Sequencer("k1", ORIGIN_KERNEL)
    assert restarted.make("t", {}).seq > seqs[-1]
    assert restarted.session != before.session
    session = restarted.session
    restarted.renew()
    assert restarted.session != session and restarted.make("t", {}).session == restarted.session


def test_sequencer_messages() -> None:
    seq = Sequencer("k1", ORIGIN_BROKER)
    a, b = seq.make("ping", {}), seq.make("offload", {"n": 1}, reply_to="r", msg_id="m")
    assert a.msg_id != b.msg_id
    other = Sequencer("k2", ORIGIN_BROKER)  # (another sender's, or this one's after a restart)
    ids = [seq.new_id() for _ in range(1000)] + [other.new_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids) and a.msg_id not in ids
    assert all(0 < len(i) <= MAX_ID_CHARS for i in ids)
    assert (b.msg_id, b.reply_to, b.origin, b.kernel_id) == ("m", "r", ORIGIN_BROKER, "k1")
    assert abs(a.time - time.time()) < 5


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_decode_random_frames_only_raise_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        decode(frames, KEYS.get)


@settings(max_examples=500)
@given(st.fixed_dictionaries({}, optional=dict.fromkeys(HEADER_FIELDS, json_values)), json_values)
def test_decode_signed_arbitrary_headers(header: dict, body: object) -> None:
    """Past the signature, any content still yields a Message or a ProtocolError."""
    try:
        msg = decode(signed(header, json.dumps(body).encode()), KEYS.get)
    except ProtocolError:
        return
    assert isinstance(msg.seq, int)
    assert isinstance(msg.body, dict)


@given(json_objects)
def test_round_trip_any_body(body: dict) -> None:
    msg = make(body=body)
    assert decode(encode(msg, Signer(KEY)), KEYS.get).body == body


def test_encode_refuses_what_it_cannot_send_exactly() -> None:
    """An integer past 64 bits or an object that is not JSON fails in the sender, never on the
    wire."""
    for body in ({"n": 1 << 64}, {"x": object()}):
        with pytest.raises(TypeError):
            encode(make(body=body), Signer(KEY))


# -- the log of dropped messages -------------------------------------------------------


def test_drop_log_sums_a_flood_up_in_few_lines(caplog) -> None:
    log = logging.getLogger("test.drops")
    drops = DropLog(log, "on the kernel channel", interval=10)
    caplog.set_level(logging.WARNING, "test.drops")
    waits = [drops.note(ProtocolError("wrong magic b'x'")) for _ in range(50_000)]
    waits += [drops.note(ProtocolError("bad signature from 'k1'", "bad signature"))]
    assert waits[0] is None  # the first one is logged at once, with its reason
    assert all(0 < wait <= 10 for wait in waits[1:])  # the rest wait for the summary
    drops.flush()
    drops.flush()  # nothing new: no line
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "dropped message on the kernel channel: wrong magic b'x'"
    assert len(lines) == 2, lines
    assert "dropped messages on the kernel channel: 50000 in" in lines[1]
    assert "(49999 malformed, 1 bad signature); last: bad signature from 'k1'" in lines[1]


def test_drop_log_without_interval_logs_each_drop(caplog) -> None:
    drops = DropLog(logging.getLogger("test.drops"), "from the broker", interval=0)
    caplog.set_level(logging.WARNING, "test.drops")
    for reason in ("one", "two"):
        assert drops.note(ProtocolError(reason)) is None
    assert [r.getMessage() for r in caplog.records] == [
        "dropped message from the broker: one",
        "dropped message from the broker: two",
    ]


# -- numbers kernels report ------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [-8 * GiB, -1, 16 * GiB + 1, True, False, 1.5, 2.0, math.nan, math.inf, "3", [1], {}]
)
def test_count_field_refuses_what_is_not_a_count_in_range(value) -> None:
    with pytest.raises(FieldError, match="field 'gpu_bytes' must be an integer from 0 to"):
        count_field({"gpu_bytes": value}, "gpu_bytes", 16 * GiB)


def test_count_field_bounds_defaults_and_minimum() -> None:
    assert count_field({"n": 0}, "n", 10) == 0
    assert count_field({"n": 10}, "n", 10) == 10
    assert count_field({}, "n", 10, default=None) is None
    assert count_field({"n": None}, "n", 10, default=0) == 0
    with pytest.raises(FieldError, match="missing field 'n'"):
        count_field({}, "n", 10)
    with pytest.raises(FieldError, match="from 1 to"):
        count_field({"pid": 0}, "pid", 10, minimum=1)


def test_other_field_checks() -> None:
    assert seconds_field({"s": 1}, "s") == 1.0 and seconds_field({"s": 0.5}, "s") == 0.5
    for bad in (-0.1, math.nan, math.inf, True, "1", None):
        with pytest.raises(FieldError, match="field 's' must be seconds"):
            seconds_field({"s": bad}, "s")
    assert flag_field({"pinned": False}, "pinned") is False
    for bad in (0, 1, "true", None):
        with pytest.raises(FieldError, match="field 'pinned' must be true or false"):
            flag_field({"pinned": bad}, "pinned")
    assert text_field({"id": "r1"}, "id") == "r1"
    assert text_field({}, "id", default=None) is None
    for bad in ("", "x" * 129, 5, None, ["r1"]):
        with pytest.raises(FieldError, match="field 'id' must be a string of 1 to 128"):
            text_field({"id": bad}, "id")


def test_transfer_field_keeps_only_checked_numbers() -> None:
    assert transfer_field({}) is None
    record = {"kind": "offload", "nbytes": 5, "seconds": 0.25, "gbps": 1.0, "reason": "x" * 99}
    assert transfer_field({"transfer": record}) == {"nbytes": 5, "seconds": 0.25}
    for bad in ({"nbytes": -1, "seconds": 1}, {"nbytes": 1, "seconds": math.inf}, "fast"):
        with pytest.raises(FieldError, match="transfer"):
            transfer_field({"transfer": bad})


def test_error_text_is_cut() -> None:
    assert error_text(ValueError()) == "ValueError"
    long = error_text("x" * 10_000)
    assert len(long) == protocol.MAX_ERROR_CHARS and long.endswith("…")
