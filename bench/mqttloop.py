"""The ceiling for state sync: a plain aiomqtt publish → subscribe loop, no hasync in between.

A publisher (in the benchmark's process) sends retained QoS 1 messages of about 300 bytes of JSON, the
shape of a Home Assistant state, to distinct per-entity topics; a subscriber in a separate process
(``python -m bench.mqttloop subscribe ...``) receives them, parses them and records each one's latency
from the send time it carries (``time.monotonic_ns()``, one clock for every process on the machine).
Measured on each broker: latency at a paced 100 and 1,000 messages/s, and the maximum sustained rate
(the publisher sends flat out with a bounded number of publishes in flight; the rate is the
subscriber's, first to last message). The sync scenarios will be compared with these figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from harness.brokers import AmqttProcess, BrokerProcess, MosquittoProcess
from hasync.mqtt import no_delay

from .registry import Context, scenario
from .report import Result, Row

ENTITIES = 1000
IN_FLIGHT = 200
# aiomqtt warns about "pending publish calls" when many are in flight, which is the point here.
QUIET = logging.getLogger("bench.aiomqtt")
QUIET.setLevel(logging.ERROR)
SUBSCRIBER_TIMEOUT = 40.0
WARMUP = "warmup"


def payload(i: int, sent_ns: int) -> bytes:
    """About 300 bytes of JSON, shaped like a Home Assistant state of a sensor."""
    entity = f"sensor.bench_{i % ENTITIES:05d}"
    state = {
        "entity_id": entity, "state": f"{20 + (i % 100) / 10:.1f}", "seq": i, "sent_ns": sent_ns,
        "attributes": {"unit_of_measurement": "°C", "device_class": "temperature", "state_class": "measurement",
                       "friendly_name": f"Bench sensor {i % ENTITIES}"},
        "last_changed": "2024-03-01T12:00:00.000000+00:00", "context": {"id": "01HQ3X4Y5Z6A7B8C9D0E1F2G3H"},
    }
    return json.dumps(state).encode()


def topic(prefix: str, i: int) -> str:
    return f"{prefix}/sensor.bench_{i % ENTITIES:05d}"


# Results of this process's runs by broker kind, so the sync scenarios compare against the same run's loop.
RESULTS: dict[str, Result] = {}


# ---- the subscriber process ------------------------------------------------------------------------


async def subscribe(host: str, port: int, prefix: str, *, expect: int, idle: float) -> dict[str, Any]:
    """Receive until ``expect`` messages arrived or none came for ``idle`` seconds."""
    latencies: list[int] = []
    first = last = 0
    async with aiomqtt.Client(host, port, identifier=f"bench-sub-{uuid.uuid4().hex[:8]}",
                              logger=QUIET) as client:
        no_delay(client)
        await client.subscribe(f"{prefix}/#", qos=1)
        print("READY", flush=True)
        iterator = aiter(client.messages)
        while len(latencies) < expect:
            try:
                async with asyncio.timeout(idle):
                    message = await anext(iterator)
            except TimeoutError:
                break
            now = time.monotonic_ns()
            if message.topic.matches(f"{prefix}/{WARMUP}"):
                continue
            assert isinstance(message.payload, bytes)
            sent = json.loads(message.payload)["sent_ns"]
            latencies.append(now - sent)
            first = first or now
            last = now
    return {"latencies_ns": latencies, "first_ns": first, "last_ns": last}


# ---- the publisher -----------------------------------------------------------------------------------


async def publish(host: str, port: int, prefix: str, count: int, rate: float | None) -> float:
    """Publish ``count`` messages, paced at ``rate`` per second (None: flat out), once a warm-up message
    came back through the broker; returns how long the warm-up took."""
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one(client: aiomqtt.Client, i: int) -> None:
        try:
            await client.publish(topic(prefix, i), payload(i, time.monotonic_ns()), qos=1, retain=True)
        finally:
            slots.release()

    async with aiomqtt.Client(host, port, identifier=f"bench-pub-{uuid.uuid4().hex[:8]}", logger=QUIET,
                              max_inflight_messages=IN_FLIGHT, max_queued_outgoing_messages=0) as client:
        no_delay(client)
        # amqtt can take seconds to answer right after the previous phase's clients left; that must not
        # count as the latency of this phase's first messages.
        warmup = time.monotonic()
        await client.subscribe(f"{prefix}/{WARMUP}", qos=1)
        await client.publish(f"{prefix}/{WARMUP}", b"{}", qos=1)
        async with asyncio.timeout(30):
            async for _ in client.messages:
                break
        warmed = time.monotonic() - warmup
        start = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            for i in range(count):
                if rate is not None:
                    delay = start + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await slots.acquire()
                tg.create_task(one(client, i))
        return warmed


@dataclass(frozen=True)
class Phase:
    latencies_ms: list[float]
    rate: float  # messages/s received, first to last
    sent: int
    received: int
    warmup: float  # seconds until a first message came back through the broker


@contextlib.contextmanager
def subscriber(broker: BrokerProcess, prefix: str, expect: int, out: Path) -> Iterator[subprocess.Popen[bytes]]:
    host = broker.url.split("//")[1].split(":")[0]
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.mqttloop", "subscribe", "--host", host, "--port", str(broker.port),
         "--prefix", prefix, "--expect", str(expect), "--out", str(out), "--idle", str(SUBSCRIBER_TIMEOUT)],
        stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # bounded: the subscriber exits after its connect timeout
        if line.strip() != b"READY":
            raise RuntimeError(f"the subscriber did not get ready: {line!r}")
        yield process
    finally:
        if process.poll() is None:
            try:
                process.wait(SUBSCRIBER_TIMEOUT + 30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()


def phase(broker: BrokerProcess, workdir: Path, count: int, rate: float | None) -> Phase:
    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    out = workdir / f"{prefix.replace('/', '-')}.json"
    host = broker.url.split("//")[1].split(":")[0]
    with subscriber(broker, prefix, count, out):
        warmup = asyncio.run(publish(host, broker.port, prefix, count, rate))
    data: dict[str, Any] = json.loads(out.read_text())
    latencies = [ns / 1e6 for ns in data["latencies_ns"]]
    span = (data["last_ns"] - data["first_ns"]) / 1e9
    return Phase(latencies, len(latencies) / span if span > 0 else 0.0, count, len(latencies), warmup)


def run_loop(ctx: Context, broker_kind: str) -> Result:
    name = f"mqtt-baseline-{broker_kind}"
    seconds = 20 if ctx.full else 5
    flat_out = 30_000 if ctx.full else 10_000
    repeats = ctx.runs(1, 3)
    result = Result(name, f"plain aiomqtt publish → subscribe loop (the ceiling for sync), {broker_kind}", (
        f"Retained QoS 1 publishes of ~{len(payload(0, 0))}-byte JSON states to {ENTITIES} per-entity topics, "
        f"subscriber in its own process. Paced phases last {seconds} s each (the runs column counts messages); "
        f"the flat-out phase sends {flat_out:,} messages with up to {IN_FLIGHT} unacknowledged, "
        f"{repeats} time(s). Both clients set TCP_NODELAY, as the agents do."))
    workdir = ctx.workdir / name
    workdir.mkdir(parents=True, exist_ok=True)
    broker = MosquittoProcess(workdir / "broker") if broker_kind == "mosquitto" else AmqttProcess(workdir / "broker")
    started = time.monotonic()
    broker.start()
    try:
        warmups = []
        for rate in (100, 1000):
            p = phase(broker, workdir, rate * seconds, rate)
            warmups.append(p.warmup)
            ctx.log(f"{name}: {rate}/s: {p.received}/{p.sent} received")
            result.rows.append(Row(f"latency at {rate:,} msg/s", "ms", p.latencies_ms))
            if p.received != p.sent:
                result.notes.append(f"at {rate}/s only {p.received} of {p.sent} messages arrived")
        rates = []
        for _ in range(repeats):
            p = phase(broker, workdir, flat_out, None)
            ctx.log(f"{name}: flat out: {p.rate:.0f} msg/s, {p.received}/{p.sent} received")
            rates.append(p.rate)
            warmups.append(p.warmup)
            if p.received != p.sent:
                result.notes.append(f"flat out: only {p.received} of {p.sent} messages arrived")
        result.rows.append(Row("max sustained rate (subscriber)", "msg/s", rates))
        result.notes.append("before each phase a warm-up message must come back through the broker (not "
                            f"counted); that took {', '.join(f'{w * 1000:.0f}' for w in warmups)} ms")
    finally:
        broker.stop()
    result.seconds = time.monotonic() - started
    RESULTS[broker_kind] = result
    return result


@scenario("mqtt-baseline-mosquitto", "plain aiomqtt publish → subscribe loop, Mosquitto")
def baseline_mosquitto(ctx: Context) -> Result:
    return run_loop(ctx, "mosquitto")


@scenario("mqtt-baseline-amqtt", "plain aiomqtt publish → subscribe loop, amqtt")
def baseline_amqtt(ctx: Context) -> Result:
    return run_loop(ctx, "amqtt")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mqttloop")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("subscribe")
    s.add_argument("--host", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--prefix", required=True)
    s.add_argument("--expect", type=int, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--idle", type=float, default=SUBSCRIBER_TIMEOUT)
    args = parser.parse_args(argv)
    data = asyncio.run(subscribe(args.host, args.port, args.prefix, expect=args.expect, idle=args.idle))
    args.out.write_text(json.dumps(data))


if __name__ == "__main__":
    main(sys.argv[1:])
