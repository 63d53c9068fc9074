"""Federation through real Home Assistant: a hub with 1,000 exported entities, a main HA with nothing but MQTT
discovery, one Mosquitto.

The hub HA (``harness/ha.py``) has 1,000 ``input_boolean`` helpers (``bulk_helpers``: it starts as fast with
them as without, about 2 s); its agent runs with the default election timings and sync off (a hub of one node)
and exports all of them; main shows each as ``switch.bench_bulk_NNNN``. Times come from each HA's own clock
(``last_changed``, an event's ``time_fired``), the agent's event log and an MQTT recorder: one machine, one clock.

- **Discovery**: from the start of the agent's process until main holds all 1,000 with the hub's state; main
  had none of them (before each run the retained discovery is cleared and main deletes them). Where the time
  goes: until the agent is primary (a node alone observes one lease first), until the export is out (the hub's
  status ``online``, sent after every config and state), until main has created every entity and until every
  one holds the hub's state (main's ``state_changed`` events).
- **Restart**: kill -9 of the agent (main shows the 1,000 unavailable), a new agent, until main holds all of
  them again.
- **Hub → main**: a helper turned on in the hub (a service call), until main's copy shows it: main's
  ``last_changed`` minus the hub's, one change at a time, each a different entity.
- **Main → hub**: ``switch.turn_off`` called on main's copy, until the hub's helper is off: the hub's
  ``last_changed`` minus the ``time_fired`` of main's ``call_service`` event.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from harness.agents import AgentProcess, TopicRecorder
from harness.brokers import MosquittoProcess
from harness.ha import (
    HomeAssistant,
    Subscription,
    bulk_entity,
    ha_installed,
    start_home_assistants,
    stop_home_assistants,
)
from harness.wait import HOST, wait_until
from hasync.election import Timing

from . import mqttloop
from .footprint import cpu_seconds, rss_mib
from .registry import Context, scenario
from .report import Result, Row, Target

NAME = "federation-ha"
TITLE = "federation through real Home Assistant, a hub of 1,000 entities, Mosquitto"
ENTITIES = 1000
CHANGES = 300
CLUSTER = "bench"
PREFIX = "hasync"
TIMEOUT = 120.0  # for main to hold all 1,000 (a failure, not a figure)
LATENCY_TARGET_MS = 50.0
DISCOVERY_TARGET_S = 10.0
STATE_CHANGED = {"type": "subscribe_events", "event_type": "state_changed"}


def copy_of(i: int) -> str:
    """Main's entity for the hub's ``bulk_entity(i)``."""
    return f"switch.{CLUSTER}_{bulk_entity(i).partition('.')[2]}"


def _time(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


@dataclass
class Arrivals:
    """When main created each copy and when each first held ``wanted`` (main's clock), from its state events."""

    copies: frozenset[str]
    wanted: str
    start: int = 0  # the first of the subscription's events to read
    created: dict[str, float] = field(default_factory=dict)
    held: dict[str, float] = field(default_factory=dict)

    def read(self, changes: Subscription) -> bool:
        """Take the events that came since the last call; True once every copy holds ``wanted``."""
        events = changes.events[self.start:]
        self.start += len(events)
        for event in events:
            data = event["data"]
            entity_id, new = data["entity_id"], data["new_state"]
            if entity_id not in self.copies or new is None:
                continue
            if data["old_state"] is None:
                self.created.setdefault(entity_id, _time(event["time_fired"]))
            if new["state"] == self.wanted:
                self.held.setdefault(entity_id, _time(new["last_changed"]))
        return len(self.held) == len(self.copies)


@dataclass
class Samples:
    discovery: list[float] = field(default_factory=list)
    primary: list[float] = field(default_factory=list)
    published: list[float] = field(default_factory=list)
    created: list[float] = field(default_factory=list)
    held: list[float] = field(default_factory=list)
    restart: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)
    cpu_start: list[float] = field(default_factory=list)
    main_cpu: list[float] = field(default_factory=list)
    to_main: list[float] = field(default_factory=list)
    to_hub: list[float] = field(default_factory=list)
    cpu_change: list[float] = field(default_factory=list)


class Bench:
    """The hub and main HAs, the broker, the hub's agent and what the scenario reads from them."""

    def __init__(self, ctx: Context, broker: MosquittoProcess, hub: HomeAssistant, main: HomeAssistant) -> None:
        self.ctx, self.broker, self.hub, self.main = ctx, broker, hub, main
        self.copies = frozenset(copy_of(i) for i in range(ENTITIES))
        self.base = f"{PREFIX}/{CLUSTER}/fed"
        self.recorder = TopicRecorder(broker.url, "#")
        defaults = Timing()
        self.agent = AgentProcess(  # started by each run
            ctx.workdir / NAME / "agents", "hub", broker.url, PREFIX, cluster=CLUSTER, log={"level": "INFO"},
            sync={"enabled": False},
            election={key: getattr(defaults, key) for key in ("lease_duration", "renew_deadline", "renew_interval",
                                                             "heartbeat_interval", "claim_stagger", "preempt_delay")},
            homeassistant={"url": hub.url, "token": hub.token},
            federation={"include": {"entity_globs": ["input_boolean.bulk_*"]}})
        self.clock = time.time() - time.monotonic()  # wall = monotonic + clock, on this machine

    def close(self) -> None:
        self.agent.terminate()
        self.recorder.close()

    def _until_held(self, arrivals: Arrivals, changes: Subscription, what: str) -> None:
        try:
            wait_until(lambda: arrivals.read(changes), TIMEOUT, what, step=0.05)
        except AssertionError:
            missing = sorted(self.copies - set(arrivals.held))
            raise AssertionError(f"{what}: {len(missing)} missing, e.g. {missing[:3]}; main's log: "
                                 f"{self.main.log_tail(1500)}") from None

    def _first(self, since: float, accept: Callable[[str, bytes], bool]) -> float:
        """Wall-clock time of the first recorded MQTT message after ``since`` (monotonic) that ``accept`` takes."""
        return next(t for t, topic, payload in list(self.recorder.messages)
                    if t >= since and accept(topic, payload)) + self.clock

    def discovery(self, samples: Samples) -> None:
        """One cold start: the agent starts, main creates the 1,000 and shows their state."""
        arrivals = Arrivals(self.copies, "off")
        with self.main.subscribe(STATE_CHANGED) as changes:
            main_cpu = cpu_seconds(self.main.pid)
            started = time.monotonic()
            self.agent.start()
            self._until_held(arrivals, changes, "main to hold all exported entities")
            samples.main_cpu.append(cpu_seconds(self.main.pid) - main_cpu)
        start = started + self.clock
        promoted = next(e["t"] for e in self.agent.events() if e["event"] == "promote" and e["t"] >= started)
        published = self._first(started, lambda topic, payload: topic == f"{self.base}/status" and payload == b"online")
        last = max(arrivals.held.values())
        samples.discovery.append(last - start)
        samples.primary.append(promoted - started)
        samples.published.append(published - start)
        samples.created.append(max(arrivals.created.values()) - published)
        samples.held.append(last - published)
        samples.rss.append(rss_mib(self.agent.pid))
        samples.cpu_start.append(cpu_seconds(self.agent.pid))
        self.ctx.log(f"{NAME}: 1,000 held on main {last - start:.2f} s after the agent's start (primary after "
                     f"{promoted - started:.2f} s, export out after {published - start:.2f} s)")

    def restart(self, samples: Samples) -> None:
        """kill -9 of the exporting agent, then a new one: main knows the entities and shows them again."""
        with self.main.subscribe(STATE_CHANGED) as changes:
            self.agent.kill()
            self._until_held(Arrivals(self.copies, "unavailable"), changes, "main to show them unavailable")
            arrivals = Arrivals(self.copies, "off", len(changes.events))
            started = time.monotonic()
            self.agent.start()
            self._until_held(arrivals, changes, "main to hold all of them again")
        samples.restart.append(max(arrivals.held.values()) - (started + self.clock))

    def clear(self) -> None:
        """Stop the agent and clear the export's retained messages: main deletes its copies."""
        self.agent.terminate()
        topics = {topic for _, topic, payload in list(self.recorder.messages)
                  if payload and ((topic.startswith(f"{self.base}/") and topic.endswith(("/state", "/status")))
                                  or (topic.startswith("homeassistant/") and topic.endswith("/config")))}
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-clear-{time.monotonic_ns()}")
        client.connect(HOST, self.broker.port)
        client.loop_start()
        try:
            for info in [client.publish(topic, b"", qos=1, retain=True) for topic in sorted(topics)]:
                info.wait_for_publish(30)
        finally:
            client.disconnect()
            client.loop_stop()
        wait_until(self._deleted, TIMEOUT, "main to delete the copies", step=1.0)
        self.recorder.messages.clear()

    def _deleted(self) -> bool:
        try:
            return not self.copies & {s["entity_id"] for s in self.main.states()}
        except OSError:  # main, deleting 1,000 entities on a loaded machine, may not answer in time
            return False

    def latencies(self, samples: Samples) -> None:
        """Changes one at a time: on the hub, seen on main; then commands on main, carried out on the hub."""
        hub, main = self.hub, self.main
        with main.subscribe(STATE_CHANGED) as on_main, hub.subscribe(STATE_CHANGED) as on_hub, \
                main.subscribe({"type": "subscribe_events", "event_type": "call_service"}) as calls:
            cpu = cpu_seconds(self.agent.pid)
            seen = 0
            for i in range(CHANGES):
                entity, copy = bulk_entity(i), copy_of(i)
                [changed] = [s for s in hub.call_service("input_boolean", "turn_on", {"entity_id": entity})
                             if s["entity_id"] == entity]
                seen, event = on_main.wait_for(partial(_became, entity_id=copy, state="on"), 30, f"{copy} on",
                                               start=seen)
                samples.to_main.append((_time(event["data"]["new_state"]["last_changed"])
                                        - _time(changed["last_changed"])) * 1000)
            samples.cpu_change.append((cpu_seconds(self.agent.pid) - cpu) / CHANGES * 1000)
            called = changed_at = 0
            for i in range(CHANGES):
                entity, copy = bulk_entity(i), copy_of(i)
                main.call_service("switch", "turn_off", {"entity_id": copy})
                called, call = calls.wait_for(partial(_calls, entity_id=copy), 30,
                                              f"main's call for {copy}", start=called)
                changed_at, event = on_hub.wait_for(partial(_became, entity_id=entity, state="off"), 30,
                                                    f"{entity} off", start=changed_at)
                samples.to_hub.append((_time(event["data"]["new_state"]["last_changed"])
                                       - _time(call["time_fired"])) * 1000)
        self.ctx.log(f"{NAME}: {CHANGES} changes each way")


def _became(event: dict[str, Any], entity_id: str, state: str) -> bool:
    new = event["data"]["new_state"]
    return bool(event["data"]["entity_id"] == entity_id and new is not None and new["state"] == state)


def _calls(event: dict[str, Any], entity_id: str) -> bool:
    return entity_id in str(event["data"].get("service_data"))


def rows(samples: Samples, baseline: Result | None) -> list[Row]:
    out = [
        Row("hub HA change → main HA state (each HA's last_changed)", "ms", samples.to_main,
            Target("p99", LATENCY_TARGET_MS)),
        Row("main command (service call) → hub entity changed (main's call_service → hub's last_changed)", "ms",
            samples.to_hub),
    ]
    for row in baseline.rows if baseline is not None else []:
        if row.metric.startswith("latency at 100 "):
            out.append(Row(f"plain aiomqtt loop (same run), {row.metric}", row.unit, row.samples))
    out += [
        Row(f"agent start → {ENTITIES:,} entities discovered and holding state on main", "s", samples.discovery,
            Target("max", DISCOVERY_TARGET_S)),
        Row("… agent start → primary (a node alone observes one lease)", "s", samples.primary),
        Row("… agent start → export out (hub status online, after every config and state)", "s",
            samples.published),
        Row(f"… export out → main has created all {ENTITIES:,}", "s", samples.created),
        Row(f"… export out → main holds all {ENTITIES:,}", "s", samples.held),
        Row(f"main HA's CPU, agent start → main holds all {ENTITIES:,}", "s", samples.main_cpu),
        Row(f"kill -9 of the agent, new agent start → main holds all {ENTITIES:,} again", "s", samples.restart),
        Row(f"agent RSS exporting {ENTITIES:,} entities", "MiB", samples.rss),
        Row("agent CPU, process start → main holds all", "s", samples.cpu_start),
        Row("agent CPU per hub change", "ms", samples.cpu_change),
    ]
    return out


@scenario(NAME, TITLE, modes=("full",))
def federation_ha(ctx: Context) -> Result:
    runs = ctx.runs(3, 5)
    result = Result(NAME, TITLE, (__doc__ or "").split("\n\n", 1)[1].strip() + f" {runs} discovery runs, "
                    f"{CHANGES} changes each way.")
    if not ha_installed():
        result.rows += [Row(metric, unit, pending="not run: Home Assistant not installed (scripts/setup-ha.sh)")
                        for metric, unit in (("hub HA change → main HA state", "ms"),
                                             ("main command → hub entity changed", "ms"),
                                             (f"agent start → {ENTITIES:,} entities on main", "s"))]
        return result
    started = time.monotonic()
    samples = Samples()
    baseline = mqttloop.RESULTS.get("mosquitto")
    workdir = ctx.workdir / NAME
    broker = MosquittoProcess(workdir / "broker")
    has: dict[str, HomeAssistant] = {}
    broker.start()
    try:
        # The hub's own HA does not read the discovery prefix: it would make a copy of every export on itself.
        hub_options = {"bulk_helpers": ENTITIES, "mqtt_discovery": False}
        has = start_home_assistants(workdir, ["hub", "main"], broker.port, {"hub": hub_options})
        result.notes.append("Home Assistant start: " + ", ".join(f"{n} {ha.start_seconds:.1f} s"
                                                                 for n, ha in has.items()))
        bench = Bench(ctx, broker, has["hub"], has["main"])
        try:
            for run in range(runs):
                bench.discovery(samples)
                bench.restart(samples)
                if run < runs - 1:
                    bench.clear()
            bench.latencies(samples)
        finally:
            bench.close()
    except Exception as exc:
        result.failures.append(f"aborted: {exc!r}")
        ctx.log(f"{NAME} FAILED: {traceback.format_exc()}")
    finally:
        stop_home_assistants(has)
        broker.stop()
    if baseline is None:
        result.notes.append("the plain MQTT loop was not run in this invocation (add mqtt-baseline-mosquitto)")
    result.rows += rows(samples, baseline)
    result.seconds = time.monotonic() - started
    return result
