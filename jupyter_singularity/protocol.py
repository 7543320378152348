"""Wire format between the broker and the kernels: framing, signing, freshness checks, and the
checks of the numbers kernels report.

Pure functions and small state holders, no I/O (but a logger), so both the asyncio broker and the
threaded kernel client share exactly the same rules for what a valid message is.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import itertools
import logging
import math
import secrets
import struct
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

#: Version tag of the framing below; a peer speaking another one is dropped at once.
MAGIC = b"SNG3"
DEFAULT_MAX_AGE = 60.0
#: How far in the future a message's time may be: both ends share this machine's clock, so
#: only scheduling delays separate them, never a real skew.
MAX_CLOCK_SKEW = 5.0

#: Caps checked before anything of a message is parsed or its key looked up.
MAX_KERNEL_ID_BYTES = 128
MAX_HEADER_BYTES = 1024
SIGNATURE_BYTES = 64  # hex of an HMAC-SHA256
#: Largest frame a kernel may send (the broker's socket cuts off a peer that sends more, before
#: buffering it). Kernels' messages measured at most 532 bytes (an offload reply with its
#: transfer record); error texts are cut to MAX_ERROR_CHARS.
MAX_KERNEL_FRAME_BYTES = 64 * 1024
#: Largest frame a kernel accepts from its broker: replies carry queues and kernel records.
MAX_BROKER_FRAME_BYTES = 16 * 1024 * 1024
#: Error texts travel cut to this length, well inside MAX_KERNEL_FRAME_BYTES.
MAX_ERROR_CHARS = 4000
#: Seconds between two log lines about dropped messages (see DropLog).
DROP_LOG_INTERVAL = 10.0

#: Environment of a kernel process: where its broker listens, who it is, how it signs.
ENV_BROKER_URL = "SINGULARITY_BROKER_URL"
ENV_KERNEL_ID = "SINGULARITY_KERNEL_ID"
ENV_KERNEL_KEY = "SINGULARITY_KERNEL_KEY"
#: ... and whether its devices are simulated.
ENV_SIMULATED = "SINGULARITY_SIMULATED"
#: ... and whether its broker is the node's (a service that may restart while the kernel runs: then
#: the kernel waits for it and joins it again, rather than giving up on it).
ENV_NODE_BROKER = "SINGULARITY_NODE_BROKER"

#: Who produced a message. Both directions are signed with the kernel's key, so the
#: origin is part of the signed header: otherwise a captured broker->kernel message
#: could be reflected back to the broker as if the kernel had sent it.
ORIGIN_KERNEL = "kernel"
ORIGIN_BROKER = "broker"

#: The broker's answer to a signed message it refused for its session (a replayed sequence
#: number, an ended session): ``reply_to`` names the message, which the sender sends again in a
#: fresh session. Never answered itself.
RENEW_SESSION = "renew_session"


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
    session: str = ""
    """The sender's session nonce: its sequence numbers count within it (see ReplayGuard)."""
    peer: Any = None
    """What the OS says of the sending process (broker.identity.PeerCredentials), where the
    receiver's transport tells; never part of the message itself."""


class ProtocolError(Exception):
    """A message was rejected; `reason` says why (for the log), `kind` sums such reasons up."""

    def __init__(self, reason: str, kind: str = "malformed") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class SessionError(ProtocolError):
    """An authentic message refused for its session: a copy, or its sender's counter was pushed
    ahead by someone holding the key. The sender can start a fresh session and send it again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, "session")


class UnknownKernel(ProtocolError):
    """A message naming a kernel the receiver has no key for (yet): it cannot be verified."""

    def __init__(self, kernel_id: str) -> None:
        super().__init__(f"unknown kernel {kernel_id[:64]!r}", "unknown kernel")
        self.kernel_id = kernel_id


#: Each signed part is prefixed with its length (see Signer).
_SIZE = struct.Struct(">Q")
_pack_size = _SIZE.pack


class Signer:
    """HMAC-SHA256 over the message parts, each prefixed with its length.

    The length prefixes make the concatenation unambiguous, so no bytes can be moved from one
    part to the next (from the kernel id into the header, say) under the same signature.
    """

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("an empty key would make every signature forgeable")
        self._keyed = _keyed(key)

    def sign(self, *parts: bytes) -> bytes:
        signed = self._keyed.copy()
        signed.update(b"".join([_pack_size(len(part)) + part for part in parts]))
        return signed.hexdigest().encode("ascii")

    def verify(self, signature: bytes, *parts: bytes) -> bool:
        """Constant-time check, so timing does not leak how much of a forgery matched."""
        return hmac.compare_digest(self.sign(*parts), signature)


@functools.lru_cache(maxsize=4096)
def _keyed(key: bytes) -> hmac.HMAC:
    """An HMAC keyed once per key and copied per message. Not ``hmac.digest``: it lets go of the
    GIL for every message however small, and taking it back waits for whichever thread took it
    meanwhile (up to a switch interval, 5 ms); an update under 2 KiB keeps it."""
    return hmac.new(key, digestmod=hashlib.sha256)


def generate_key() -> bytes:
    """A fresh 256-bit key, hex-encoded so it can travel in an environment variable."""
    return secrets.token_hex(32).encode("ascii")


def _dumps(obj: dict) -> bytes:
    """Compact JSON, by orjson: a message is encoded and decoded on every cell's path, and the
    standard library's encoder took most of a message's cost there. Keys that are not strings are
    written as strings (as the standard library does); a non-finite float goes as ``null`` (only
    this package's own code writes bodies: what a peer sends is parsed strictly)."""
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)


#: A message's parts (see :func:`encode_parts`) travel in one ZeroMQ frame: MAGIC, then each
#: part after its length (4 bytes), but the body, which is the rest. Every frame a thread sends or
#: receives gives the GIL up once, and a busy kernel's other threads (ipykernel's output thread,
#: at the start and end of every cell) then hold it a while: five frames cost ~0.4 ms there.
_LENGTH = struct.Struct(">I")
PARTS = 5


def join_parts(parts: Sequence[bytes]) -> bytes:
    """The frame that carries ``parts`` (MAGIC first; see :func:`split_frame`)."""
    magic, *sized, body = parts
    return b"".join([magic, *(_LENGTH.pack(len(part)) + part for part in sized), body])


def split_frame(frames: Sequence[bytes]) -> list[bytes]:
    """The parts of a message received as ``frames``; ProtocolError unless they are one frame
    that starts with MAGIC and holds every part it announces."""
    if len(frames) != 1:
        raise ProtocolError(f"expected 1 frame, got {len(frames)}")
    frame = frames[0]
    if not isinstance(frame, bytes):
        raise ProtocolError("frames must be bytes")
    if not frame.startswith(MAGIC):
        raise ProtocolError(f"wrong magic {frame[:16]!r}")
    parts, start = [MAGIC], len(MAGIC)
    for _ in range(PARTS - 2):
        if start + _LENGTH.size > len(frame):
            raise ProtocolError(f"truncated frame of {len(frame)} bytes")
        (size,) = _LENGTH.unpack_from(frame, start)
        start += _LENGTH.size
        if start + size > len(frame):
            raise ProtocolError(f"truncated frame of {len(frame)} bytes")
        parts.append(frame[start : start + size])
        start += size
    parts.append(frame[start:])
    return parts


def encode(msg: Message, signer: Signer) -> list[bytes]:
    """The frames of `msg` on the wire: one (see :func:`join_parts`)."""
    return [join_parts(encode_parts(msg, signer))]


def encode_parts(msg: Message, signer: Signer) -> list[bytes]:
    """The parts of `msg`: [MAGIC, kernel_id, signature, header_json, body_json].

    The kernel id travels raw, in a part of its own, so the receiver can pick the key and check
    the signature (over kernel id, header and body) before it parses anything.
    """
    kernel_id = msg.kernel_id.encode("utf-8")
    header = _dumps(
        {
            "type": msg.type,
            "msg_id": msg.msg_id,
            "seq": msg.seq,
            "time": msg.time,
            "reply_to": msg.reply_to,
            "origin": msg.origin,
            "session": msg.session,
        }
    )
    if not 0 < len(kernel_id) <= MAX_KERNEL_ID_BYTES or len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"kernel id or header of {msg.type[:64]!r} exceeds the protocol's caps")
    body = _dumps(msg.body)
    return [MAGIC, kernel_id, signer.sign(kernel_id, header, body), header, body]


def _loads_object(data: bytes, what: str) -> dict:
    try:
        obj = orjson.loads(data)  # strict: UTF-8 only, no NaN or Infinity
    except ValueError as exc:  # orjson.JSONDecodeError, bad UTF-8 and too deep included
        raise ProtocolError(f"malformed JSON in {what}: {exc}", "bad content") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} is not a JSON object", "bad content")
    return obj


def _field(header: dict, name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in header:
        raise ProtocolError(f"missing field {name!r}", "bad content")
    value = header[name]
    # bool is an int subclass; a JSON `true` is never a valid seq or time.
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ProtocolError(f"bad field {name!r}: {value!r:.80}", "bad content")
    return value


def _kernel_id(raw: bytes) -> str:
    if not 0 < len(raw) <= MAX_KERNEL_ID_BYTES:
        raise ProtocolError(f"kernel id of {len(raw)} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"kernel id {raw[:32]!r} is not UTF-8") from None


def decode(frames: Sequence[bytes], key_for: Callable[[str], bytes | None]) -> Message:
    """The message received as `frames` (see :func:`decode_parts`)."""
    return _authenticated(split_frame(frames), key_for)  # (its parts' count, types, magic checked)


def decode_parts(parts: Sequence[bytes], key_for: Callable[[str], bytes | None]) -> Message:
    """Authenticate, then parse a message's `parts`; raise ProtocolError for anything else.

    Nothing is parsed before the signature verified: the parts' count, sizes and magic are
    checked, the raw kernel id selects the key, the HMAC covers kernel id, header and body.
    Only then is JSON read, so a stranger's frame costs one hash at most.
    """
    if len(parts) != PARTS:
        raise ProtocolError(f"expected {PARTS} parts, got {len(parts)}")
    if not all(isinstance(part, bytes) for part in parts):
        raise ProtocolError("frames must be bytes")
    if parts[0] != MAGIC:
        raise ProtocolError(f"wrong magic {parts[0][:16]!r}")
    return _authenticated(parts, key_for)


def _authenticated(parts: Sequence[bytes], key_for: Callable[[str], bytes | None]) -> Message:
    """:func:`decode_parts` once the parts' count, types and magic are checked."""
    _, kernel_id_raw, signature, header_raw, body_raw = parts
    if not signature:
        raise ProtocolError("unsigned message")
    if len(signature) != SIGNATURE_BYTES:
        raise ProtocolError(f"signature of {len(signature)} bytes")
    if len(header_raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"oversized header ({len(header_raw)} bytes)")
    kernel_id = _kernel_id(kernel_id_raw)
    key = key_for(kernel_id)
    if key is None:
        raise UnknownKernel(kernel_id)
    if not Signer(key).verify(signature, kernel_id_raw, header_raw, body_raw):
        raise ProtocolError(f"bad signature from {kernel_id!r}", "bad signature")

    header = _loads_object(header_raw, "header")
    body = _loads_object(body_raw, "body")
    sent_at = float(_field(header, "time", (int, float)))
    if not math.isfinite(sent_at):
        raise ProtocolError(f"bad field 'time': {sent_at!r}", "bad content")
    reply_to = header.get("reply_to")
    if reply_to is not None and not isinstance(reply_to, str):
        raise ProtocolError(f"bad field 'reply_to': {reply_to!r:.80}", "bad content")
    return Message(
        type=_field(header, "type", str),
        body=body,
        kernel_id=kernel_id,
        msg_id=_field(header, "msg_id", str),
        seq=_field(header, "seq", int),
        time=sent_at,
        reply_to=reply_to,
        origin=_field(header, "origin", str),
        session=_field(header, "session", str),
    )


@dataclass
class _Window:
    """One sender's replay window: its current session, the last sequence number seen in it, and
    the sessions it ended (nonce -> when), remembered while their messages could still be fresh."""

    session: str
    last_seq: int
    ended: dict[str, float] = field(default_factory=dict)


class ReplayGuard:
    """Freshness checks for authenticated messages arriving from one direction.

    A valid signature only proves who wrote a message, not that it is new: a captured
    message re-sent verbatim still verifies. Sequence numbers count within a session, a random
    nonce the sender picks: a message with a nonce never seen starts a new session (the old one
    ends for good), later ones must count upwards in it. So a process holding the key that pushes
    the counter ahead (seq 2**62) or takes the session over cannot lock the real sender out: it
    starts a fresh session and goes on. A message of an ended session, or one not above the
    counter, is refused (SessionError). The age limit (and the skew limit, for times in the
    future) bounds how long copies must be remembered.
    """

    #: Ended sessions remembered per sender at most (older ones are stale long before).
    MAX_ENDED = 4096

    def __init__(
        self,
        origin: str,
        max_age: float = DEFAULT_MAX_AGE,
        max_skew: float = MAX_CLOCK_SKEW,
    ) -> None:
        self.origin = origin
        self.max_age = max_age
        self.max_skew = max_skew
        self._windows: dict[str, _Window] = {}

    def check(self, msg: Message) -> None:
        if msg.origin != self.origin:
            raise ProtocolError(
                f"wrong direction: message from {msg.origin!r}, expected {self.origin!r}",
                "wrong direction",
            )
        now = time.time()
        age = now - msg.time
        if age > self.max_age:
            raise ProtocolError(f"stale message from {msg.kernel_id!r}: {age:.1f}s old", "stale")
        if age < -self.max_skew:
            raise ProtocolError(
                f"message from {msg.kernel_id!r} dated {-age:.1f}s in the future", "future"
            )
        window = self._windows.get(msg.kernel_id)
        if window is None:
            self._windows[msg.kernel_id] = _Window(msg.session, msg.seq)
        elif msg.session == window.session:
            if msg.seq <= window.last_seq:
                raise SessionError(
                    f"replayed message from {msg.kernel_id!r}: seq {msg.seq} <= {window.last_seq}"
                )
            window.last_seq = msg.seq
        else:
            self._start_session(window, msg, now)

    def _start_session(self, window: _Window, msg: Message, now: float) -> None:
        horizon = now - self.max_age - self.max_skew
        window.ended = {nonce: at for nonce, at in window.ended.items() if at >= horizon}
        if msg.session in window.ended:
            raise SessionError(f"message of an ended session from {msg.kernel_id!r}")
        window.ended[window.session] = now
        if len(window.ended) > self.MAX_ENDED:
            del window.ended[next(iter(window.ended))]
        window.session, window.last_seq = msg.session, msg.seq

    def forget(self, sender: str) -> None:
        self._windows.pop(sender, None)


class UniqueIds:
    """Ids unique among all of one process's (and all others', with overwhelming likelihood): a
    random prefix drawn once, then a counter. Not ``secrets.token_hex`` per id: it asks the
    system for randomness, which lets go of the interpreter's lock, and a busy kernel's other
    threads (its output thread, at the start and end of every cell) then hold it a while. An id
    guards nothing: every message is signed (see :class:`Signer`)."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._count = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._count)}"


class Sequencer:
    """Makes outgoing messages for one sender identity with strictly increasing seq.

    Each sequencer is a session of its own (a random nonce); :meth:`renew` starts another. The
    sequence starts at the wall clock in nanoseconds, so it keeps rising across sessions and
    restarts of the sender.
    """

    def __init__(self, kernel_id: str, origin: str) -> None:
        self.kernel_id = kernel_id
        self.origin = origin
        self.session = secrets.token_hex(16)
        self._seq = time.time_ns()
        self._ids = UniqueIds()

    def renew(self) -> None:
        """Start a fresh session: the receiver opens a new replay window at its first message."""
        self.session = secrets.token_hex(16)

    def new_id(self) -> str:
        """An id for a message of this sender, unique among all it sends."""
        return self._ids.next()

    def make(
        self,
        type: str,
        body: dict,
        reply_to: str | None = None,
        msg_id: str | None = None,
    ) -> Message:
        """Next message; pass `msg_id` (of :meth:`new_id`) when the caller must know it before
        sending."""
        self._seq += 1
        return Message(
            type=type,
            body=body,
            kernel_id=self.kernel_id,
            msg_id=msg_id or self._ids.next(),
            seq=self._seq,
            time=time.time(),
            reply_to=reply_to,
            origin=self.origin,
            session=self.session,
        )


class DropLog:
    """The log of dropped messages, rate-limited: one line per ``interval`` at most.

    A flood of junk then costs a counter increment per frame instead of a log line (a flood of
    10 s once wrote 344,664 warnings). The first drop after a quiet interval is logged at once
    with its reason; later ones are summed up by kind in the next line.
    """

    def __init__(
        self, log: logging.Logger, where: str, interval: float = DROP_LOG_INTERVAL
    ) -> None:
        self.log = log
        self.where = where
        self.interval = interval
        self._counts: Counter[str] = Counter()
        self._last_reason = ""
        self._logged_at = -math.inf
        self._since = 0.0

    def note(self, error: ProtocolError) -> float | None:
        """Count a drop; returns the seconds until :meth:`flush` is due when it held it back."""
        now = time.monotonic()
        if not self._counts:
            self._since = now
        self._counts[error.kind] += 1
        self._last_reason = error.reason
        wait = self._logged_at + self.interval - now
        if wait <= 0:
            self.flush()
            return None
        return wait

    def flush(self) -> None:
        """Log what was counted since the last line, if anything."""
        if not self._counts:
            return
        total = sum(self._counts.values())
        if total == 1:
            self.log.warning("dropped message %s: %s", self.where, self._last_reason)
        else:
            kinds = ", ".join(f"{n} {kind}" for kind, n in self._counts.most_common())
            self.log.warning(
                "dropped messages %s: %d in %.0f s (%s); last: %s",
                self.where,
                total,
                max(time.monotonic() - self._since, 1.0),
                kinds,
                self._last_reason,
            )
        self._counts.clear()
        self._logged_at = time.monotonic()


# -------------------------------------------------------------- numbers in kernels' messages

#: Bounds of what a kernel may report besides GPU bytes (those are bounded by the device).
MAX_STORED_BYTES = 1 << 50  # host or disk bytes of one kernel: 1 PiB, more than any machine has
MAX_SECONDS = 7 * 86400.0  # one transfer's duration
MAX_PID = 2**31 - 1  # pid_t
MAX_ID_CHARS = 128  # request ids, GPU UUIDs

#: The ``default`` of a field that must be present.
REQUIRED: Any = object()


class FieldError(ValueError):
    """A field of a kernel's message is missing or out of its range; the message names it."""


def _shown(value: Any) -> str:
    return f"{value!r:.60}"


def count_field(
    body: Mapping[str, Any],
    name: str,
    limit: int,
    *,
    minimum: int = 0,
    default: Any = REQUIRED,
) -> Any:
    """An integer from ``minimum`` to ``limit`` (a JSON ``true`` or ``1.5`` is not one); absent or
    null gives ``default``, or FieldError when the field is required."""
    value = body.get(name)
    if value is None:
        if default is REQUIRED:
            raise FieldError(f"missing field {name!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= limit:
        raise FieldError(
            f"field {name!r} must be an integer from {minimum} to {limit}, not {_shown(value)}"
        )
    return value


def seconds_field(body: Mapping[str, Any], name: str, limit: float = MAX_SECONDS) -> float:
    """A finite number of seconds from 0 to ``limit``."""
    value = body.get(name)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= limit  # NaN fails too
    ):
        raise FieldError(f"field {name!r} must be seconds from 0 to {limit:g}, not {_shown(value)}")
    return float(value)


def flag_field(body: Mapping[str, Any], name: str) -> bool:
    """A JSON boolean (``1`` or ``"yes"`` is not one)."""
    value = body.get(name)
    if not isinstance(value, bool):
        raise FieldError(f"field {name!r} must be true or false, not {_shown(value)}")
    return value


def text_field(
    body: Mapping[str, Any], name: str, limit: int = MAX_ID_CHARS, *, default: Any = REQUIRED
) -> Any:
    """A non-empty string of at most ``limit`` characters; absent or null gives ``default``."""
    value = body.get(name)
    if value is None and default is not REQUIRED:
        return default
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise FieldError(
            f"field {name!r} must be a string of 1 to {limit} characters, not {_shown(value)}"
        )
    return value


def transfer_field(body: Mapping[str, Any]) -> dict | None:
    """The ``transfer`` a kernel reports with a move of its state, reduced to what the broker
    records (``nbytes``, ``seconds``); None when absent."""
    transfer = body.get("transfer")
    if transfer is None:
        return None
    if not isinstance(transfer, dict):
        raise FieldError(f"field 'transfer' must be an object, not {_shown(transfer)}")
    try:
        return {
            "nbytes": count_field(transfer, "nbytes", MAX_STORED_BYTES),
            "seconds": seconds_field(transfer, "seconds"),
        }
    except FieldError as err:
        raise FieldError(f"transfer: {err}") from None


def error_text(error: object) -> str:
    """An error's text as it travels: cut to MAX_ERROR_CHARS, never empty."""
    text = str(error) or type(error).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"
