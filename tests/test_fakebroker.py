"""The broker model (harness.fakebroker) keeps the MQTT semantics the protocol relies on, as the real
brokers do (test_brokers.py checks those facts on Mosquitto and amqtt): what the in-process tier and the
simulation stand on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from harness import vclock
from harness.fakebroker import BrokerModel, Client, FakeMqtt, matches
from hasync.transport import ConnectionLost, Incoming, Will


def client(model: BrokerModel, name: str, *filters: str, will: Will | None = None) -> tuple[Client, list[Incoming]]:
    got: list[Incoming] = []
    c = model.connect(name, will, got.append)
    model.subscribe(c, *filters)
    return c, got


@pytest.mark.parametrize(("pattern", "topic", "expected"), [
    ("a/b", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False), ("a/#", "a/b/c", True),
    ("a/#", "a", True), ("+/b", "a/b", True), ("a/b", "a/c", False), ("a", "a/b", False),
])
def test_topic_filters(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected


def test_retained_messages_replace_delete_and_reach_later_subscribers_flagged() -> None:
    model = BrokerModel()
    pub, _ = client(model, "pub")
    model.publish(pub, "t/a", b"1", retain=True)
    model.publish(pub, "t/a", b"2", retain=True)
    model.publish(pub, "t/b", b"x", retain=True)
    model.publish(pub, "t/b", b"", retain=True)
    _, got = client(model, "sub", "t/+")
    assert got == [Incoming("t/a", b"2", True)]
    model.publish(pub, "t/a", b"3", retain=True)
    assert got[-1] == Incoming("t/a", b"3", False)  # forwarded live without the flag


def test_every_subscriber_gets_one_order_its_own_publishes_included() -> None:
    model = BrokerModel()
    a, got_a = client(model, "a", "t/#")
    b, got_b = client(model, "b", "t/#")
    for i in range(20):
        model.publish(a if i % 2 else b, f"t/{i % 3}", str(i).encode(), retain=False)
    assert [m.payload for m in got_a] == [m.payload for m in got_b] == [str(i).encode() for i in range(20)]


def test_the_will_goes_out_on_an_abnormal_close_only() -> None:
    model = BrokerModel()
    _, got = client(model, "watcher", "will/#")
    clean, _ = client(model, "clean", will=Will("will/clean", b"gone"))
    crashed, _ = client(model, "crashed", will=Will("will/crashed", b"gone"))
    model.close(clean, clean=True)
    model.close(crashed, clean=False)
    assert got == [Incoming("will/crashed", b"gone", False)]
    assert model.retained == {"will/crashed": b"gone"}
    client(model, "again", will=Will("will/again", b"old"))
    client(model, "again")  # the same client id connects again: the broker closes the old one, with its will
    assert got[-1] == Incoming("will/again", b"old", False)


def test_an_acl_drops_silently_and_replays_are_on_demand() -> None:
    model = BrokerModel(acl=lambda client_id, topic: not (client_id == "rogue" and topic == "t/lease"))
    rogue, _ = client(model, "rogue")
    sub, got = client(model, "sub", "t/#")
    assert model.publish(rogue, "t/lease", b"claim", retain=False) is False
    assert model.publish(rogue, "t/other", b"ok", retain=False) is True
    assert [m.payload for m in got] == [b"ok"]
    assert model.replay(sub, "t/other") and [m.payload for m in got] == [b"ok", b"ok"]
    assert [p.dropped for p in model.log] == [True, False]


def test_the_transport_seam_over_the_model() -> None:
    async def scenario() -> None:
        fake = FakeMqtt(ack_delay=0.5)
        async with fake.connect("hasync-n1-x-1", Will("n/n1", b"offline")) as session:
            await session.subscribe("n/#")
            acked: list[float] = []
            session.send("n/a", b"1", retain=True, on_ack=lambda: acked.append(vclock.clock()))
            await session.publish("n/b", b"2", retain=False)
            assert acked and acked[0] >= vclock.START + 0.5
            received = [m async for m in _take(session.messages(), 2)]
            assert [m.payload for m in received] == [b"1", b"2"]
            fake.cut("n1")
            with pytest.raises(ConnectionLost, match="cut by the test"):
                async for _ in session.messages():
                    pass
        assert fake.model.retained["n/n1"] == b"offline"  # cut: the will went out
        fake.refuse = ConnectionLost("refused")
        with pytest.raises(ConnectionLost):
            async with fake.connect("hasync-n1-x-2", None):
                pass

    vclock.run(scenario())


async def _take(messages: AsyncIterator[Incoming], n: int) -> AsyncIterator[Incoming]:
    for _ in range(n):
        yield await asyncio.wait_for(anext(messages), 1)
