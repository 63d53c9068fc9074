"""Failover scenarios: three agents (real processes) on Mosquitto or amqtt, one fault per scenario,
repeated on one cluster. Each run waits for a stable cluster, injects the fault into the primary,
measures from the fault to the new primary's ``promote`` event (written when its first renewal came
back from the broker: the new primary is confirmed), lets the faulty node rejoin, and checks on the
agents' event logs that no two tenures overlapped.
"""

from __future__ import annotations

import contextlib
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import netns
from harness.brokers import AmqttProcess, BrokerProcess, MosquittoProcess
from harness.wait import free_port
from hasync.config import ElectionConfig, Profile

from .cluster import BenchCluster, CommandSender, command_sender
from .registry import Context, scenario
from .report import Result, Row, Target

NODES = {"n1": 300, "n2": 200, "n3": 100}
LEASE = ElectionConfig().lease_duration
FAST_TARGET_MS = 1000.0  # issue 13: a hang or a partition of the primary replaced within 1 s (p95)


def make_broker(kind: str, workdir: Path, lan: netns.Lan | None = None) -> BrokerProcess:
    """``lan``: Mosquitto listens on the LAN's bridge too, where its namespaces reach it."""
    if kind == "mosquitto":
        # Persistence as in broker/mosquitto.conf: a graceful restart keeps the retained lease.
        if lan is None:
            return MosquittoProcess(workdir, persistence=True)
        port = free_port()
        broker = MosquittoProcess(workdir, port=port, persistence=True, extra_config=[f"listener {port} {lan.gateway}"])
        broker.host = lan.gateway
        return broker
    return AmqttProcess(workdir)


@dataclass
class Sample:
    seconds: float
    new_leader: str
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Env:
    bc: BenchCluster
    broker: BrokerProcess
    sender: CommandSender | None
    lan: netns.Lan | None = None  # the agents' namespaces, when they run in some


def _kill(env: Env, leader: str) -> Sample:
    t = env.bc.kill(leader)
    promo = env.bc.next_promotion(t, 15, exclude=leader)
    env.bc.restart(leader)
    return Sample(promo["t"] - t, promo["node"])


def _stop(env: Env, leader: str) -> Sample:
    agent = env.bc.agents[leader]
    t = time.monotonic()
    agent.signal(signal.SIGSTOP)
    try:
        promo = env.bc.next_promotion(t, 20, exclude=leader)
    finally:
        agent.signal(signal.SIGCONT)
    return Sample(promo["t"] - t, promo["node"])


def _cut(env: Env, leader: str) -> Sample:
    """Everything between the primary's namespace and the broker dropped (iptables, both ways), until another
    node is primary. Timed from just before the outbound rule goes in (``ip netns exec``: a few ms early)."""
    assert env.lan is not None
    rules = [["OUTPUT", "-d", env.lan.gateway, "-j", "DROP"], ["INPUT", "-s", env.lan.gateway, "-j", "DROP"]]
    t = time.monotonic()
    try:
        for rule in rules:
            env.lan.run_in(leader, "iptables", "-A", *rule)
        promo = env.bc.next_promotion(t, 20, exclude=leader)
    finally:
        for rule in rules:
            with contextlib.suppress(RuntimeError):
                env.lan.run_in(leader, "iptables", "-D", *rule)
    return Sample(promo["t"] - t, promo["node"])


def _handover_command(env: Env, leader: str) -> Sample:
    assert env.sender is not None
    t = env.sender.step_down(leader)
    promo = env.bc.next_promotion(t, 10, exclude=leader)
    return Sample(promo["t"] - t, promo["node"])


def _handover_sigterm(env: Env, leader: str) -> Sample:
    agent = env.bc.agents[leader]
    t = time.monotonic()
    agent.signal(signal.SIGTERM)
    promo = env.bc.next_promotion(t, 10, exclude=leader)
    assert agent.process is not None
    agent.process.wait(15)
    env.bc.restart(leader)
    return Sample(promo["t"] - t, promo["node"])


def _broker_restart(env: Env, leader: str) -> Sample:
    t_down = time.monotonic()
    env.broker.restart()
    t_up = time.monotonic()
    env.bc.reconnected(t_up)
    promo = env.bc.next_promotion(t_up, 40)
    return Sample(promo["t"] - t_up, promo["node"],
                  {"outage": promo["t"] - t_down, "moved": float(promo["node"] != leader)})


@dataclass(frozen=True)
class Fault:
    key: str
    title: str
    metric: str
    inject: Callable[[Env, str], Sample]
    target: Callable[[str], Target | None]
    quick_runs: int = 5
    full_runs: int = 30


FAULTS = [
    Fault("failover-kill", "crash failover (kill -9 of the primary's agent)", "kill -9 → new primary confirmed",
          _kill, lambda broker: Target("median", 300) if broker == "mosquitto" else None),
    Fault("failover-stop", "hang failover (SIGSTOP of the primary's agent)", "SIGSTOP → new primary confirmed",
          _stop, lambda broker: Target("p95", (LEASE + 0.5) * 1000)),
    Fault("failover-cut", "partition failover (the primary cut off from the broker: iptables DROP both ways)",
          "cut → new primary confirmed", _cut, lambda broker: Target("p95", (LEASE + 0.5) * 1000)),
    Fault("handover-command", "graceful handover (step_down command on the primary's command topic)",
          "step-down published → new primary confirmed", _handover_command, lambda broker: Target("median", 50)),
    Fault("handover-sigterm", "graceful handover (SIGTERM of the primary's agent)",
          "SIGTERM → new primary confirmed", _handover_sigterm, lambda broker: Target("median", 50)),
    Fault("broker-restart", "broker restart (graceful stop, start on the same port)",
          "broker accepting again → primary confirmed", _broker_restart, lambda broker: None),
]

METHOD = {
    "failover-kill": "The primary's agent gets SIGKILL; the broker sends its Last Will at once (its socket "
                     "closed), so the others elect without waiting for the lease. The killed agent is "
                     "restarted and rejoins as standby (it observes a full lease first).",
    "failover-stop": "The primary's agent gets SIGSTOP (a hung process: its socket stays open, no will); "
                     "the others claim after a lease of silence. After the promotion it gets SIGCONT, "
                     "finds its deadline passed and demotes before doing anything as primary. The 'no primary' row "
                     "is the fence margin: the old primary stopped acting renew_deadline after its last echoed "
                     "renewal, the others claimed lease_duration after receiving it (3 s - 2 s = 1 s by design).",
    "failover-cut": "Every agent runs in a network namespace of its own (harness.netns) on a bridge where "
                    "Mosquitto listens; the primary's packets to and from the broker are dropped (iptables in its "
                    "namespace). Its connection stays open (no will before 1.5 x keepalive); the others claim "
                    "after a lease of silence, it demotes at its renew deadline. Once another node is primary "
                    "the rules are removed: its queued packets go through, it sees the newer term and follows. "
                    "The 'no primary' row is the fence margin, as for SIGSTOP.",
    "handover-command": "A `step_down` command (what `hasync step-down` and HA's button send) is published "
                        "to the primary's command topic from a client that is already connected; timed "
                        "from just before the publish. The old primary demotes, then releases naming its "
                        "successor, who claims at once. (`hasync step-down` on the command line adds its "
                        "own start-up and connection, about a second of Python imports here.)",
    "handover-sigterm": "The primary's agent gets SIGTERM: it hands over (demote, release to the best "
                        "standby), publishes its offline status and exits; it is then restarted.",
    "broker-restart": "The broker is stopped gracefully (SIGTERM; Mosquitto saves its retained messages, "
                      "amqtt loses them) and started again on the same port; timed from when it accepts "
                      "connections again. The primary demotes when its connection drops; every agent "
                      "reconnects with backoff and observes a full lease before anyone claims, so this is "
                      "about reconnect + lease_duration by design.",
}


NAGLE = (
    "What bounds it: the new primary needs two round trips through the broker (its claim's echo, then its "
    "first renewal's echo). Before commit 2865457 set TCP_NODELAY on the agents' sockets, most echoes "
    "waited ~42 ms for the broker's delayed ACK (Nagle's algorithm); see the analysis at the end.")
WHY_MISSED = {
    "failover-kill": NAGLE,
    "handover-command": NAGLE + " A handover adds the command's and the release's trips.",
    "handover-sigterm": NAGLE + " A handover adds the release's trip.",
}


def scenario_name(fault: Fault, broker_kind: str, *, signed: bool = False, profile: Profile = "default") -> str:
    return f"{fault.key}-{broker_kind}" + ("-signed" if signed else "") + (
        "" if profile == "default" else f"-{profile}")


def run_fault(ctx: Context, fault: Fault, broker_kind: str, *, signed: bool = False,
              profile: Profile = "default") -> Result:
    name = scenario_name(fault, broker_kind, signed=signed, profile=profile)
    title = (f"{fault.title}, {broker_kind}" + (", signed control messages" if signed else "")
             + ("" if profile == "default" else f", {profile} timing profile"))
    method = METHOD[fault.key] + (" Every node has a signing key (hasync.signing): each lease record, "
                                  "heartbeat and will is signed, and verified by every receiver." if signed else "")
    if profile != "default":
        method += f" Timings: the {profile} profile (`election: {{profile: {profile}}}`; see the timings above)."
    result = Result(name, title, method)
    target = fault.target(broker_kind) if profile == "default" else Target("p95", FAST_TARGET_MS)
    if fault.key == "failover-cut" and netns.available() is not None:
        result.rows.append(Row(fault.metric, "ms", target=target, pending=f"not run: {netns.available()}"))
        return result
    # Quick mode: fewer runs on amqtt (the development broker) so the whole quick mode stays short.
    runs = ctx.runs(fault.quick_runs if broker_kind == "mosquitto" else 3, fault.full_runs)
    started = time.monotonic()
    with contextlib.ExitStack() as outer:
        lan = outer.enter_context(netns.Lan(list(NODES))) if fault.key == "failover-cut" else None
        broker = make_broker(broker_kind, ctx.workdir / name / "broker", lan)
        broker.start()
        outer.callback(broker.stop)
        measured = _measure(ctx, result, fault, runs, broker, lan=lan, signed=signed, profile=profile)
    result.seconds = time.monotonic() - started
    overlap = measured.overlap
    result.overlap = (len(overlap), sum(1 for o in overlap if o > 0), max(overlap, default=0.0))
    _summarise(result, fault, target, measured.samples, measured.gaps)
    return result


@dataclass
class Measured:
    samples: list[Sample] = field(default_factory=list)
    overlap: list[float] = field(default_factory=list)  # per run, the longest overlap of two tenures (0: none)
    gaps: list[float] = field(default_factory=list)


def _measure(ctx: Context, result: Result, fault: Fault, runs: int, broker: BrokerProcess, *,
             lan: netns.Lan | None, signed: bool, profile: Profile) -> Measured:
    """``runs`` faults on one cluster; an error ends the runs (a failure of the result), keeping those done.
    ``lan``: each agent runs in its node's namespace."""
    name = result.scenario
    measured = Measured()
    in_namespaces: dict[str, dict[str, Any]] = {} if lan is None else {
        node: {"command_prefix": lan.prefix(node), "http": {"host": lan.addresses[node]}} for node in NODES}
    bc: BenchCluster | None = None
    try:
        with contextlib.ExitStack() as stack:
            bc = stack.enter_context(BenchCluster(ctx.workdir / name / "agents", broker.url, NODES, signed=signed,
                                                  profile=profile, node_settings=in_namespaces))
            sender = (stack.enter_context(command_sender(broker.url, bc.topics))
                      if fault.key == "handover-command" else None)
            env = Env(bc, broker, sender, lan)
            first = bc.wait_stable(timeout=60)
            ctx.log(f"{name}: cluster stable, {first} is primary; {runs} runs")
            for i in range(runs):
                leader = bc.wait_stable(timeout=60)
                since = time.monotonic()
                sample = fault.inject(env, leader)
                bc.wait_stable(timeout=60)
                audit = bc.audit(since)
                measured.samples.append(sample)
                if audit.gap is not None:
                    measured.gaps.append(audit.gap)
                worst = max(audit.overlaps, default=0.0)
                measured.overlap.append(worst)
                if audit.overlaps:
                    result.failures.append(f"run {i + 1}: TWO PRIMARIES AT ONCE for {worst * 1000:.1f} ms")
                ctx.log(f"{name} run {i + 1}/{runs}: {leader} -> {sample.new_leader} in "
                        f"{sample.seconds * 1000:.0f} ms, overlap {worst * 1000:.1f} ms")
    except Exception as exc:
        result.failures.append(f"aborted after {len(measured.samples)} runs: {exc!r}")
        ctx.log(f"{name} FAILED: {traceback.format_exc()}")
        if bc is not None:
            ctx.log(f"agent logs of {name}:\n{bc.cluster.logs()}")
    return measured


def _summarise(result: Result, fault: Fault, target: Target | None, samples: list[Sample],
               gaps: list[float]) -> None:
    result.rows.append(Row(fault.metric, "ms", [s.seconds * 1000 for s in samples], target))
    if fault.key == "broker-restart":
        result.rows.append(Row("broker stopped → primary confirmed (outage)", "ms",
                               [s.extra["outage"] * 1000 for s in samples]))
        moved = sum(int(s.extra["moved"]) for s in samples)
        result.notes.append(f"leadership moved to another node in {moved} of {len(samples)} runs "
                            "(every node observes a full lease from its own reconnect, which backoff jitter "
                            "spreads; the first ready, best-ranked node claims)")
    if fault.key != "failover-kill":  # for a kill the gap is the failover time itself
        result.rows.append(Row("no primary (old tenure's end → new promotion)", "ms", [g * 1000 for g in gaps]))
    if result.missed() and fault.key in WHY_MISSED:
        result.notes.append(WHY_MISSED[fault.key])


def _register(fault: Fault, broker_kind: str, profile: Profile = "default") -> None:
    suffix = "" if profile == "default" else f", {profile} timing profile"

    @scenario(scenario_name(fault, broker_kind, profile=profile), f"{fault.title}, {broker_kind}{suffix}")
    def run(ctx: Context) -> Result:
        return run_fault(ctx, fault, broker_kind, profile=profile)


for _broker in ("mosquitto", "amqtt"):
    for _fault in FAULTS:
        if _fault.key != "failover-cut" or _broker == "mosquitto":  # (namespaces: Mosquitto, as in production)
            _register(_fault, _broker)
# The fast timing profile (issue 13) where it differs: a hang and a partition of the primary.
for _fault in FAULTS:
    if _fault.key in ("failover-stop", "failover-cut"):
        _register(_fault, "mosquitto", "fast")


def _register_signed(fault: Fault) -> None:
    @scenario(f"{fault.key}-mosquitto-signed", f"{fault.title}, mosquitto, signed control messages")
    def run(ctx: Context) -> Result:
        return run_fault(ctx, fault, "mosquitto", signed=True)


# What signing costs where it could show: the two fastest paths (a crash, a handover), beside the unsigned
# rows of the same run.
for _fault in FAULTS:
    if _fault.key in ("failover-kill", "handover-command"):
        _register_signed(_fault)
