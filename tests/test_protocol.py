"""Wire format, signatures and freshness rules of the broker <-> kernel protocol."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jupyter_singularity.protocol import (
    MAGIC,
    ORIGIN_BROKER,
    ORIGIN_KERNEL,
    Message,
    ProtocolError,
    ReplayGuard,
    Sequencer,
    Signer,
    decode,
    encode,
    generate_key,
)

KEY = generate_key()
KEYS = {"k1": KEY}
HEADER_FIELDS = ("type", "msg_id", "seq", "time", "reply_to", "origin")


def json_trees(floats: st.SearchStrategy[float]) -> st.SearchStrategy[object]:
    return st.recursive(
        st.none() | st.booleans() | st.integers() | floats | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=12,
    )


# Anything json.loads accepts, NaN and Infinity included.
json_values = json_trees(st.floats())
# What encode() can send: JSON proper.
json_objects = st.dictionaries(
    st.text(max_size=8), json_trees(st.floats(allow_nan=False, allow_infinity=False)), max_size=6
)


def make(type: str = "echo", body: dict | None = None, **changes: object) -> Message:
    msg = Sequencer("k1", ORIGIN_KERNEL).make(type, {"x": 1} if body is None else body)
    for name, value in changes.items():
        setattr(msg, name, value)
    return msg


def signed(header: dict, body: bytes = b"{}") -> list[bytes]:
    """Frames with a valid signature over arbitrary header content."""
    header_raw = json.dumps(header).encode()
    return [MAGIC, Signer(KEY).sign(header_raw, body), header_raw, body]


def test_encode_decode_round_trip() -> None:
    msg = make(body={"n": [1, 2.5, None], "s": "ü"}, reply_to="abc")
    assert decode(encode(msg, Signer(KEY)), KEYS.get) == msg


def test_signer_verifies_only_its_own_signatures() -> None:
    signature = Signer(KEY).sign(b"a", b"b")
    assert Signer(KEY).verify(signature, b"a", b"b")
    assert not Signer(KEY).verify(signature, b"a", b"c")
    assert not Signer(generate_key()).verify(signature, b"a", b"b")
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
        (lambda f: f[:3], "expected 4 frames"),
        (lambda f: [*f, b"extra"], "expected 4 frames"),
        (lambda f: [b"SNG0", *f[1:]], "wrong magic"),
        (lambda f: [f[0], b"", *f[2:]], "unsigned"),
        (lambda f: [f[0], b"0" * 64, *f[2:]], "bad signature"),
        (lambda f: [*f[:3], b'{"x":2}'], "bad signature"),
        (lambda f: [*f[:2], f[2].replace(b'"echo"', b'"evil"'), f[3]], "bad signature"),
        (lambda f: [*f[:2], b"{oops", f[3]], "malformed JSON in header"),
        (lambda f: [*f[:2], b"\xff\xfe", f[3]], "malformed JSON in header"),
        (lambda f: [*f[:2], b"[" * 100_000, f[3]], "malformed JSON in header"),
        (lambda f: [*f[:2], b"[]", f[3]], "header is not a JSON object"),
        (lambda f: [f[0], f[1], "text", f[3]], "frames must be bytes"),
    ],
)
def test_decode_rejects_broken_frames(mangle, reason: str) -> None:
    frames = mangle(encode(make(), Signer(KEY)))
    with pytest.raises(ProtocolError, match=reason):
        decode(frames, KEYS.get)


def test_decode_rejects_wrong_key_and_unknown_kernel() -> None:
    forged = encode(make(), Signer(generate_key()))
    with pytest.raises(ProtocolError, match="bad signature"):
        decode(forged, KEYS.get)
    stranger = encode(make(kernel_id="k2"), Signer(KEY))
    with pytest.raises(ProtocolError, match="unknown kernel 'k2'"):
        decode(stranger, KEYS.get)


def test_decode_validates_signed_content() -> None:
    good = json.loads(encode(make(), Signer(KEY))[2])
    with pytest.raises(ProtocolError, match="malformed JSON in body"):
        decode(signed(good, b"{nope"), KEYS.get)
    with pytest.raises(ProtocolError, match="body is not a JSON object"):
        decode(signed(good, b"[1]"), KEYS.get)
    with pytest.raises(ProtocolError, match="missing field 'msg_id'"):
        decode(signed({k: v for k, v in good.items() if k != "msg_id"}), KEYS.get)
    for name, value in [("seq", True), ("seq", "1"), ("time", float("nan")), ("reply_to", 3)]:
        with pytest.raises(ProtocolError, match=f"bad field '{name}'"):
            decode(signed({**good, name: value}), KEYS.get)


def test_replay_guard_rejects_repeats_per_sender() -> None:
    guard = ReplayGuard(ORIGIN_KERNEL)
    first, second = make(seq=5), make(seq=6)
    guard.check(first)
    guard.check(second)
    with pytest.raises(ProtocolError, match="replayed message from 'k1': seq 5 <= 6"):
        guard.check(first)
    with pytest.raises(ProtocolError, match="replayed"):
        guard.check(second)
    guard.check(make(kernel_id="k2", seq=1))  # other senders have their own counter
    guard.forget("k1")
    guard.check(first)


def test_replay_guard_checks_direction_and_age() -> None:
    guard = ReplayGuard(ORIGIN_KERNEL, max_age=60)
    with pytest.raises(ProtocolError, match="wrong direction"):
        guard.check(make(origin=ORIGIN_BROKER))
    with pytest.raises(ProtocolError, match="stale message"):
        guard.check(make(time=time.time() - 61))
    guard.check(make(time=time.time() - 59))


def test_sequencer_is_strictly_increasing_across_restarts() -> None:
    before = Sequencer("k1", ORIGIN_KERNEL)
    seqs = [before.make("t", {}).seq for _ in range(100)]
    assert seqs == sorted(set(seqs))
    restarted = Sequencer("k1", ORIGIN_KERNEL)
    assert restarted.make("t", {}).seq > seqs[-1]


def test_sequencer_messages() -> None:
    seq = Sequencer("k1", ORIGIN_BROKER)
    a, b = seq.make("ping", {}), seq.make("offload", {"n": 1}, reply_to="r", msg_id="m")
    assert len(a.msg_id) == 32
    assert a.msg_id != b.msg_id
    assert (b.msg_id, b.reply_to, b.origin, b.kernel_id) == ("m", "r", ORIGIN_BROKER, "k1")
    assert abs(a.time - time.time()) < 5


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_decode_random_frames_only_raise_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        decode(frames, KEYS.get)


@settings(max_examples=500)
@given(
    st.fixed_dictionaries(
        {"kernel_id": st.just("k1")}, optional=dict.fromkeys(HEADER_FIELDS, json_values)
    ),
    json_values,
)
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
