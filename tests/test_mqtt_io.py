"""hasync.mqtt's per-message paths around paho: reads framed by hasync.wire, joined writes, the drained inbox.

The unit tests drive the pieces with a socket pair under a real paho client, and a stand-in for paho's write
queue; the integration tests send bursts through a real connection and check that every message arrives,
once, in order, and that every publish is acknowledged (on both brokers).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import socket
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import pytest

from harness.brokers import BrokerProcess
from hasync import wire
from hasync.config import BrokerConfig
from hasync.mqtt import WRITE_SIZE, _Wire, _write_queued, connect, raise_lost_cancellation
from hasync.transport import ConnectionLost, Incoming

# ---- reads and sends (hasync.mqtt._Wire, on a real paho client whose socket is one end of a pair) ------


class _WireRig:
    def __init__(self, *, partial: bytes = b"") -> None:
        self.left, self.right = socket.socketpair()
        self.left.setblocking(False)
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="wire")
        self.client._sock = self.left
        if partial:  # a packet paho had begun to read when the connection came up
            self.client._in_packet["command"] = partial[0]
            self.client._in_packet["remaining_count"] = [partial[1]]
            self.client._in_packet["remaining_length"] = partial[1]
            self.client._in_packet["have_remaining"] = 1
            self.client._in_packet["packet"] = bytearray(partial[2:])
        self.delivered: list[tuple[str, bytes, bool]] = []
        self.errors: list[Exception] = []
        self.wire = _Wire(self.client, lambda *m: self.delivered.append(m), self.errors.append)

    def __enter__(self) -> _WireRig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.left.close()
        self.right.close()

    def read_all(self) -> None:
        for _ in range(1000):
            before = self.client._last_bytes_received
            self.client.loop_read()
            if self.client._last_bytes_received == before or self.client._sock is None:
                return
        raise AssertionError("loop_read never ran out of bytes")

    def sent(self) -> list[tuple[int, bytes]]:
        data = b""
        with contextlib.suppress(BlockingIOError):
            self.right.setblocking(False)
            while chunk := self.right.recv(1 << 20):
                data += chunk
        packets, used, _ = wire.frames(data)
        assert used == len(data)
        return packets


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
async def test_packets_read_in_any_pieces_are_delivered_acknowledged_or_handed_to_paho(chunk: int) -> None:
    with _WireRig() as rig:
        acked: list[str] = []
        rig.wire.send("t/mine", b"x", retain=False, on_ack=lambda: acked.append("mine"))
        mine = rig.client._out_packet[-1]["mid"]
        rig.client._ping_t = 123.0
        subscribed: list[int] = []
        rig.client.on_subscribe = lambda _c, _u, mid, _codes, _p: subscribed.append(mid)
        stream = b"".join([
            wire.encode_publish(b"t/a", b"retained", 7, retain=True),
            bytes([0x30, 6, 0, 3]) + b"t/bQ",  # QoS 0: delivered, not acknowledged
            wire.encode_puback(mine),
            b"\x90\x03\x00\x2a\x01",  # SUBACK of packet 42: paho's
            b"\xd0\x00",  # PINGRESP: paho's
            wire.encode_publish(b"t/\xff", b"big" * 30_000, 8, retain=False),  # a topic that is not UTF-8
        ])
        for k in range(0, len(stream), chunk):
            rig.right.sendall(stream[k:k + chunk])
            rig.read_all()
        await asyncio.sleep(0)  # the write queued at the first acknowledgement goes out at the loop's next turn
        assert rig.delivered == [("t/a", b"retained", True), ("t/b", b"Q", False),
                                 ("t/\ufffd", b"big" * 30_000, False)]
        assert acked == ["mine"]
        assert subscribed == [42]
        assert rig.client._ping_t == 0
        sent = rig.sent()
        assert [p for p in sent if p[0] == wire.PUBACK] == [(wire.PUBACK, b"\x00\x07"), (wire.PUBACK, b"\x00\x08")]
        assert wire.decode_publish(*sent[0]) == wire.Publish(b"t/mine", b"x", 1, False, mine)
        assert rig.errors == []


async def test_a_packet_paho_began_to_read_is_taken_over() -> None:
    packet = wire.encode_publish(b"t/a", b"payload", 9, retain=False)
    with _WireRig(partial=packet[:6]) as rig:
        assert rig.client._in_packet["command"] == 0
        rig.right.sendall(packet[6:])
        rig.read_all()
        assert rig.delivered == [("t/a", b"payload", False)]


async def test_bytes_that_are_not_mqtt_end_the_connection() -> None:
    with _WireRig() as rig:
        disconnected: list[object] = []
        rig.client.on_disconnect = lambda *args: disconnected.append(args)
        rig.right.sendall(wire.encode_publish(b"t/a", b"ok", 1, retain=False) + b"\x30\xff\xff\xff\xff\x01")
        rig.client.loop_read()
        assert rig.delivered == [("t/a", b"ok", False)]
        assert rig.client._sock is None and disconnected  # paho closed it and told aiomqtt


async def test_publishes_sent_in_one_turn_leave_in_one_write_and_each_ack_is_called_once() -> None:
    with _WireRig() as rig:
        acked: list[int] = []
        for i in range(50):
            rig.wire.send(f"t/{i}", b"p" * i, retain=i % 2 == 0, on_ack=functools.partial(acked.append, i))
        sends: list[int] = []
        original = rig.client._sock_send
        rig.client._sock_send = lambda data: sends.append(len(data)) or original(data)  # type: ignore[method-assign,func-returns-value]
        await asyncio.sleep(0)
        assert len(sends) == 1
        published = [wire.decode_publish(f, b) for f, b in rig.sent()]
        assert [(p.topic, p.payload, p.retain) for p in published] == [
            (f"t/{i}".encode(), b"p" * i, i % 2 == 0) for i in range(50)]
        for p in reversed(published):
            rig.right.sendall(wire.encode_puback(p.mid) * 2)  # a second acknowledgement is paho's (it ignores it)
        rig.read_all()
        assert acked == list(reversed(range(50)))
        rig.client._sock = None
        with pytest.raises(ConnectionLost):
            rig.wire.send("t/x", b"", retain=False, on_ack=None)


def _as_aiomqtt_does(rig: _WireRig, loop: asyncio.AbstractEventLoop, writable: Callable[[], None]) -> None:
    """paho's write (un)registration, as aiomqtt sets it up: added at the loop's next turn, removed at once."""
    rig.client.on_socket_register_write = lambda _c, _u, sock: loop.call_soon_threadsafe(
        loop.add_writer, sock.fileno(), writable)
    rig.client.on_socket_unregister_write = lambda _c, _u, sock: loop.remove_writer(sock.fileno())


async def test_a_write_of_ours_never_leaves_aiomqtt_a_writer_paho_believes_gone() -> None:
    # aiomqtt adds the writer paho asks for at the loop's next turn and removes it at once; a write of ours
    # between the two that unregistered would leave a writer called on every turn (an agent at 100 % CPU).
    with _WireRig() as rig:
        loop = asyncio.get_running_loop()
        calls = 0

        def writable() -> None:
            nonlocal calls
            calls += 1
            rig.client.loop_write()

        _as_aiomqtt_does(rig, loop, writable)
        rig.client._send_pingreq()  # paho's own packet: it registers for writing
        rig.wire.send("t/x", b"mine", retain=False, on_ack=None)
        rig.wire.flush()  # writes both before aiomqtt's add_writer has run
        for _ in range(50):
            await asyncio.sleep(0)
        assert [f for f, _ in rig.sent()] == [paho.PINGREQ, wire.PUBLISH | 0x02]
        assert calls <= 1
        loop.remove_writer(rig.left.fileno())


async def test_the_disconnect_is_written_by_paho_after_what_was_queued_before_it() -> None:
    # A write of ours at the loop's next turn, due when the DISCONNECT is queued, must leave it to paho's writer:
    # written by us, it closes the socket before aiomqtt adds that writer (an error logged with a traceback).
    with _WireRig() as rig:
        try:
            loop = asyncio.get_running_loop()
            errors: list[dict[str, Any]] = []
            loop.set_exception_handler(lambda _loop, context: errors.append(context))

            def writable() -> None:
                if rig.client._sock is not None:
                    rig.client.loop_write()

            _as_aiomqtt_does(rig, loop, writable)
            rig.wire.send("t/last", b"release", retain=True, on_ack=None)  # our write is due at the next turn
            rig.client._send_disconnect()
            for _ in range(20):
                await asyncio.sleep(0)
            got = b""
            while chunk := rig.right.recv(1 << 16):
                got += chunk
            packets, _, _ = wire.frames(got)
            assert [f for f, _ in packets] == [wire.PUBLISH | 0x03, paho.DISCONNECT]
            assert rig.client._sock is None  # paho closed it after the DISCONNECT
            assert errors == []
        finally:
            loop.set_exception_handler(None)


# ---- writes -------------------------------------------------------------------------------------


class _FakePaho:
    """The parts of paho.Client that _write_queued uses, with a socket that takes at most ``per_send``
    bytes per call and refuses every ``refuse_every``-th call (EAGAIN)."""

    def __init__(self, per_send: int, refuse_every: int = 0) -> None:
        self._out_packet: collections.deque[dict[str, Any]] = collections.deque()
        self._msgtime_mutex = threading.Lock()
        self._last_msg_out = 0.0
        self.per_send = per_send
        self.refuse_every = refuse_every
        self.sends: list[bytes] = []
        self.calls = 0

    def queue(self, packet: bytes, command: int = paho.PUBLISH, qos: int = 1) -> None:
        self._out_packet.append({"command": command, "mid": 0, "qos": qos, "pos": 0, "to_process": len(packet),
                                 "packet": bytearray(packet), "info": None})

    def _sock_send(self, data: bytes) -> int:
        self.calls += 1
        if self.refuse_every and self.calls % self.refuse_every == 0:
            raise BlockingIOError
        taken = bytes(data[:self.per_send])
        self.sends.append(taken)
        return len(taken)


def _drain(client: _FakePaho) -> bytes:
    for _ in range(10_000):
        if not client._out_packet:
            return b"".join(client.sends)
        _write_queued(client)  # type: ignore[arg-type]
    raise AssertionError("the queue never drained")


def test_queued_packets_go_out_in_one_send() -> None:
    client = _FakePaho(per_send=1 << 20)
    packets = [bytes([0x32, i]) + bytes([i]) * 40 for i in range(50)]
    for p in packets:
        client.queue(p)
    assert _write_queued(client) == paho.MQTT_ERR_SUCCESS  # type: ignore[arg-type]
    assert client.sends == [b"".join(packets)]
    assert not client._out_packet
    assert client._last_msg_out > 0  # paho's keepalive counts it as traffic


@pytest.mark.parametrize(("per_send", "refuse_every"), [(1, 0), (7, 3), (41, 2), (WRITE_SIZE, 0)])
def test_partial_and_refused_writes_keep_every_byte_in_order(per_send: int, refuse_every: int) -> None:
    client = _FakePaho(per_send, refuse_every)
    packets = [bytes([0x32]) + i.to_bytes(2, "big") * (1 + i % 30) for i in range(300)]
    packets.append(b"\x32" + b"big" * (WRITE_SIZE // 2))  # more than one write's worth with the rest
    for p in packets:
        client.queue(p)
    assert _drain(client) == b"".join(packets)


def test_a_disconnect_is_left_to_paho() -> None:
    client = _FakePaho(per_send=1 << 20)
    client.queue(b"\x32\x01x")
    client.queue(b"\xe0\x00", command=paho.DISCONNECT, qos=0)
    called: list[object] = []
    original = paho.Client._packet_write
    try:
        paho.Client._packet_write = lambda self: called.append(self) or paho.MQTT_ERR_SUCCESS  # type: ignore[method-assign,func-returns-value]
        _write_queued(client)  # type: ignore[arg-type]
    finally:
        paho.Client._packet_write = original  # type: ignore[method-assign]
    assert called == [client]
    assert client.sends == []


# ---- through a broker ---------------------------------------------------------------------------


BURST = 3000


@pytest.mark.integration
async def test_a_burst_arrives_complete_in_order_and_acknowledged(broker: BrokerProcess, topic_prefix: str) -> None:
    # A long keepalive: no ping from the broker comes to read bytes left in a buffer (then the burst's end
    # would wait for it, and the timeout below fails the test).
    cfg = BrokerConfig(url=broker.url, keepalive=600)
    payloads = [f"{i:05d}".encode() * (1 + i % 50) for i in range(BURST)]
    acked: list[int] = []
    all_acked = asyncio.Event()

    def ack(i: int) -> None:
        acked.append(i)
        if len(acked) == BURST:
            all_acked.set()

    async with connect(cfg, f"{topic_prefix}-sub") as sub, connect(cfg, f"{topic_prefix}-pub") as pub:
        await sub.subscribe(f"{topic_prefix}/#")
        received: list[Incoming] = []

        async def receive() -> None:
            async for message in sub.messages():
                received.append(message)
                if len(received) == BURST:
                    return

        receiver = asyncio.create_task(receive())
        for i, payload in enumerate(payloads):  # all at once: many packets queued per write, many per read
            pub.send(f"{topic_prefix}/e{i % 17}", payload, retain=False, on_ack=functools.partial(ack, i))
        async with asyncio.timeout(30):
            await receiver
            await all_acked.wait()
    assert [m.payload for m in received] == payloads
    assert [m.topic for m in received] == [f"{topic_prefix}/e{i % 17}" for i in range(BURST)]
    assert sorted(acked) == list(range(BURST))


@pytest.mark.integration
async def test_the_message_stream_ends_when_the_broker_goes(broker: BrokerProcess, topic_prefix: str) -> None:
    from hasync.transport import ConnectionLost

    cfg = BrokerConfig(url=broker.url, keepalive=2)
    with pytest.raises(ConnectionLost):
        async with connect(cfg, f"{topic_prefix}-gone") as session:
            await session.subscribe(f"{topic_prefix}/#")
            session.send(f"{topic_prefix}/x", b"queued", retain=False)
            broker.stop()
            async with asyncio.timeout(30):
                async for _ in session.messages():
                    pass


async def test_a_cancellation_that_wait_for_swallowed_is_raised_again() -> None:
    # The race of CPython gh-86296 (Python 3.11's wait_for), as aiomqtt's disconnect meets it: the awaited
    # future completes and the task is cancelled in the same turn of the loop.
    loop = asyncio.get_running_loop()

    async def closing() -> str:
        task = asyncio.current_task()
        assert task is not None
        goodbye: asyncio.Future[None] = loop.create_future()

        def both() -> None:
            goodbye.set_result(None)
            task.cancel()

        loop.call_soon(both)
        await asyncio.wait_for(goodbye, timeout=10)  # Python 3.12 and later raise here themselves
        raise_lost_cancellation()
        return "ran on after its cancellation"

    task = asyncio.ensure_future(closing())
    with pytest.raises(asyncio.CancelledError):
        print(await task)
    assert task.cancelled()

