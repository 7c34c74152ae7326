"""The control channel codec (SPEC §3.1): bytes in any pieces -> the same messages, bad frames refused."""

from __future__ import annotations

import json
import random
import struct

import pytest

from portunus.control.frames import (
    HEADER_SIZE,
    MAX_FRAME,
    FrameDecoder,
    FrameError,
    decode_payload,
    encode,
)


def raw_frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def padded(size: int) -> dict:
    """A message whose compact JSON payload is exactly ``size`` bytes."""
    base = len(b'{"type":"x","pad":""}')
    return {"type": "x", "pad": "a" * (size - base)}


def decode_all(chunks) -> list[dict]:
    dec = FrameDecoder()
    out = []
    for chunk in chunks:
        out.extend(dec.feed(chunk))
    assert dec.buffered == 0
    return out


def refused(code: str, data: bytes) -> FrameError:
    dec = FrameDecoder()
    with pytest.raises(FrameError) as ei:
        dec.feed(data)
    assert ei.value.code == code, ei.value.message
    return ei.value


SAMPLES = [
    {"type": "ping", "nonce": 1},
    {"type": "hello", "token": "t" * 64, "protocol_version": 1, "client_version": "0.1.0",
     "capabilities": ["udp", "sni"]},
    {"type": "rule_update", "action": "push", "rule_id": "r1", "request_id": None,
     "rule": {"rule_id": "r1", "targets": [{"host": "10.0.0.5", "port": 80}], "prefer_ipv6": False}},
    {"type": "error", "code": "token_revoked", "message": "Zugang widerrufen — ümlaut ✓ 🚪"},
    {"type": "stats_report", "rules": [], "at": 1700000000.25},
    {"type": "x"},
]


# ---------------------------------------------------------------- constants and encode

def test_limit_is_one_mebibyte():
    assert MAX_FRAME == 1048576
    assert HEADER_SIZE == 4


def test_encode_is_big_endian_length_then_compact_utf8_json():
    frame = encode({"type": "ping", "nonce": 7})
    assert frame == b"\x00\x00\x00\x19" + b'{"type":"ping","nonce":7}'


def test_encode_keeps_non_ascii_as_utf8():
    frame = encode({"type": "error", "message": "ü✓"})
    payload = frame[4:]
    assert "ü✓".encode("utf-8") in payload
    assert b"\\u" not in payload
    assert int.from_bytes(frame[:4], "big") == len(payload)


@pytest.mark.parametrize("msg", SAMPLES)
def test_encode_payload_is_the_json_of_the_message(msg):
    frame = encode(msg)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert json.loads(frame[4:].decode("utf-8")) == msg


@pytest.mark.parametrize("msg,fragment", [
    (["type", "ping"], "list"),
    ("ping", "str"),
    (None, "NoneType"),
    ({}, "None"),
    ({"nonce": 1}, "None"),
    ({"type": 1}, "1"),
    ({"type": None}, "None"),
    ({"type": b"ping"}, "b'ping'"),
])
def test_encode_refuses_what_is_not_a_message(msg, fragment):
    with pytest.raises(FrameError) as ei:
        encode(msg)
    assert ei.value.code == "frame_invalid"
    assert fragment in ei.value.message


@pytest.mark.parametrize("msg", [
    {"type": "x", "v": float("nan")},
    {"type": "x", "v": float("inf")},
    {"type": "x", "v": object()},
    {"type": "x", "v": b"bytes"},
    {"type": "x", "v": {1, 2}},
    {"type": "x", "v": "\ud800"},  # lone surrogate: not encodable as UTF-8
])
def test_encode_refuses_what_json_cannot_carry(msg):
    with pytest.raises(FrameError) as ei:
        encode(msg)
    assert ei.value.code == "frame_invalid"
    assert ei.value.message.startswith("x message")


def test_encode_refuses_circular_message():
    msg = {"type": "x"}
    msg["self"] = msg
    with pytest.raises(FrameError) as ei:
        encode(msg)
    assert ei.value.code == "frame_invalid"


def test_encode_accepts_payload_of_exactly_the_limit():
    frame = encode(padded(MAX_FRAME))
    assert len(frame) == MAX_FRAME + 4
    assert frame[:4] == b"\x00\x10\x00\x00"


def test_encode_refuses_payload_one_byte_over_the_limit():
    with pytest.raises(FrameError) as ei:
        encode(padded(MAX_FRAME + 1))
    assert ei.value.code == "frame_too_large"
    assert ei.value.message == "frame of 1048577 bytes exceeds the 1048576-byte limit"


def test_encode_counts_utf8_bytes_not_characters():
    # 3 bytes per "✓": fits in characters, not in bytes
    msg = {"type": "x", "pad": "✓" * (MAX_FRAME // 3)}
    with pytest.raises(FrameError) as ei:
        encode(msg)
    assert ei.value.code == "frame_too_large"


def test_frame_error_carries_code_and_message():
    err = FrameError("frame_too_large", "frame of 2000000 bytes exceeds the 1048576-byte limit")
    assert isinstance(err, Exception)
    assert err.code == "frame_too_large"
    assert err.message == "frame of 2000000 bytes exceeds the 1048576-byte limit"
    assert str(err) == "frame_too_large: frame of 2000000 bytes exceeds the 1048576-byte limit"
    assert err.messages == []


# ---------------------------------------------------------------- decoding whole frames

@pytest.mark.parametrize("msg", SAMPLES)
def test_round_trip_in_one_feed(msg):
    dec = FrameDecoder()
    assert dec.feed(encode(msg)) == [msg]
    assert dec.buffered == 0


def test_empty_feed_returns_nothing():
    dec = FrameDecoder()
    assert dec.feed(b"") == []
    assert dec.buffered == 0


def test_accepts_bytearray_and_memoryview():
    frame = encode(SAMPLES[1])
    dec = FrameDecoder()
    assert dec.feed(bytearray(frame[:10])) == []
    assert dec.feed(memoryview(frame)[10:]) == [SAMPLES[1]]


def test_many_frames_in_one_feed_come_out_in_order():
    msgs = [{"type": "ping", "nonce": i} for i in range(5000)]
    dec = FrameDecoder()
    assert dec.feed(b"".join(encode(m) for m in msgs)) == msgs
    assert dec.buffered == 0


def test_all_samples_merged_in_one_feed():
    assert decode_all([b"".join(encode(m) for m in SAMPLES)]) == SAMPLES


def test_byte_by_byte():
    stream = b"".join(encode(m) for m in SAMPLES)
    dec = FrameDecoder()
    out = []
    for i in range(len(stream)):
        got = dec.feed(stream[i:i + 1])
        out.extend(got)
        if not got:
            assert dec.buffered > 0
    assert out == SAMPLES
    assert dec.buffered == 0


def test_each_message_appears_exactly_when_its_last_byte_arrives():
    frames = [encode(m) for m in SAMPLES]
    ends = set()
    pos = 0
    for f in frames:
        pos += len(f)
        ends.add(pos)
    stream = b"".join(frames)
    dec = FrameDecoder()
    for i in range(len(stream)):
        got = dec.feed(stream[i:i + 1])
        assert (len(got) == 1) == (i + 1 in ends)


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_length_prefix_split_across_feeds(cut):
    frame = encode(SAMPLES[1])
    dec = FrameDecoder()
    assert dec.feed(frame[:cut]) == []
    assert dec.buffered == cut
    assert dec.feed(frame[cut:]) == [SAMPLES[1]]
    assert dec.buffered == 0


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_header_split_after_a_complete_frame(cut):
    first, second = encode(SAMPLES[0]), encode(SAMPLES[2])
    dec = FrameDecoder()
    assert dec.feed(first + second[:cut]) == [SAMPLES[0]]
    assert dec.buffered == cut
    assert dec.feed(second[cut:]) == [SAMPLES[2]]


def test_tail_of_one_frame_and_head_of_the_next():
    a, b, c = (encode(m) for m in SAMPLES[:3])
    dec = FrameDecoder()
    assert dec.feed(a[:5]) == []
    assert dec.feed(a[5:] + b + c[:7]) == [SAMPLES[0], SAMPLES[1]]
    assert dec.buffered == 7
    assert dec.feed(c[7:]) == [SAMPLES[2]]
    assert dec.buffered == 0


def test_every_two_way_split_of_a_stream():
    stream = b"".join(encode(m) for m in SAMPLES[:4])
    for cut in range(len(stream) + 1):
        assert decode_all([stream[:cut], stream[cut:]]) == SAMPLES[:4], cut


def _random_message(rng: random.Random, i: int) -> dict:
    alphabet = "abcxyz019 \"\\/\n\tüß✓日本🚪"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 300)))
    return {
        "type": rng.choice(["ping", "pong", "rule_status", "stats_report", "x"]),
        "seq": i,
        "text": text,
        "nums": [rng.randrange(-10**12, 10**12) for _ in range(rng.randrange(0, 5))],
        "f": rng.random(),
        "nested": {"ok": rng.random() < 0.5, "none": None},
    }


@pytest.mark.parametrize("seed", range(20))
def test_random_split_points(seed):
    rng = random.Random(seed)
    msgs = [_random_message(rng, i) for i in range(rng.randrange(1, 60))]
    stream = b"".join(encode(m) for m in msgs)
    cuts = sorted(rng.sample(range(1, len(stream)), k=min(len(stream) - 1, rng.randrange(1, 80))))
    chunks = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    assert b"".join(chunks) == stream
    assert decode_all(chunks) == msgs


@pytest.mark.parametrize("seed", range(5))
def test_random_chunk_sizes_with_empty_feeds(seed):
    rng = random.Random(1000 + seed)
    msgs = [_random_message(rng, i) for i in range(40)]
    stream = b"".join(encode(m) for m in msgs)
    chunks, pos = [], 0
    while pos < len(stream):
        n = rng.choice([0, 1, 2, 3, 4, 5, 17, 100, 1000, 5000])
        chunks.append(stream[pos:pos + n])
        pos += n
    assert decode_all(chunks) == msgs


def test_buffered_counts_bytes_held():
    frame = encode(SAMPLES[2])
    dec = FrameDecoder()
    dec.feed(frame[:3])
    assert dec.buffered == 3
    dec.feed(frame[3:20])
    assert dec.buffered == 20
    dec.feed(frame[20:] + frame[:9])
    assert dec.buffered == 9


def test_zero_length_frame_is_not_json():
    err = refused("frame_invalid_json", b"\x00\x00\x00\x00")
    assert "0 bytes" in err.message


# ---------------------------------------------------------------- the size limit

def test_payload_of_exactly_the_limit_decodes():
    msg = padded(MAX_FRAME)
    frame = encode(msg)
    assert int.from_bytes(frame[:4], "big") == MAX_FRAME
    dec = FrameDecoder()
    got = []
    for i in range(0, len(frame), 65536):
        got.extend(dec.feed(frame[i:i + 65536]))
    assert got == [msg]
    assert dec.buffered == 0


def test_payload_one_over_the_limit_is_refused_from_the_header_alone():
    dec = FrameDecoder()
    with pytest.raises(FrameError) as ei:
        dec.feed(struct.pack(">I", MAX_FRAME + 1))
    assert ei.value.code == "frame_too_large"
    assert ei.value.message == "frame of 1048577 bytes exceeds the 1048576-byte limit"
    assert dec.buffered == 0


def test_oversized_frame_message_names_its_size():
    err = refused("frame_too_large", struct.pack(">I", 2000000))
    assert err.message == "frame of 2000000 bytes exceeds the 1048576-byte limit"


def test_largest_declared_length_is_refused():
    err = refused("frame_too_large", b"\xff\xff\xff\xff")
    assert "4294967295" in err.message


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_oversized_header_split_across_feeds_is_refused_when_complete(cut):
    header = struct.pack(">I", MAX_FRAME + 1)
    dec = FrameDecoder()
    assert dec.feed(header[:cut]) == []
    with pytest.raises(FrameError) as ei:
        dec.feed(header[cut:])
    assert ei.value.code == "frame_too_large"


def test_oversized_frame_is_refused_without_waiting_for_its_payload():
    # the header and a sliver of payload: refused at once, nothing held
    dec = FrameDecoder()
    with pytest.raises(FrameError):
        dec.feed(struct.pack(">I", 5 * MAX_FRAME) + b'{"type":"x"')
    assert dec.buffered == 0


def test_oversized_frame_after_good_frames_in_one_feed():
    good = [SAMPLES[0], SAMPLES[1]]
    dec = FrameDecoder()
    with pytest.raises(FrameError) as ei:
        dec.feed(encode(good[0]) + encode(good[1]) + struct.pack(">I", MAX_FRAME + 1))
    assert ei.value.code == "frame_too_large"
    assert ei.value.messages == good


# ---------------------------------------------------------------- bad payloads

@pytest.mark.parametrize("payload", [
    b"\xff",
    b'{"type":"\xff"}',
    b'{"type":"x","v":"\xc3"}',            # truncated two-byte sequence
    b'{"type":"x","v":"\xed\xa0\x80"}',    # encoded surrogate
    b'{"type":"x","v":"\xc0\xaf"}',        # overlong
    '{"type":"x"}'.encode("utf-16"),
    b"\x80\x80\x80",
])
def test_bad_utf8_is_refused(payload):
    err = refused("frame_invalid_json", raw_frame(payload))
    assert "not UTF-8" in err.message


@pytest.mark.parametrize("payload", [
    b"",
    b" ",
    b"{",
    b'{"type":"x"',
    b'{"type":"x"}}',
    b'{"type":"x"} {"type":"y"}',
    b"{'type':'x'}",
    b'{"type":x}',
    b'{"type":"x",}',
    b'{"type":"x","v":NaN}',
    b'{"type":"x","v":Infinity}',
    b'{"type":"x","v":-Infinity}',
    b"\xef\xbb\xbf" + b'{"type":"x"}',  # UTF-8 BOM
    b"\x00",
    '{"type":"x"}'.encode("utf-32-le"),  # valid UTF-8 bytes (ASCII and NULs), but not JSON
    b"[" * 200000,                      # nests deeper than the parser will go
])
def test_invalid_json_is_refused(payload):
    err = refused("frame_invalid_json", raw_frame(payload))
    assert f"frame of {len(payload)} bytes" in err.message


@pytest.mark.parametrize("payload,fragment", [
    (b"[]", "an array"),
    (b'[{"type":"x"}]', "an array"),
    (b'"hello"', "a string"),
    (b"42", "a number"),
    (b"4.5", "a number"),
    (b"true", "a boolean"),
    (b"null", "null"),
])
def test_json_that_is_not_an_object_is_refused(payload, fragment):
    err = refused("frame_not_object", raw_frame(payload))
    assert fragment in err.message


@pytest.mark.parametrize("payload,fragment", [
    (b"{}", 'no "type"'),
    (b'{"kind":"ping"}', 'no "type"'),
    (b'{"type":null}', "None"),
    (b'{"type":1}', "1"),
    (b'{"type":true}', "True"),
    (b'{"type":["ping"]}', "['ping']"),
    (b'{"type":{"a":1}}', "{'a': 1}"),
])
def test_object_without_a_string_type_is_refused(payload, fragment):
    err = refused("frame_not_object", raw_frame(payload))
    assert fragment in err.message


def test_empty_string_type_is_still_a_frame():
    # whether "" is a known type is the schema's business, not the codec's
    assert FrameDecoder().feed(raw_frame(b'{"type":""}')) == [{"type": ""}]


def test_decode_payload_matches_the_decoder():
    assert decode_payload(b'{"type":"ping","nonce":1}') == {"type": "ping", "nonce": 1}
    assert decode_payload(bytearray(b'{"type":"x"}')) == {"type": "x"}
    with pytest.raises(FrameError) as ei:
        decode_payload(b"[]")
    assert ei.value.code == "frame_not_object"


# ---------------------------------------------------------------- poisoned after an error

@pytest.mark.parametrize("bad,code", [
    (struct.pack(">I", MAX_FRAME + 1), "frame_too_large"),
    (raw_frame(b"\xff"), "frame_invalid_json"),
    (raw_frame(b"{"), "frame_invalid_json"),
    (raw_frame(b"[]"), "frame_not_object"),
    (raw_frame(b"{}"), "frame_not_object"),
])
def test_decoder_stays_poisoned(bad, code):
    dec = FrameDecoder()
    with pytest.raises(FrameError) as first:
        dec.feed(bad)
    assert first.value.code == code
    assert dec.error is first.value
    for more in (encode(SAMPLES[0]), b"", b"\x00"):
        with pytest.raises(FrameError) as again:
            dec.feed(more)
        assert again.value.code == first.value.code
        assert again.value.message == first.value.message
        assert again.value.messages == []
    assert dec.buffered == 0


def test_good_frames_before_a_bad_one_ride_on_the_error():
    before = [SAMPLES[0], SAMPLES[3]]
    after = SAMPLES[1]
    dec = FrameDecoder()
    with pytest.raises(FrameError) as ei:
        dec.feed(encode(before[0]) + encode(before[1]) + raw_frame(b"nope") + encode(after))
    assert ei.value.code == "frame_invalid_json"
    assert ei.value.messages == before
    assert dec.buffered == 0


def test_frames_delivered_by_earlier_feeds_are_not_repeated_on_the_error():
    dec = FrameDecoder()
    assert dec.feed(encode(SAMPLES[0])) == [SAMPLES[0]]
    with pytest.raises(FrameError) as ei:
        dec.feed(raw_frame(b"[]"))
    assert ei.value.messages == []


def test_bad_frame_split_across_feeds_is_refused_when_complete():
    frame = raw_frame(b'{"type":"x","v":\xff}')
    dec = FrameDecoder()
    for i in range(len(frame) - 1):
        assert dec.feed(frame[i:i + 1]) == []
    with pytest.raises(FrameError) as ei:
        dec.feed(frame[-1:])
    assert ei.value.code == "frame_invalid_json"


def test_fresh_decoder_has_no_error():
    dec = FrameDecoder()
    assert dec.error is None
    assert dec.buffered == 0


def test_short_repr_bounds_depth_and_length():
    from portunus.control.frames import short_repr
    deep = inner = []
    for _ in range(5000):
        inner.append([])
        inner = inner[0]
    assert short_repr(deep).startswith("[[") and len(short_repr(deep)) <= 60
    assert short_repr("x" * 1000).endswith("...") and len(short_repr("x" * 1000)) == 60
    assert short_repr({"a": 1}) == "{'a': 1}"
