"""hasync.mqtt's per-message paths around paho: buffered reads, joined writes, the drained inbox.

The unit tests drive the pieces with a socket pair and a stand-in for paho's write queue; the integration
tests send bursts through a real connection and check that every message arrives, once, in order, and that
every publish is acknowledged (on both brokers).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import socket
import threading
from typing import Any

import paho.mqtt.client as paho
import pytest

from harness.brokers import BrokerProcess
from hasync.config import BrokerConfig
from hasync.mqtt import READ_SIZE, WRITE_SIZE, _BufferedReads, _write_queued, connect, raise_lost_cancellation
from hasync.transport import Incoming

# ---- reads --------------------------------------------------------------------------------------


def test_buffered_reads_serve_small_reads_from_one_recv() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.setblocking(False)
        counted = _CountingSocket(left)
        reads = _BufferedReads(counted)
        right.sendall(b"\x40\x02\x00\x01" * 3)  # three PUBACKs, as paho reads them: type, length, body
        got = [reads.recv(1), reads.recv(1), reads.recv(2)]
        assert got == [b"\x40", b"\x02", b"\x00\x01"]
        assert reads.pending() == 8  # what aiomqtt's read callback looks at to call paho again
        assert b"".join(reads.recv(4) for _ in range(2)) == b"\x40\x02\x00\x01" * 2
        assert counted.calls == 1
        assert reads.pending() == 0
        with pytest.raises(BlockingIOError):  # empty buffer, nothing on the socket: paho's "again"
            reads.recv(1)
        right.sendall(b"x" * (READ_SIZE + 10))
        assert len(reads.recv(READ_SIZE + 10)) <= READ_SIZE + 10  # a big read goes to the socket as asked
        right.close()
        while reads.pending():
            reads.recv(READ_SIZE)
        while True:  # the end of the stream reaches paho as b""
            try:
                if reads.recv(1) == b"":
                    break
            except BlockingIOError:
                continue
        assert reads.fileno() == left.fileno()  # everything else is the socket's


class _CountingSocket:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls = 0

    def recv(self, size: int) -> bytes:
        self.calls += 1
        return self.sock.recv(size)

    def fileno(self) -> int:
        return self.sock.fileno()


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
