"""hasync.wire: MQTT 3.1.1 framing, PUBLISH and PUBACK, against paho's own encoder and decoder and against
garbage (what a broker sends is read by it)."""

from __future__ import annotations

import socket

import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt import _packet as paho_packet

from hasync import wire

topics = st.binary(min_size=1, max_size=300)
payloads = st.binary(max_size=2000)
mids = st.integers(1, 0xFFFF)


@given(topics, payloads, mids, st.booleans())
def test_a_publish_reads_back_as_written_and_as_paho_reads_it(topic: bytes, payload: bytes, mid: int,
                                                              retain: bool) -> None:
    packet = wire.encode_publish(topic, payload, mid, retain=retain)
    [(first, body)], used, want = wire.frames(packet)
    assert (used, want) == (len(packet), 0)
    assert wire.decode_publish(first, body) == wire.Publish(topic, payload, 1, retain, mid)
    theirs = paho_packet.decode_publish(first, body, paho.MQTTv311)
    assert (theirs.topic, theirs.payload, theirs.mid, theirs.qos, theirs.retain) == (topic, payload, mid, 1, retain)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 70_000])
def test_packets_are_written_as_paho_writes_them(size: int) -> None:
    left, right = socket.socketpair()
    with left, right:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="wire")
        client._sock = left
        left.setblocking(False)
        payload = bytes(i % 251 for i in range(size))
        client._send_publish(513, b"hasync/e/light.kitchen", payload, qos=1, retain=True)
        client._send_command_with_mid(paho.PUBACK, 258, False)
        theirs = bytearray()
        expected = wire.encode_publish(b"hasync/e/light.kitchen", payload, 513, retain=True) + wire.encode_puback(258)
        while len(theirs) < len(expected):
            client.loop_write()
            theirs += right.recv(1 << 20)
        assert bytes(theirs) == expected


@given(st.lists(st.tuples(topics, payloads, mids, st.booleans()), max_size=12), st.data())
def test_a_stream_split_anywhere_frames_into_the_same_packets(
        messages: list[tuple[bytes, bytes, int, bool]], data: st.DataObject) -> None:
    stream = b"".join(wire.encode_publish(t, p, m, retain=r) + wire.encode_puback(m) for t, p, m, r in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    got: list[tuple[int, bytes]] = []
    rest = b""
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        rest += stream[a:b]
        packets, used, want = wire.frames(rest)
        got.extend(packets)
        rest = rest[used:]
        assert not rest or want > len(rest)  # nothing whole is left behind, and more is asked for
    assert rest == b""
    expected = []
    for t, p, m, r in messages:
        expected.append(wire.Publish(t, p, 1, r, m))
        expected.append(m)
    decoded = [wire.decode_publish(f, b) if f & 0xF0 == wire.PUBLISH else wire.decode_puback(b) for f, b in got]
    assert decoded == expected


@pytest.mark.parametrize("length", [0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152])
def test_remaining_lengths_at_every_boundary(length: int) -> None:
    header = bytes([0xD0]) + wire._length(length)
    packets, used, want = wire.frames(header)
    assert (packets, used) == (([], 0) if length else ([(0xD0, b"")], len(header)))
    assert want == (len(header) + length if length else 0)
    assert len(wire._length(length)) == 1 + (length > 127) + (length > 16_383) + (length > 2_097_151)


def test_what_is_not_mqtt_is_malformed() -> None:
    with pytest.raises(wire.Malformed):
        wire.frames(b"\x30\xff\xff\xff\xff\x01")  # a fifth length byte
    with pytest.raises(wire.Malformed):
        wire.decode_publish(0x36, b"\x00\x01t\x00\x01")  # QoS 3
    with pytest.raises(wire.Malformed):
        wire.decode_publish(0x32, b"\x00\x09short")  # the topic runs past the end
    with pytest.raises(wire.Malformed):
        wire.decode_publish(0x32, b"\x00\x01t\x00")  # half a packet identifier
    with pytest.raises(wire.Malformed):
        wire.decode_puback(b"\x00\x01\x00")
    assert wire.decode_publish(0x31, b"\x00\x01t") == wire.Publish(b"t", b"", 0, True, 0)  # QoS 0: no identifier


@given(st.binary(max_size=400))
def test_garbage_frames_or_is_malformed_never_anything_else(data: bytes) -> None:
    try:
        packets, used, _ = wire.frames(data)
    except wire.Malformed:
        return
    assert 0 <= used <= len(data)
    for first, body in packets:
        try:
            if first & 0xF0 == wire.PUBLISH:
                wire.decode_publish(first, body)
            elif first & 0xF0 == wire.PUBACK:
                wire.decode_puback(body)
        except wire.Malformed:
            pass


def test_what_cannot_be_encoded_is_refused() -> None:
    for mid in (0, 0x10000):
        with pytest.raises(ValueError, match="out of range"):
            wire.encode_publish(b"t", b"", mid, retain=False)
    with pytest.raises(ValueError, match="out of range"):
        wire.encode_publish(b"t" * 0x10000, b"", 1, retain=False)
