"""The control channel's length-prefixed JSON codec (SPEC §3.1), sans-IO.

A frame is a 4-byte big-endian payload length followed by that many bytes of
UTF-8 JSON holding one object with a string ``"type"``. ``encode`` turns a
message into a frame; ``FrameDecoder`` turns bytes, in whatever pieces the
socket delivers them, into messages. Neither touches a socket, so the session
code owns every read, write and close.
"""

from __future__ import annotations

import json
import reprlib

MAX_FRAME = 1 << 20  # payload bytes, header excluded
HEADER_SIZE = 4


class FrameError(Exception):
    """A frame that cannot be sent or was received broken; ``code`` is stable.

    Codes: ``frame_invalid`` (encode: not a message), ``frame_too_large``,
    ``frame_invalid_json``, ``frame_not_object``. ``messages`` holds the
    complete messages that preceded the bad frame in the same ``feed()``.
    """

    def __init__(self, code: str, message: str, messages: list[dict] | None = None):
        self.code = code
        self.message = message
        self.messages = messages if messages is not None else []
        super().__init__(f"{code}: {message}")


def _too_large(size: int) -> FrameError:
    return FrameError("frame_too_large", f"frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")


def _refuse_constant(name: str):
    # json.loads accepts NaN and Infinity by default; they are not JSON
    raise ValueError(f"{name} is not valid JSON")


_REPR = reprlib.Repr()
_REPR.maxlevel = 3  # a peer's value may nest ~1000 deep: plain repr() would hit the recursion limit
_REPR.maxstring = _REPR.maxother = 60


def short_repr(value, limit: int = 60) -> str:
    """A peer-supplied value for an error message or log line: bounded in depth and length."""
    text = _REPR.repr(value) if isinstance(value, (list, dict, tuple, set)) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe(value) -> str:
    return short_repr(value)


def _json_kind(value) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if value is None:
        return "null"
    return type(value).__name__


def encode(msg: dict) -> bytes:
    """One message -> one frame: 4-byte big-endian length + compact UTF-8 JSON."""
    if not isinstance(msg, dict):
        raise FrameError("frame_invalid", f"a message must be a dict, got {type(msg).__name__}")
    kind = msg.get("type")
    if not isinstance(kind, str):
        raise FrameError("frame_invalid", f"a message needs a string \"type\", got {_describe(kind)}")
    try:
        payload = json.dumps(msg, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        # ValueError covers NaN/Infinity and circular references; UnicodeEncodeError
        # (a lone surrogate in a string) is a ValueError too
        raise FrameError("frame_invalid", f"{kind} message is not JSON-serialisable: {exc}") from None
    if len(payload) > MAX_FRAME:
        raise _too_large(len(payload))
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


def decode_payload(payload: bytes | bytearray) -> dict:
    """One frame's payload -> one message; raises ``FrameError`` like the decoder does."""
    try:
        text = payload.decode("utf-8")  # strict: json.loads(bytes) would also take UTF-16/32
    except UnicodeDecodeError as exc:
        raise FrameError("frame_invalid_json",
                         f"frame of {len(payload)} bytes is not UTF-8 (byte {exc.start})") from None
    try:
        msg = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise FrameError("frame_invalid_json", f"frame of {len(payload)} bytes is not JSON: {exc}") from None
    except RecursionError:
        raise FrameError("frame_invalid_json",
                         f"frame of {len(payload)} bytes nests JSON too deeply to parse") from None
    if not isinstance(msg, dict):
        raise FrameError("frame_not_object", f"frame holds {_json_kind(msg)}, not a JSON object")
    if not isinstance(msg.get("type"), str):
        if "type" not in msg:
            raise FrameError("frame_not_object", "frame object has no \"type\" field")
        raise FrameError("frame_not_object",
                         f"frame object's \"type\" must be a string, got {_describe(msg['type'])}")
    return msg


class FrameDecoder:
    """Bytes in, messages out. Poisoned by the first bad frame: the channel must close."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held: an incomplete header or frame waiting for the rest."""
        return len(self._buf)

    @property
    def error(self) -> FrameError | None:
        """The error that poisoned this decoder, if any."""
        return self._error

    def feed(self, data: bytes) -> list[dict]:
        """Append ``data``; return every message it completes, in order."""
        if self._error is not None:
            raise FrameError(self._error.code, self._error.message)
        buf = self._buf
        buf += data
        messages: list[dict] = []
        offset = 0
        end = len(buf)
        try:
            while end - offset >= HEADER_SIZE:
                size = int.from_bytes(buf[offset:offset + HEADER_SIZE], "big")
                if size > MAX_FRAME:
                    # refuse on the header alone, before holding any of the payload
                    raise _too_large(size)
                start = offset + HEADER_SIZE
                if end - start < size:
                    break
                messages.append(decode_payload(buf[start:start + size]))
                offset = start + size
        except FrameError as exc:
            exc.messages = messages
            self._error = exc
            self._buf = bytearray()
            raise
        # one move per feed, of at most one partial frame: linear in bytes fed
        if offset:
            del buf[:offset]
        return messages
