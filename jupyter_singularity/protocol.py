"""Wire format between the broker and the kernels: framing, signing, freshness checks.

Pure functions and small state holders, no I/O, so both the asyncio broker and the
threaded kernel client share exactly the same rules for what a valid message is.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

MAGIC = b"SNG1"
DEFAULT_MAX_AGE = 60.0

#: Environment of a kernel process: where its broker listens, who it is, how it signs.
ENV_BROKER_URL = "SINGULARITY_BROKER_URL"
ENV_KERNEL_ID = "SINGULARITY_KERNEL_ID"
ENV_KERNEL_KEY = "SINGULARITY_KERNEL_KEY"
#: ... and whether its devices are simulated.
ENV_SIMULATED = "SINGULARITY_SIMULATED"

#: Who produced a message. Both directions are signed with the kernel's key, so the
#: origin is part of the signed header: otherwise a captured broker->kernel message
#: could be reflected back to the broker as if the kernel had sent it.
ORIGIN_KERNEL = "kernel"
ORIGIN_BROKER = "broker"


@dataclass
class Message:
    """One decoded (or to-be-encoded) protocol message."""

    type: str
    body: dict
    kernel_id: str
    msg_id: str
    seq: int
    time: float
    reply_to: str | None = None
    origin: str = ORIGIN_KERNEL


class ProtocolError(Exception):
    """A message was rejected; `reason` says why, for the log line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Signer:
    """HMAC-SHA256 over the message parts, as Jupyter signs its messages.

    The parts are fed in sequence without separators; that is unambiguous because each
    part is a JSON object, whose end is determined by its own content.
    """

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("an empty key would make every signature forgeable")
        self._key = key

    def sign(self, *parts: bytes) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(part)
        return mac.hexdigest().encode("ascii")

    def verify(self, signature: bytes, *parts: bytes) -> bool:
        """Constant-time check, so timing does not leak how much of a forgery matched."""
        return hmac.compare_digest(self.sign(*parts), signature)


def generate_key() -> bytes:
    """A fresh 256-bit key, hex-encoded so it can travel in an environment variable."""
    return secrets.token_hex(32).encode("ascii")


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def encode(msg: Message, signer: Signer) -> list[bytes]:
    """Frames for `msg`: [MAGIC, signature, header_json, body_json]."""
    header = _dumps(
        {
            "type": msg.type,
            "kernel_id": msg.kernel_id,
            "msg_id": msg.msg_id,
            "seq": msg.seq,
            "time": msg.time,
            "reply_to": msg.reply_to,
            "origin": msg.origin,
        }
    )
    body = _dumps(msg.body)
    return [MAGIC, signer.sign(header, body), header, body]


def _loads_object(data: bytes, what: str) -> dict:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"malformed JSON in {what}: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return obj


def _field(header: dict, name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in header:
        raise ProtocolError(f"missing field {name!r}")
    value = header[name]
    # bool is an int subclass; a JSON `true` is never a valid seq or time.
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ProtocolError(f"bad field {name!r}: {value!r}")
    return value


def decode(frames: Sequence[bytes], key_for: Callable[[str], bytes | None]) -> Message:
    """Parse and authenticate `frames`; raise ProtocolError for anything else.

    Only the header's kernel_id is read before the signature is checked (it selects the
    key); every other field is validated after the signature proved who wrote it.
    """
    if len(frames) != 4:
        raise ProtocolError(f"expected 4 frames, got {len(frames)}")
    if not all(isinstance(frame, bytes) for frame in frames):
        raise ProtocolError("frames must be bytes")
    magic, signature, header_raw, body_raw = frames
    if magic != MAGIC:
        raise ProtocolError(f"wrong magic {magic[:16]!r}")
    if not signature:
        raise ProtocolError("unsigned message")
    header = _loads_object(header_raw, "header")
    kernel_id = _field(header, "kernel_id", str)
    key = key_for(kernel_id)
    if key is None:
        raise ProtocolError(f"unknown kernel {kernel_id[:64]!r}")
    if not Signer(key).verify(signature, header_raw, body_raw):
        raise ProtocolError(f"bad signature from {kernel_id!r}")

    body = _loads_object(body_raw, "body")
    sent_at = float(_field(header, "time", (int, float)))
    if not math.isfinite(sent_at):
        raise ProtocolError(f"bad field 'time': {sent_at!r}")
    reply_to = header.get("reply_to")
    if reply_to is not None and not isinstance(reply_to, str):
        raise ProtocolError(f"bad field 'reply_to': {reply_to!r}")
    return Message(
        type=_field(header, "type", str),
        body=body,
        kernel_id=kernel_id,
        msg_id=_field(header, "msg_id", str),
        seq=_field(header, "seq", int),
        time=sent_at,
        reply_to=reply_to,
        origin=_field(header, "origin", str),
    )


class ReplayGuard:
    """Freshness checks for authenticated messages arriving from one direction.

    A valid signature only proves who wrote a message, not that it is new: a captured
    message re-sent verbatim still verifies. Per-sender sequence numbers reject such
    copies; the age limit bounds the window after a sender's state was forgotten.
    """

    def __init__(self, origin: str, max_age: float = DEFAULT_MAX_AGE) -> None:
        self.origin = origin
        self.max_age = max_age
        self._last_seq: dict[str, int] = {}

    def check(self, msg: Message) -> None:
        if msg.origin != self.origin:
            raise ProtocolError(
                f"wrong direction: message from {msg.origin!r}, expected {self.origin!r}"
            )
        age = time.time() - msg.time
        if age > self.max_age:
            raise ProtocolError(f"stale message from {msg.kernel_id!r}: {age:.1f}s old")
        last = self._last_seq.get(msg.kernel_id)
        if last is not None and msg.seq <= last:
            raise ProtocolError(f"replayed message from {msg.kernel_id!r}: seq {msg.seq} <= {last}")
        self._last_seq[msg.kernel_id] = msg.seq

    def forget(self, sender: str) -> None:
        self._last_seq.pop(sender, None)


class Sequencer:
    """Makes outgoing messages for one sender identity with strictly increasing seq.

    The sequence starts at the wall clock in nanoseconds, so a restarted sender (same
    kernel id, fresh process) continues above whatever the receiver last saw instead of
    having its first messages rejected as replays.
    """

    def __init__(self, kernel_id: str, origin: str) -> None:
        self.kernel_id = kernel_id
        self.origin = origin
        self._seq = time.time_ns()

    def make(
        self,
        type: str,
        body: dict,
        reply_to: str | None = None,
        msg_id: str | None = None,
    ) -> Message:
        """Next message; pass `msg_id` when the caller must know it before sending."""
        self._seq += 1
        return Message(
            type=type,
            body=body,
            kernel_id=self.kernel_id,
            msg_id=msg_id or uuid.uuid4().hex,
            seq=self._seq,
            time=time.time(),
            reply_to=reply_to,
            origin=self.origin,
        )
