"""Footprint: each agent's resident memory (``VmRSS``) and CPU (``utime + stime`` from ``/proc/PID/stat``)
over a measured window, for the primary and for the standbys, on Mosquitto.

``measure(ctx, load)`` takes an optional ``Load``: a context manager that runs a workload against the
cluster while the window lasts. Idle is ``load=None``; the 1,000 entity updates/s variant will pass a
load that drives state sync once it exists (until then its row says "pending: state sync").
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.agents import TopicRecorder
from harness.brokers import MosquittoProcess
from hasync.config import Profile
from hasync.topics import Topics

from .cluster import BenchCluster
from .registry import Context, scenario
from .report import Result, Row, Target
from .syncbench import background_load

NODES = {"n1": 300, "n2": 200, "n3": 100}
SLICE = 5.0  # seconds per CPU sample: a 10 ms clock tick is 0.2 % of it
RSS_TARGET_MIB = {"idle": 45, "load": 60}  # issue 13: idle, and at 1,000 entity updates/s
CPU_TARGET_PERCENT = 1.0


@dataclass(frozen=True)
class Load:
    """A workload to run during the window: ``run(cluster)`` is entered before and left after it."""

    name: str
    run: Callable[[BenchCluster], AbstractContextManager[None]]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may contain spaces
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def publisher(topics: Topics, topic: str, leader: str) -> str | None:
    """The node that published a message on ``topic`` (the lease, the leader topic and entity records: the
    primary, which holds the lease and makes the load's changes)."""
    parsed = topics.parse(topic)
    if parsed is None and topic.startswith(f"{topics.base}/nodes/"):
        return topic.split("/")[len(topics.base.split("/")) + 1]  # (nodes/{node}/primary: HA's sensor)
    if parsed is None:
        return None
    return parsed.node or leader


def measure(ctx: Context, name: str, load: Load | None, *, signed: bool = False, profile: Profile = "default",
            **settings: Any) -> Result:
    window = 30.0 if ctx.full else 10.0
    slices = int(window // SLICE)
    title = "agent footprint, " + ("idle" if load is None else load.name) + ", Mosquitto"
    title += ", signed control messages" if signed else ""
    title += "" if profile == "default" else f", {profile} timing profile"
    timings = ("production timings, Home Assistant discovery on" if profile == "default"
               else f"the {profile} timing profile, Home Assistant discovery off")
    result = Result(name, title, (
        f"Three agents ({timings}, log level INFO) on Mosquitto; "
        f"once the cluster is stable, every agent's CPU time is sampled every {SLICE:.0f} s for "
        f"{window:.0f} s ({slices} samples per agent; CPU % = CPU seconds / wall seconds of the slice, "
        f"100 % = one core) and its VmRSS at the end of each slice. The standby rows pool both standbys. "
        "Messages/s: what each agent published in the slice, as a client subscribed to the cluster's topics "
        "received it (the broker delivers each to every agent subscribed: about three times as many)."))
    workdir = ctx.workdir / name
    broker = MosquittoProcess(workdir / "broker")
    rss: dict[str, list[float]] = {"primary": [], "standby": []}
    cpu: dict[str, list[float]] = {"primary": [], "standby": []}
    rate: dict[str, list[float]] = {"primary": [], "standby": []}
    started = time.monotonic()
    broker.start()
    try:
        with BenchCluster(workdir / "agents", broker.url, NODES, signed=signed, profile=profile, **settings) as bc, \
                TopicRecorder(broker.url, f"{bc.topics.base}/#") as recorder:
            leader = bc.wait_stable(timeout=60, hold=3.0)
            roles = {node: "primary" if node == leader else "standby" for node in bc.agents}
            pids = {node: agent.pid for node, agent in bc.agents.items()}
            with load.run(bc) if load is not None else contextlib.nullcontext():
                ctx.log(f"{name}: measuring {window:.0f} s, {leader} is primary")
                before = {node: cpu_seconds(pid) for node, pid in pids.items()}
                t_before = time.monotonic()
                for _ in range(slices):
                    time.sleep(SLICE)  # the measurement window itself
                    now = time.monotonic()
                    sent = Counter(publisher(bc.topics, topic, leader) for t, topic, _ in list(recorder.messages)
                                   if t_before < t <= now)
                    for node, pid in pids.items():
                        spent = cpu_seconds(pid)
                        cpu[roles[node]].append((spent - before[node]) / (now - t_before) * 100)
                        rss[roles[node]].append(rss_mib(pid))
                        rate[roles[node]].append(sent[node] / (now - t_before))
                        before[node] = spent
                    t_before = now
            if bc.stable_leader() != leader:
                result.failures.append(f"leadership changed during the window (was {leader})")
    finally:
        broker.stop()
    result.seconds = time.monotonic() - started
    for role in ("primary", "standby"):
        rss_target = RSS_TARGET_MIB["idle" if load is None else "load"]
        result.rows.append(Row(f"RSS, {role}", "MiB", rss[role], Target("max", rss_target)))
    for role in ("primary", "standby"):
        # The CPU target is for an idle agent in the default profile; under load, or in the fast profile (what
        # it costs), the figure is reported without one.
        cpu_target = Target("median", CPU_TARGET_PERCENT) if load is None and profile == "default" else None
        result.rows.append(Row(f"CPU, {role}", "%", cpu[role], cpu_target))
    for role in ("primary", "standby"):
        result.rows.append(Row(f"MQTT messages published, {role}", "/s", rate[role]))
    return result


@scenario("footprint", "agent footprint (RSS, CPU), idle, Mosquitto")
def footprint_idle(ctx: Context) -> Result:
    return measure(ctx, "footprint", None)


@scenario("footprint-fast", "agent footprint (RSS, CPU, messages), idle, Mosquitto, fast timing profile")
def footprint_fast(ctx: Context) -> Result:
    """The idle footprint in the fast timing profile: what its renewals (10/s) and heartbeats (3.3/s per node)
    cost, beside the default profile's rows of the same run."""
    return measure(ctx, "footprint-fast", None, profile="fast")


@scenario("footprint-signed", "agent footprint (RSS, CPU), idle, Mosquitto, signed control messages")
def footprint_signed(ctx: Context) -> Result:
    """The idle footprint with signing keys: every renewal (2/s on the primary), heartbeat (1/s per node)
    signed by its sender and verified by every receiver."""
    return measure(ctx, "footprint-signed", None, signed=True)


def _sync_load(bc: BenchCluster) -> AbstractContextManager[None]:
    leader = bc.stable_leader()
    assert leader is not None
    return background_load(bc.agents[leader].http_port, 1000)


@scenario("footprint-load", "agent footprint (RSS, CPU), 1,000 entity updates/s, Mosquitto")
def footprint_load(ctx: Context) -> Result:
    """The same, with entity sync (memory backend) and 1,000 changes a second made on the primary over
    1,000 entities, which every standby applies: the primary stamps and publishes them, the standbys
    receive and apply them."""
    result = measure(ctx, "footprint-load", Load("1,000 entity updates/s", _sync_load),
                     sync={"backend": "memory"})
    result.method += " Load: 1,000 entity changes/s through the primary's HTTP API (memory sync backend), " \
                     "applied by both standbys."
    return result
