"""What hasync assumes of its brokers, checked on amqtt (embedded) and Mosquitto (production).

Observed on amqtt 0.12.1 and Mosquitto 2.0.11, MQTT 3.1.1 clients (aiomqtt 2.5):

* A retained message reaches a later subscriber with ``retain=True``; a message forwarded to an
  existing subscription has ``retain=False`` on both, whatever the publisher set (MQTT-3.3.1-9).
* amqtt forwards at the subscription's QoS even when the publish had a lower one; Mosquitto at the
  lower of the two, as the specification says.
* Two subscribers of one topic receive 200 interleaved QoS 1 messages from two publishers in one and
  the same order, each publisher's messages in the order it sent them: the election's assumption.
* A client process killed with SIGKILL has its Last Will published by both brokers (the kernel closes
  the socket, the broker reads EOF). A client that is frozen (SIGSTOP) has its will published by
  Mosquitto after 1.5 x keepalive plus up to 5 s (5.4 s with keepalive 1), never by amqtt, which does
  not enforce keepalive.
* Mosquitto with persistence brings retained messages back after a graceful restart; after a crash it
  brings back what it last saved, which can be older than what it last had. amqtt forgets them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import pytest
import yaml
from pwdlib.hashers.argon2 import Argon2Hasher  # amqtt's dependency; it reads argon2 password hashes

from harness.brokers import AmqttProcess, BrokerProcess, MosquittoProcess
from hasync.broker import EmbeddedBroker, amqtt_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
WAIT = 5.0

# Connects with a Last Will, says so, then idles until it is killed or stopped.
_WILL_CLIENT = """
import asyncio, sys
import aiomqtt

async def main(host, port, topic, keepalive):
    will = aiomqtt.Will(topic, b"gone", qos=1)
    async with aiomqtt.Client(host, int(port), identifier="will-client", will=will, keepalive=int(keepalive)):
        print("CONNECTED", flush=True)
        await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


def connect(broker: BrokerProcess | EmbeddedBroker, identifier: str, keepalive: int = 60) -> aiomqtt.Client:
    return aiomqtt.Client(broker.host, broker.port, identifier=identifier, keepalive=keepalive)


async def next_message(client: aiomqtt.Client, within: float = WAIT) -> aiomqtt.Message:
    async with asyncio.timeout(within):
        return await anext(client.messages)


async def no_message(client: aiomqtt.Client, within: float) -> None:
    try:
        message = await next_message(client, within)
    except TimeoutError:
        return
    pytest.fail(f"unexpected message on {message.topic}: {message.payload!r}")


@asynccontextmanager
async def will_client(broker: BrokerProcess, topic: str, keepalive: int) -> AsyncIterator[int]:
    """A child process connected with a will on ``topic``; yields its pid, kills it on exit."""
    arguments = [broker.host, str(broker.port), topic, str(keepalive)]
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WILL_CLIENT, *arguments, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        async with asyncio.timeout(WAIT):
            assert await child.stdout.readline() == b"CONNECTED\n"
        yield child.pid
    finally:
        if child.returncode is None:
            child.kill()  # also ends a stopped process
        await child.wait()


async def test_retained_message_reaches_a_later_subscriber(broker: BrokerProcess, topic_prefix: str) -> None:
    topic = f"{topic_prefix}/retained"
    async with connect(broker, "publisher") as publisher:
        await publisher.publish(topic, b"kept", qos=1, retain=True)
    async with connect(broker, "subscriber") as subscriber:
        await subscriber.subscribe(topic, qos=1)
        message = await next_message(subscriber)
    assert (message.payload, message.retain, message.qos) == (b"kept", True, 1)


async def test_live_message_flags(broker: BrokerProcess, topic_prefix: str) -> None:
    topic = f"{topic_prefix}/live"
    async with connect(broker, "subscriber") as subscriber, connect(broker, "publisher") as publisher:
        await subscriber.subscribe(topic, qos=1)
        await publisher.publish(topic, b"retained", qos=1, retain=True)
        retained = await next_message(subscriber)
        await publisher.publish(topic, b"qos0", qos=0)
        qos0 = await next_message(subscriber)
    # An existing subscription gets retain=False from both brokers, even for a retained publish.
    assert (retained.payload, retained.retain, retained.qos) == (b"retained", False, 1)
    # amqtt upgrades a QoS 0 publish to the subscription's QoS 1; Mosquitto keeps the lower QoS.
    assert (qos0.payload, qos0.retain) == (b"qos0", False)
    assert qos0.qos == (1 if isinstance(broker, AmqttProcess) else 0)


async def test_two_subscribers_see_one_order(broker: BrokerProcess, topic_prefix: str) -> None:
    topic = f"{topic_prefix}/lease"
    per_publisher = 100

    async def collect(client: aiomqtt.Client) -> list[bytes]:
        payloads = []
        for _ in range(2 * per_publisher):
            payload = (await next_message(client)).payload
            assert isinstance(payload, bytes)
            payloads.append(payload)
        return payloads

    async def publish_all(client: aiomqtt.Client, name: str) -> None:
        # All at once, so each publisher has many QoS 1 messages in flight and the two interleave.
        payloads = [f"{name}:{i}".encode() for i in range(per_publisher)]
        await asyncio.gather(*(client.publish(topic, payload, qos=1) for payload in payloads))

    async with (
        connect(broker, "sub-a") as sub_a,
        connect(broker, "sub-b") as sub_b,
        connect(broker, "pub-1") as pub_1,
        connect(broker, "pub-2") as pub_2,
    ):
        await sub_a.subscribe(topic, qos=1)
        await sub_b.subscribe(topic, qos=1)
        seen_a, seen_b, _, _ = await asyncio.gather(
            collect(sub_a), collect(sub_b), publish_all(pub_1, "p1"), publish_all(pub_2, "p2")
        )

    assert seen_a == seen_b
    for name in ("p1", "p2"):
        assert [m for m in seen_a if m.startswith(name.encode())] == [
            f"{name}:{i}".encode() for i in range(per_publisher)
        ]
    # Not a broker guarantee, just a check that the test exercised interleaving at all.
    senders = [m.split(b":")[0] for m in seen_a]
    switches = sum(a != b for a, b in itertools.pairwise(senders))
    assert switches > 1, f"publishers did not interleave: {senders}"


async def test_will_of_a_killed_client_is_published(broker: BrokerProcess, topic_prefix: str) -> None:
    topic = f"{topic_prefix}/nodes/n1"
    async with connect(broker, "watcher") as watcher:
        await watcher.subscribe(topic, qos=1)
        async with will_client(broker, topic, keepalive=60) as pid:
            os.kill(pid, signal.SIGKILL)
            # Both brokers publish it at once: the kernel closes the dead process's socket and the broker
            # reads EOF without a DISCONNECT. amqtt 0.12.1 does this too (Broker._handle_disconnect).
            message = await next_message(watcher)
    assert (message.topic.value, message.payload) == (topic, b"gone")


async def test_will_of_a_frozen_client(broker: BrokerProcess, topic_prefix: str) -> None:
    topic = f"{topic_prefix}/nodes/n1"
    keepalive = 1
    async with connect(broker, "watcher") as watcher:
        await watcher.subscribe(topic, qos=1)
        async with will_client(broker, topic, keepalive=keepalive) as pid:
            os.kill(pid, signal.SIGSTOP)
            if isinstance(broker, AmqttProcess):
                # amqtt ignores keepalive (BrokerProtocolHandler.handle_read_timeout does nothing): the
                # will of a hung client never comes. Waiting longer than Mosquitto takes shows it.
                await no_message(watcher, within=6.0)
            else:
                # After 1.5 x keepalive, but Mosquitto 2.0.11 only looks every 5 s or so: it came after
                # 5.4-5.5 s with keepalive 1 and with keepalive 2.
                message = await next_message(watcher, within=8.0)
                assert (message.topic.value, message.payload) == (topic, b"gone")


@pytest.mark.mosquitto
@pytest.mark.parametrize("mosquitto", [{"persistence": True}], ids=["persistent"], indirect=True)
async def test_mosquitto_persistence_keeps_retained_over_a_restart(
    mosquitto: MosquittoProcess, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}/lease"
    async with connect(mosquitto, "publisher") as publisher:
        await publisher.publish(topic, b"saved", qos=1, retain=True)
    mosquitto.restart()  # SIGTERM: Mosquitto saves its database as it exits
    async with connect(mosquitto, "subscriber") as subscriber:
        await subscriber.subscribe(topic, qos=1)
        message = await next_message(subscriber)
    assert (message.payload, message.retain) == (b"saved", True)


@pytest.mark.mosquitto
@pytest.mark.parametrize("mosquitto", [{"persistence": True}], ids=["persistent"], indirect=True)
async def test_mosquitto_crash_brings_back_the_last_saved_retained(
    mosquitto: MosquittoProcess, topic_prefix: str
) -> None:
    topic = f"{topic_prefix}/lease"
    async with connect(mosquitto, "publisher") as publisher:
        await publisher.publish(topic, b"old", qos=1, retain=True)
    mosquitto.restart()
    async with connect(mosquitto, "publisher") as publisher:
        await publisher.publish(topic, b"new", qos=1, retain=True)
    mosquitto.kill()  # no save: the database on disk still holds "old" (autosave_interval is 1800 s)
    mosquitto.start()
    async with connect(mosquitto, "subscriber") as subscriber:
        await subscriber.subscribe(topic, qos=1)
        message = await next_message(subscriber)
    assert (message.payload, message.retain) == (b"old", True)


async def test_amqtt_forgets_retained_over_a_restart(amqtt_broker: AmqttProcess, topic_prefix: str) -> None:
    topic = f"{topic_prefix}/lease"
    port = amqtt_broker.port
    async with connect(amqtt_broker, "publisher") as publisher:
        await publisher.publish(topic, b"lost", qos=1, retain=True)
    amqtt_broker.restart()
    assert amqtt_broker.port == port
    async with connect(amqtt_broker, "subscriber") as subscriber:
        await subscriber.subscribe(topic, qos=1)
        await no_message(subscriber, within=0.5)


async def test_embedded_broker_in_process(topic_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="hasync")
    caplog.set_level(logging.INFO)
    topic = f"{topic_prefix}/x"
    async with EmbeddedBroker() as broker:
        assert broker.port > 0
        async with connect(broker, "subscriber") as subscriber, connect(broker, "publisher") as publisher:
            await subscriber.subscribe(topic, qos=1)
            await publisher.publish(topic, b"hello", qos=1)
            assert (await next_message(subscriber)).payload == b"hello"
    assert asyncio.all_tasks() == {asyncio.current_task()}, "the broker left tasks behind"
    chatty = ("amqtt", "transitions")
    chatter = [r for r in caplog.records if r.name.startswith(chatty) and r.levelno < logging.WARNING]
    assert not chatter, f"amqtt logged below WARNING: {chatter}"


def test_amqtt_yaml_matches_amqtt_config() -> None:
    shipped = yaml.safe_load((REPO / "broker" / "amqtt.yaml").read_text())
    assert shipped == amqtt_config("127.0.0.1", 1883)


def test_amqtt_config_refuses_closed_broker_without_passwords() -> None:
    with pytest.raises(ValueError, match="password_file"):
        amqtt_config("127.0.0.1", 1883, allow_anonymous=False)


async def test_embedded_broker_with_password_file(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text(f"node:{Argon2Hasher().hash('secret')}\n")
    async with EmbeddedBroker(allow_anonymous=False, password_file=str(passwd)) as broker:
        async with aiomqtt.Client(broker.host, broker.port, username="node", password="secret"):
            pass
        for username, password in (("node", "wrong"), (None, None)):
            with pytest.raises(aiomqtt.MqttCodeError, match="Not authorized"):
                async with aiomqtt.Client(broker.host, broker.port, username=username, password=password):
                    pass
