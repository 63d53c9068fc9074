"""State sync, agent to agent: latency, throughput and snapshot convergence, with the memory backend.

Two agents (real processes, memory sync backend) on one broker. The benchmark changes entities on agent A
through its HTTP API (``PUT /sync/entities``, as a user would change helpers in HA) over one keep-alive
connection, noting ``time.monotonic()`` before each request; agent B logs every record it applies with its
own ``time.monotonic()`` (``GET /sync/applied``). One clock for every process on the machine, so a latency
is B's apply time minus A's request time: A's HTTP handling, stamping, publishing, the broker, B's parsing,
reconciliation and apply. Every update carries a unique value, so each is matched exactly.

* **latency**: paced at 100 and 1,000 updates/s over 1,000 entities (each entity changes at most once a
  second at 1,000/s, so nothing is coalesced); p50 / p99 per rate.
* **throughput**: 20,000 updates of distinct entities sent as fast as the HTTP API takes them, in batches
  of 500; the rate is B's, first apply to last, beside the plain aiomqtt loop's maximum measured in the
  same run on the same broker (``bench.mqttloop``): that loop is the ceiling of the bus.
* **snapshot**: A holds N entities (retained on the broker); a new agent starts, and the time from its
  process start to its last apply is the convergence time (Python start-up, about 0.5 s, included).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.agents import AgentProcess, Cluster, MemoryApi
from harness.brokers import AmqttProcess, MosquittoProcess
from harness.wait import wait_until

from . import mqttloop
from .registry import Context, scenario
from .report import Result, Row, Target
from .stats import percentile

SYNC_SETTINGS: dict[str, Any] = {
    "sync": {"backend": "memory", "max_entities": 100_000},
    "homeassistant": {"discovery": False},
    "log": {"level": "INFO"},
}
ENTITIES = 1000
BATCH_INTERVAL = 0.01  # s between two requests of a paced phase
# Issue 13's targets: latency on Mosquitto (production's broker); throughput against each broker's own plain loop.
LATENCY_P99_MS = 2.0
THROUGHPUT_RATIO = {"mosquitto": 0.8, "amqtt": 0.6}
SNAPSHOT_MS = 1000.0


@dataclass
class Sent:
    entity_id: str
    state: str
    t: float


class Pair:
    """Broker, agent A (changes) and agent B (applies); more agents can join."""

    def __init__(self, workdir: Path, broker_kind: str) -> None:
        self.workdir = workdir
        self.broker = (MosquittoProcess(workdir / "broker") if broker_kind == "mosquitto"
                       else AmqttProcess(workdir / "broker"))
        self.cluster: Cluster | None = None
        self._seq = 0  # the last applied entry of B already read

    def __enter__(self) -> Pair:
        self.broker.start()
        try:
            self.cluster = Cluster(self.workdir / "agents", self.broker.url, f"bench{time.monotonic_ns()}")
            self.a = self.join("a", priority=100)
            self.b = self.join("b", priority=90)
            self.api_a, self.api_b = MemoryApi(self.a.http_port), MemoryApi(self.b.http_port)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self.cluster is not None:
                with contextlib.suppress(Exception):
                    self.cluster.stop_all()
        finally:
            self.broker.stop()

    def join(self, node: str, priority: int = 10) -> AgentProcess:
        assert self.cluster is not None
        agent = self.cluster.add(node, priority=priority, **SYNC_SETTINGS)
        wait_until(lambda: (agent.status().get("sync") or {}).get("synced"), 30, f"{node} to sync")
        return agent

    def applied_on_b(self, expected: set[tuple[str, str]], timeout: float) -> dict[tuple[str, str], float]:
        """B's apply time of each expected (entity, state), read until all are in or ``timeout``."""
        found: dict[tuple[str, str], float] = {}
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.api_b.applied(self._seq):
                self._seq = max(self._seq, entry["seq"])
                key = (entry["entity_id"], entry["state"])
                if key in expected:
                    found.setdefault(key, entry["t"])
            if len(found) == len(expected) or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def paced(api: MemoryApi, rate: float, seconds: float, tag: str) -> list[Sent]:
    per_batch = max(1, round(rate * BATCH_INTERVAL))
    interval = per_batch / rate
    batches = int(seconds / interval)
    sent: list[Sent] = []
    start = time.monotonic()
    seq = 0
    for k in range(batches):
        delay = start + k * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        values = {}
        for _ in range(per_batch):
            values[f"input_number.bench_{seq % ENTITIES:05d}"] = f"{tag}{seq}"
            seq += 1
        t = time.monotonic()
        api.put(values)
        sent.extend(Sent(e, v, t) for e, v in values.items())
    return sent


def latency_rows(ctx: Context, pair: Pair, result: Result, broker_kind: str) -> None:
    seconds = 20.0 if ctx.full else 5.0
    for rate in (100, 1000):
        sent = paced(pair.api_a, rate, seconds, f"r{rate}-")
        got = pair.applied_on_b({(s.entity_id, s.state) for s in sent}, timeout=30)
        latencies = [(got[(s.entity_id, s.state)] - s.t) * 1000 for s in sent if (s.entity_id, s.state) in got]
        ctx.log(f"{result.scenario}: {rate}/s: {len(got)}/{len(sent)} applied on B")
        target = Target("p99", LATENCY_P99_MS) if rate == 1000 and broker_kind == "mosquitto" else None
        result.rows.append(Row(f"latency at {rate:,} updates/s", "ms", latencies, target))
        if len(got) != len(sent):
            result.notes.append(f"at {rate}/s, {len(sent) - len(got)} of {len(sent)} updates were not applied on B "
                                "as such (coalesced into a newer value, or lost)")


def throughput_row(ctx: Context, pair: Pair, result: Result, ceiling: list[float], broker_kind: str) -> None:
    count, batch = (20_000, 500) if ctx.full else (10_000, 500)
    rates: list[float] = []
    for run in range(ctx.runs(1, 3)):
        values = [(f"input_number.tp{run}_{i:05d}", "1") for i in range(count)]
        t_first = time.monotonic()
        for k in range(0, count, batch):
            pair.api_a.put(dict(values[k:k + batch]))
        t_sent = time.monotonic()
        got = pair.applied_on_b(set(values), timeout=60)
        times = sorted(got.values())
        if len(times) < 2:
            result.failures.append(f"throughput run {run}: only {len(times)} of {count} applied on B")
            continue
        rate = len(times) / (times[-1] - times[0])
        rates.append(rate)
        ctx.log(f"{result.scenario}: flat out: {rate:.0f} updates/s applied on B ({len(got)}/{count}); "
                f"the HTTP API took them at {count / (t_sent - t_first):.0f}/s")
    row = Row("max sustained updates/s (B's applies, first to last)", "updates/s", rates)
    result.rows.append(row)
    if ceiling and rates:
        ratio = [r / percentile(ceiling, 50) for r in rates]
        result.rows.append(Row("throughput / plain aiomqtt loop (same broker, same run)", "ratio", ratio,
                               Target("median", THROUGHPUT_RATIO[broker_kind], at_least=True)))


def _applied_at_least(agent: AgentProcess, count: int) -> bool:
    return agent.metric("hasync_sync_applied_total") >= count


def snapshot_rows(ctx: Context, pair: Pair, result: Result) -> None:
    have = 0
    for size, runs in ((1_000, ctx.runs(3, 10)), (10_000, ctx.runs(2, 5))):
        values = {f"input_boolean.snap_{i:05d}": "on" for i in range(size)}
        for k in range(have, size, 1000):
            pair.api_a.put(dict(list(values.items())[k:k + 1000]))
        have = size
        wait_until(lambda: (pair.api_a.status().get("sync") or {}).get("pending") == 0, 60, "A to settle")
        times: list[float] = []
        for run in range(runs):
            node = f"join{size}x{run}"
            t0 = time.monotonic()
            agent = pair.join(node)
            api = MemoryApi(agent.http_port)
            try:
                # Cheap to poll: the joiner's count of applies; its apply log is read once, at the end.
                wait_until(functools.partial(_applied_at_least, agent, size), 60, f"{node} to hold {size} entities")
                entries = [e for e in api.all_applied() if e["entity_id"].startswith("input_boolean.snap_")]
                if len(entries) != size:
                    raise RuntimeError(f"{node} applied {len(entries)} snapshot entities, expected {size}")
                times.append((max(e["t"] for e in entries) - t0) * 1000)
            finally:
                api.close()
                agent.terminate()
            ctx.log(f"{result.scenario}: snapshot of {size}: {times[-1]:.0f} ms")
        target = Target("median", SNAPSHOT_MS) if size == 10_000 else None
        result.rows.append(Row(f"snapshot of {size:,} entities, joiner start → last apply", "ms", times, target))


def run_sync(ctx: Context, broker_kind: str) -> Result:
    name = f"sync-{broker_kind}"
    result = Result(name, f"agent-to-agent state sync, {broker_kind}", __doc__.split("\n\n", 1)[1].strip()
                    if __doc__ else "")
    workdir = ctx.workdir / name
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    ceiling: list[float] = []
    try:
        baseline = mqttloop.RESULTS.get(broker_kind) or mqttloop.run_loop(ctx, broker_kind)
        for row in baseline.rows:
            if row.metric.startswith("max sustained"):
                ceiling = row.samples
                result.rows.append(Row(f"plain aiomqtt loop, {row.metric}", row.unit, row.samples))
        with Pair(workdir / "pair", broker_kind) as pair:
            latency_rows(ctx, pair, result, broker_kind)
            throughput_row(ctx, pair, result, ceiling, broker_kind)
        # A broker of its own: the joiner receives exactly the snapshot's entities, nothing left from above.
        with Pair(workdir / "snapshot", broker_kind) as pair:
            snapshot_rows(ctx, pair, result)
    except Exception as exc:  # a broken scenario is reported, not silently skipped
        result.failures.append(f"{name} failed: {type(exc).__name__}: {exc}")
    result.seconds = time.monotonic() - started
    return result


@scenario("sync-mosquitto", "agent-to-agent state sync, Mosquitto")
def sync_mosquitto(ctx: Context) -> Result:
    return run_sync(ctx, "mosquitto")


@scenario("sync-amqtt", "agent-to-agent state sync, amqtt")
def sync_amqtt(ctx: Context) -> Result:
    return run_sync(ctx, "amqtt")


@contextlib.contextmanager
def background_load(api_port: int, rate: float) -> Iterator[None]:
    """Changes entities on an agent at ``rate`` per second until the block ends (for the footprint)."""
    stop = threading.Event()

    def drive() -> None:
        api = MemoryApi(api_port)
        try:
            seq = 0
            start = time.monotonic()
            per_batch = max(1, round(rate * BATCH_INTERVAL))
            while not stop.is_set():
                delay = start + seq / rate - time.monotonic()
                if delay > 0:
                    stop.wait(delay)
                api.put({f"input_number.load_{(seq + i) % ENTITIES:05d}": str(seq + i) for i in range(per_batch)})
                seq += per_batch
        finally:
            api.close()

    thread = threading.Thread(target=drive, name="bench.load", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
