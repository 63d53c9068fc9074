"""The receive lanes of hasync.mqtt: the election's messages are handed over before entity records waiting
with them, and each lane keeps its order (what keeps a busy primary's renewal echoes from queueing behind its
own entity records: the fast timing profile's false failovers)."""

from __future__ import annotations

from hasync.mqtt import _Lanes
from hasync.topics import Topics
from hasync.transport import Incoming

T = Topics("hasync", "home")


def message(topic: str, n: int) -> Incoming:
    return Incoming(topic, str(n).encode(), False)


def test_election_messages_jump_the_queue_and_each_lane_keeps_its_order() -> None:
    lanes = _Lanes(T.is_election)
    sent = [message(T.entity("light.a"), 1), message(T.entity("light.b"), 2), message(T.lease, 3),
            message(T.command("n1"), 4), message(T.heartbeat("n2"), 5), message(T.lease, 6),
            message(T.entity("light.a"), 7)]
    for m in sent:
        lanes.append(m)
    assert len(lanes) == len(sent)
    got = [int(lanes.popleft().payload) for _ in sent]
    assert got == [3, 5, 6, 1, 2, 4, 7]
    assert not lanes


def test_an_election_message_put_behind_a_backlog_is_next() -> None:
    lanes = _Lanes(T.is_election)
    for n in range(100):
        lanes.append(message(T.entity(f"sensor.s{n}"), n))
    assert int(lanes.popleft().payload) == 0
    lanes.append(message(T.lease, 1000))
    assert int(lanes.popleft().payload) == 1000
    assert len(lanes) == 99
