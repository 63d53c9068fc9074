"""Fuzzing the agent itself: sequences of hostile messages on every topic it reads, through the in-process
tier (real ``Agent`` objects on the fake broker, on virtual time), with the safety invariants checked after
every message.

``messages()`` draws what a hostile or broken client can put on the broker: schema-valid records at the
extremes (terms and sequence numbers up to the wire's limit, forged holders and wills of live agents,
views far ahead, entity records stamped in the future, tombstones, huge attributes), the same with one
field replaced by anything, and garbage (random bytes, truncated JSON, wrong types, numbers JSON cannot
hold). ``Run`` applies them to a cluster of three agents with entity sync on and checks, after each one:
no agent task ended, no handling failed (``hasync_internal_errors_total`` stays 0: every message is either
handled or dropped with a reason), never two primaries, no agent's view of the term going back, and every
agent can still report its status.

tests/test_fuzz_agent.py runs a short hunt in CI; a long one (the count of messages is printed at the end)::

    HASYNC_FUZZ_EXAMPLES=11000 HASYNC_FUZZ_LENGTH=60 ./scripts/test -s --timeout=0 tests/test_fuzz_agent.py
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from hasync.agent import Agent
from hasync.election import MAX_TERM
from hasync.messages import MAX_INT
from hasync.sync.hlc import MAX_COUNTER
from hasync.topics import Topics

from . import inprocess
from .fakebroker import FakeMqtt

NODES = ("n1", "n2", "n3")
TOPICS = Topics(inprocess.PREFIX, inprocess.CLUSTER)
ENTITIES = ("input_boolean.a", "input_number.b", "counter.c", "light.not_selected")
START_WALL_MS = 1_800_000_000_000


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    then: float  # seconds of virtual time to let pass after it


# ---- what to send ---------------------------------------------------------------------------------------

NAMES = st.sampled_from([*NODES, "rogue", "x" * 64])
COUNTS = st.one_of(st.integers(0, 5), st.integers(0, MAX_INT),
                   st.sampled_from([0, 1, MAX_TERM - 2, MAX_TERM - 1, MAX_TERM]))
ANY_JSON: st.SearchStrategy[Any] = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
              st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10,
)


@st.composite
def lease_records(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["claim", "renew", "release"]))
    record: dict[str, Any] = {"v": 1, "kind": kind, "holder": draw(NAMES),
                              "incarnation": draw(st.sampled_from(["i", "live"])), "conn": draw(COUNTS),
                              "priority": draw(st.integers(0, 1000)), "lease_ms": draw(st.integers(1, MAX_INT)),
                              "sent_at": draw(st.floats(0, 2e9))}
    if kind == "claim":
        prev = draw(st.integers(0, MAX_INT - 1) | st.integers(0, 5))
        record |= {"term": prev + 1, "seq": 0, "prev_term": prev, "prev_seq": draw(COUNTS)}
    else:
        record |= {"term": draw(COUNTS), "seq": draw(st.integers(1, MAX_INT) | st.integers(1, 5))}
        if kind == "release" and draw(st.booleans()):
            record["successor"] = draw(NAMES)
    return record


@st.composite
def heartbeats(draw: st.DrawFn) -> dict[str, Any]:
    online = draw(st.booleans())
    beat: dict[str, Any] = {
        "v": 1, "node": draw(NAMES), "incarnation": draw(st.sampled_from(["i", "live"])), "conn": draw(COUNTS),
        "online": online, "role": draw(st.sampled_from(["primary", "standby", "candidate", "observing", "fault",
                                                         "offline"])),
        "priority": draw(st.integers(0, 1000)), "preempt": draw(st.booleans()), "healthy": draw(st.booleans()),
        "eligible": draw(st.booleans()), "maintenance": draw(st.booleans()), "sent_at": draw(st.floats(0, 2e9)),
    }
    if draw(st.booleans()):
        beat["view"] = {"term": draw(COUNTS), "seq": draw(COUNTS)}
    if draw(st.booleans()):
        beat["leader"] = draw(NAMES)
    if draw(st.booleans()):
        beat["sync"] = {"synced": draw(st.booleans()), "entities": draw(COUNTS), "pending": draw(COUNTS),
                        "queued": draw(COUNTS), "lag_ms": draw(COUNTS)}
    return beat


@st.composite
def commands(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["step_down", "resume", "maintenance"]))
    command: dict[str, Any] = {"v": 1, "command": kind}
    if kind == "step_down" and draw(st.booleans()):
        command["successor"] = draw(NAMES)
    if kind == "maintenance":
        command["on"] = draw(st.booleans())
    return command


@st.composite
def entity_records(draw: st.DrawFn, entity_id: str) -> dict[str, Any]:
    origin = draw(NAMES)
    wall = draw(st.one_of(st.just(0), st.integers(START_WALL_MS - 10**6, START_WALL_MS + 10**8),
                          st.just(10**13 - 1)))
    version = f"{wall:013d}-{draw(st.integers(0, MAX_COUNTER)):04d}-{origin}"
    record: dict[str, Any] = {"v": 1, "entity_id": entity_id, "version": version, "origin": origin,
                              "leader_term": draw(COUNTS)}
    if draw(st.integers(0, 4)) == 0:
        record["tombstone"] = True
    else:
        record["state"] = draw(st.text(max_size=300) | st.sampled_from(["on", "off", "1", "unavailable"]))
        record["attributes"] = draw(st.dictionaries(st.text(max_size=10), ANY_JSON, max_size=3)
                                    | st.just({"big": "x" * 20_000}))
    return record


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    """The message, or the message with one field replaced, removed or added; or garbage instead."""
    choice = draw(st.integers(0, 9))
    value = dict(base)
    if choice < 6:
        pass
    elif choice < 8 and value:
        key = draw(st.sampled_from(sorted(value)))
        if draw(st.booleans()):
            value[key] = draw(ANY_JSON)
        else:
            del value[key]
    elif choice == 8:
        value[draw(st.text(max_size=8))] = draw(ANY_JSON)
    else:
        return draw(st.one_of(
            st.binary(max_size=64),
            st.sampled_from([b"", b"null", b"[]", b"{}", b'{"v": 1', b'{"v": 1, "term": 1e999}', b"NaN",
                             b'{"v": 1, "term": NaN}', b"\xff\xfe", b'{"v": 2}', b"{" + b" " * 20_000 + b"}"]),
            st.text(max_size=64).map(str.encode),
        ))
    return json.dumps(value).encode()


@st.composite
def messages(draw: st.DrawFn) -> Message:
    where = draw(st.sampled_from(["lease", "lease", "lease", "heartbeat", "heartbeat", "command", "entity",
                                  "marker", "ha", "other"]))
    match where:
        case "lease":
            topic, payload = TOPICS.lease, draw(mutated(draw(lease_records())))
        case "heartbeat":
            beat = draw(heartbeats())
            node = beat["node"] if draw(st.integers(0, 4)) else draw(NAMES)
            topic, payload = TOPICS.heartbeat(node), draw(mutated(beat))
        case "command":
            topic, payload = TOPICS.command(draw(NAMES)), draw(mutated(draw(commands())))
        case "entity":
            entity_id = draw(st.sampled_from(ENTITIES))
            topic = TOPICS.entity(entity_id)
            payload = draw(mutated(draw(entity_records(draw(st.sampled_from(ENTITIES)) if not draw(
                st.integers(0, 5)) else entity_id))))
        case "marker":
            topic, payload = TOPICS.sync_marker(draw(NAMES)), draw(st.binary(max_size=20))
        case "ha":
            topic, payload = "homeassistant/status", draw(st.sampled_from([b"online", b"offline", b"", b"\x00"]))
        case _:
            topic = draw(st.sampled_from([TOPICS.leader, f"{TOPICS.base}/nodes/n1/primary", f"{TOPICS.base}/x",
                                          f"{TOPICS.base}/entities/Bad.ID", f"{TOPICS.base}/nodes/a+b"]))
            payload = draw(st.binary(max_size=32))
    # Mostly back to back; now and then long enough for timers to fire (claims, vacancies, deadlines).
    then = draw(st.sampled_from([0.0] * 8 + [0.01, 0.3, 1.0, 3.5]))
    return Message(topic, payload, draw(st.booleans()), then)


# ---- running them ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """A cluster of three agents with entity sync (memory backend) and discovery, to throw messages at."""

    cluster: inprocess.Cluster = field(default_factory=lambda: inprocess.Cluster(FakeMqtt()))
    sent: int = 0
    terms: dict[str, int] = field(default_factory=dict)

    async def start(self) -> None:
        for i, node in enumerate(NODES):
            await self.cluster.add(node, priority=100 - 10 * i, sync={"backend": "memory"},
                                   homeassistant={"discovery": True})
        await asyncio.sleep(4)  # elected, everyone synced
        for node, agent in self.agents.items():
            assert agent.replica is not None
            agent.replica.backend.set_local(ENTITIES[NODES.index(node)], "on")  # type: ignore[attr-defined]
        await asyncio.sleep(0.5)
        self.check()

    @property
    def agents(self) -> dict[str, Agent]:
        return self.cluster.agents

    async def send(self, message: Message) -> None:
        payload = message.payload
        if b'"live"' in payload:  # forge the holder's or node's real incarnation
            payload = payload.replace(b'"live"', json.dumps(self.agents["n1"].incarnation).encode())
        self.cluster.fake.inject(message.topic, payload, retain=message.retain)
        self.sent += 1
        await asyncio.sleep(message.then or 0.001)
        self.check()

    def check(self) -> None:
        for node, task in self.cluster._tasks.items():
            assert not task.done(), f"{node}'s agent ended: {task}"
        for node, agent in self.agents.items():
            errors = sum(s.value for m in agent.metrics.internal_errors.collect() for s in m.samples
                         if s.name.endswith("_total"))
            assert errors == 0, f"{node} caught {errors:g} unexpected errors (see the log)"
            term = agent.election.term
            assert term >= self.terms.get(node, 0), f"{node}'s term went back: {self.terms[node]} -> {term}"
            self.terms[node] = term
            agent.status()
            if self.sent % 25 == 0:  # what /metrics would show, now and then (rendering costs a few ms)
                agent._render_metrics()
        primaries = [n for n, a in self.agents.items() if a.is_primary()]
        assert len(primaries) <= 1, f"two primaries: {primaries}"

    async def close(self) -> None:
        await self.cluster.close()
        self.cluster.check_invariants()
