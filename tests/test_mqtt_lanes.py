"""The receive queue of hasync.mqtt: the election's messages are handed over before entity records waiting
with them, and each lane keeps its order (what keeps a busy primary's renewal echoes from queueing behind its
own entity records: the fast timing profile's false failovers)."""

from __future__ import annotations

import asyncio

import aiomqtt

from hasync.mqtt import _queue_type
from hasync.topics import Topics

T = Topics("hasync", "home")


def message(topic: str, n: int) -> aiomqtt.Message:
    return aiomqtt.Message(topic, str(n).encode(), qos=1, retain=False, mid=n, properties=None)


def number(m: aiomqtt.Message) -> int:
    assert isinstance(m.payload, bytes)
    return int(m.payload)


def test_election_messages_jump_the_queue_and_each_lane_keeps_its_order() -> None:
    queue = _queue_type(T.is_election)()
    sent = [message(T.entity("light.a"), 1), message(T.entity("light.b"), 2), message(T.lease, 3),
            message(T.command("n1"), 4), message(T.heartbeat("n2"), 5), message(T.lease, 6),
            message(T.entity("light.a"), 7)]
    for m in sent:
        queue.put_nowait(m)
    assert queue.qsize() == len(sent) and not queue.empty()
    got = [number(queue.get_nowait()) for _ in sent]
    assert got == [3, 5, 6, 1, 2, 4, 7]
    assert queue.empty() and queue.qsize() == 0


async def test_a_waiting_reader_gets_an_election_message_put_behind_a_backlog() -> None:
    queue = _queue_type(T.is_election)()
    for n in range(100):
        queue.put_nowait(message(T.entity(f"sensor.s{n}"), n))
    reader = asyncio.get_running_loop().create_task(queue.get())
    await asyncio.sleep(0)
    assert number(reader.result()) == 0
    queue.put_nowait(message(T.lease, 1000))
    assert number(await queue.get()) == 1000
    assert queue.qsize() == 99
