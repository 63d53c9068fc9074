"""MQTT 3.1.1 packets on the per-message paths: framing, PUBLISH and PUBACK (pure; ``hasync.mqtt`` does the I/O).

paho handles every packet with a few dozen Python calls (three reads, a message object, properties even for
MQTT 3.1.1, a log call that formats nothing, a callback table), which made it about half of an agent's CPU
under entity sync: every record is published once and read twice (the peer's copy and our own echo), and
each publish and each received record costs an acknowledgement. The framing and the two packet kinds that
carry records are simple enough to do here, and everything else is still paho's (``hasync.mqtt``).

A packet is a first byte (type and flags), a remaining length (1 to 4 bytes, 7 bits each, the high bit set
on all but the last), and that many bytes of body. What a broker sends is checked as strictly as paho does:
a length of more than 4 bytes, a PUBLISH of QoS 3, or a topic or packet identifier running past the body
is :class:`Malformed`, and the caller ends the connection (the broker is broken; nothing it sends after can
be framed).
"""

from __future__ import annotations

from dataclasses import dataclass

PUBLISH = 0x30
PUBACK = 0x40
MAX_REMAINING = 268_435_455  # the largest remaining length 4 bytes can carry


class Malformed(ValueError):
    """Bytes that are not MQTT: the connection cannot go on."""


@dataclass(frozen=True, slots=True)
class Publish:
    topic: bytes
    payload: bytes
    qos: int
    retain: bool
    mid: int  # the packet identifier, 0 for QoS 0


def frames(data: bytes) -> tuple[list[tuple[int, bytes]], int, int]:
    """The complete packets at the start of ``data``, as ``(first byte, body)``; how many bytes they take (the
    bytes after them begin a packet still to come); and how long that rest must grow before another call can
    find a packet in it (its whole size once its length is known, else one byte more). Bytes that cannot be
    framed raise :class:`Malformed`, once the packets before them have been returned."""
    packets: list[tuple[int, bytes]] = []
    pos, end = 0, len(data)
    while pos < end:
        i, length, shift = pos + 1, 0, 0
        while True:
            if i >= end:
                return packets, pos, end - pos + 1  # the length is not all here yet
            byte = data[i]
            i += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 21:
                if packets:
                    return packets, pos, 0  # those first: the next call raises
                raise Malformed("a remaining length of more than 4 bytes")
        if i + length > end:
            return packets, pos, i + length - pos
        packets.append((data[pos], data[i:i + length]))
        pos = i + length
    return packets, pos, 0


def decode_publish(first: int, body: bytes) -> Publish:
    qos = (first >> 1) & 0x03
    if qos == 3:
        raise Malformed("a PUBLISH of QoS 3")
    if len(body) < 2:
        raise Malformed("a PUBLISH without a topic")
    topic_end = 2 + ((body[0] << 8) | body[1])
    payload_at = topic_end + (2 if qos else 0)
    if payload_at > len(body):
        raise Malformed("a PUBLISH whose topic or packet identifier runs past its end")
    mid = (body[topic_end] << 8) | body[topic_end + 1] if qos else 0
    return Publish(body[2:topic_end], body[payload_at:], qos, bool(first & 0x01), mid)


def decode_puback(body: bytes) -> int:
    """The packet identifier of a PUBACK's body."""
    if len(body) != 2:
        raise Malformed(f"a PUBACK of {len(body)} bytes (2 in MQTT 3.1.1)")
    return (body[0] << 8) | body[1]


def encode_publish(topic: bytes, payload: bytes, mid: int, *, retain: bool) -> bytes:
    """A QoS 1 PUBLISH (``mid`` 1 to 65535; ``topic`` at most 65535 bytes)."""
    if not 0 < mid <= 0xFFFF or len(topic) > 0xFFFF:
        raise ValueError(f"packet identifier {mid} or topic of {len(topic)} bytes out of range")
    remaining = 2 + len(topic) + 2 + len(payload)
    if remaining > MAX_REMAINING:
        raise ValueError(f"a payload of {len(payload)} bytes is more than MQTT can carry")
    return b"".join((bytes((PUBLISH | 0x02 | retain,)), _length(remaining), len(topic).to_bytes(2, "big"), topic,
                     mid.to_bytes(2, "big"), payload))


def encode_puback(mid: int) -> bytes:
    return bytes((PUBACK, 2, mid >> 8, mid & 0xFF))


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)
