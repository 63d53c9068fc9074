"""Real ``hasync.agent.Agent`` objects on the fakes of their seams, in the test's own event loop.

``Cluster`` runs agents on one ``FakeMqtt`` (and, for those given one, a ``FakeHomeAssistant``). Run it on
``harness.vclock`` and a test of a failover, a reconnect or a minute of renewals takes milliseconds: the
agents' clock is the loop's. Every role change is recorded with that clock (``events``), in the format of
the agents' events files, so ``check_invariants`` applies the same audit as the process tests: never two
primaries at one instant, one winner per term, terms never going down.

What this tier cannot show (it has one loop and no processes): a frozen process (SIGSTOP), signals,
subprocess hooks and checks on virtual time, real sockets and brokers. Those stay in the process tests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from hasync.agent import Agent
from hasync.audit import decreasing_terms, overlaps, tenures, terms_with_two_winners
from hasync.config import AgentConfig, HealthCheckConfig

from . import vclock
from .fakebroker import FakeMqtt
from .fakeha import FakeHomeAssistant
from .fakenetlink import FakeHost
from .wait import eventually

PREFIX = "t"
CLUSTER = "test"


def config(node: str, **settings: Any) -> AgentConfig:
    """An agent's configuration for this tier: production timings (virtual time makes them free), no HTTP,
    no discovery; ``settings`` merged in, a section at a time."""
    tree: dict[str, Any] = {
        "node_id": node,
        "cluster": CLUSTER,
        "topic_prefix": PREFIX,
        "broker": {"reconnect_min": 0.05, "reconnect_max": 1.0},
        "http": {"enabled": False},
        "homeassistant": {"discovery": False},
    }
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return AgentConfig.model_validate(tree)


class Events:
    """Role changes of every agent, as the events files would hold them (``EventSink``)."""

    def __init__(self, node: str, incarnation: str, into: list[dict[str, Any]]) -> None:
        self.node, self.incarnation, self.into = node, incarnation, into

    def write(self, event: str, **fields: Any) -> None:
        self.into.append({"t": vclock.clock(), "wall": vclock.wall(), "node": self.node,
                          "incarnation": self.incarnation, "event": event, **fields})


class Probes:
    """A node's health check results, set by the test (the probe seam): a check passes unless ``failing``
    names it; ``runs`` counts the probes by check."""

    def __init__(self) -> None:
        self.failing: dict[str, str] = {}
        self.runs: dict[str, int] = {}

    async def __call__(self, check: HealthCheckConfig) -> tuple[bool, str]:
        self.runs[check.name] = self.runs.get(check.name, 0) + 1
        if check.name in self.failing:
            return False, self.failing[check.name]
        return True, "ok"


class Cluster:
    def __init__(self, fake: FakeMqtt | None = None) -> None:
        self.fake = fake or FakeMqtt()
        self.agents: dict[str, Agent] = {}
        self.events: list[dict[str, Any]] = []
        self.deaths: dict[str, float] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def make(self, node: str, *, ha: FakeHomeAssistant | None = None, host: FakeHost | None = None,
             probes: Probes | None = None, **settings: Any) -> Agent:
        """An agent on the fakes, not started; ``host``: its interfaces, for the floating IPs; ``probes``: its
        health checks' results."""
        if ha is not None:
            settings.setdefault("homeassistant", {})
            settings["homeassistant"] = {"url": "http://ha.invalid:8123", "token": ha.token,
                                         **settings["homeassistant"]}
        agent = Agent(config(node, **settings), connect=self.fake.connect, open_websocket=ha.open if ha else None,
                      clock=vclock.clock, wall=vclock.wall, netlink=host, announcer=host, probe=probes)
        agent.effects.events = Events(node, agent.incarnation, self.events)
        return agent

    async def add(self, node: str, *, ha: FakeHomeAssistant | None = None, host: FakeHost | None = None,
                  probes: Probes | None = None, **settings: Any) -> Agent:
        """Start an agent; it runs until ``stop`` or ``kill`` (or the cluster's block ends)."""
        agent = self.make(node, ha=ha, host=host, probes=probes, **settings)
        started = asyncio.Event()

        async def run() -> None:
            async with agent:
                started.set()
                await agent.wait()

        task = asyncio.create_task(run(), name=f"inprocess[{node}]")
        await asyncio.wait([task, asyncio.ensure_future(started.wait())], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises what the start raised
        self.agents[node] = agent
        self._tasks[node] = task
        return agent

    async def stop(self, node: str) -> None:
        """SIGTERM: a graceful handover and exit."""
        self.agents[node].stop()
        await self._tasks.pop(node)

    async def kill(self, node: str) -> float:
        """kill -9: the connection drops (the broker publishes the will), the agent does nothing more."""
        t = vclock.clock()
        self.fake.cut(node, will=True)
        task = self._tasks.pop(node)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.deaths[node] = t
        return t

    def leader(self) -> str | None:
        """The one agent acting as primary now (None if none, or if two: check_invariants says which)."""
        acting = [n for n, a in self.agents.items() if n in self._tasks and a.is_primary()]
        return acting[0] if len(acting) == 1 else None

    async def wait_for_leader(self, timeout: float = 20.0, *, other_than: str | None = None) -> str:
        leader = await eventually(lambda: (lead := self.leader()) is not None and lead != other_than and lead,
                                  timeout, "a primary")
        assert isinstance(leader, str)
        return leader

    def promotions(self, after: float = 0.0) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "promote" and e["t"] >= after]

    def check_invariants(self) -> None:
        now = vclock.clock()
        both = overlaps(tenures(self.events, now, self.deaths))
        assert not both, f"two primaries at once: {both}"
        assert not terms_with_two_winners(self.events), terms_with_two_winners(self.events)
        assert not decreasing_terms(self.events), decreasing_terms(self.events)

    async def close(self) -> None:
        for node in list(self._tasks):
            await self.stop(node)


@contextlib.asynccontextmanager
async def cluster(fake: FakeMqtt | None = None) -> AsyncIterator[Cluster]:
    """A cluster whose invariants are checked when the block ends; every agent is stopped."""
    c = Cluster(fake)
    try:
        yield c
        c.check_invariants()
    finally:
        await c.close()


def metric(agent: Agent, name: str, **labels: str) -> float:
    """The sum of a metric's samples (``name`` as exported, e.g. ``hasync_claims_total``) matching ``labels``."""
    total = 0.0
    for family in agent.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
