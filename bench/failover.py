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

from harness.brokers import AmqttProcess, BrokerProcess, MosquittoProcess
from hasync.config import ElectionConfig

from .cluster import BenchCluster, CommandSender, command_sender
from .registry import Context, scenario
from .report import Result, Row, Target

NODES = {"n1": 300, "n2": 200, "n3": 100}
LEASE = ElectionConfig().lease_duration


def make_broker(kind: str, workdir: Path) -> BrokerProcess:
    if kind == "mosquitto":
        # Persistence as in broker/mosquitto.conf: a graceful restart keeps the retained lease.
        return MosquittoProcess(workdir, persistence=True)
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


def run_fault(ctx: Context, fault: Fault, broker_kind: str, *, signed: bool = False) -> Result:
    name = f"{fault.key}-{broker_kind}" + ("-signed" if signed else "")
    title = f"{fault.title}, {broker_kind}" + (", signed control messages" if signed else "")
    method = METHOD[fault.key] + (" Every node has a signing key (hasync.signing): each lease record, "
                                  "heartbeat and will is signed, and verified by every receiver." if signed else "")
    result = Result(name, title, method)
    # Quick mode: fewer runs on amqtt (the development broker) so the whole quick mode stays short.
    runs = ctx.runs(fault.quick_runs if broker_kind == "mosquitto" else 3, fault.full_runs)
    workdir = ctx.workdir / name
    samples: list[Sample] = []
    overlap: list[float] = []
    gaps: list[float] = []
    bad_runs = 0
    broker = make_broker(broker_kind, workdir / "broker")
    started = time.monotonic()
    bc: BenchCluster | None = None
    broker.start()
    try:
        with contextlib.ExitStack() as stack:
            bc = stack.enter_context(BenchCluster(workdir / "agents", broker.url, NODES, signed=signed))
            sender = (stack.enter_context(command_sender(broker.url, bc.topics))
                      if fault.key == "handover-command" else None)
            env = Env(bc, broker, sender)
            first = bc.wait_stable(timeout=60)
            ctx.log(f"{name}: cluster stable, {first} is primary; {runs} runs")
            for i in range(runs):
                leader = bc.wait_stable(timeout=60)
                since = time.monotonic()
                sample = fault.inject(env, leader)
                bc.wait_stable(timeout=60)
                audit = bc.audit(since)
                samples.append(sample)
                if audit.gap is not None:
                    gaps.append(audit.gap)
                worst = max(audit.overlaps, default=0.0)
                overlap.append(worst)
                if audit.overlaps:
                    bad_runs += 1
                    result.failures.append(f"run {i + 1}: TWO PRIMARIES AT ONCE for {worst * 1000:.1f} ms")
                ctx.log(f"{name} run {i + 1}/{runs}: {leader} -> {sample.new_leader} in "
                        f"{sample.seconds * 1000:.0f} ms, overlap {worst * 1000:.1f} ms")
    except Exception as exc:
        result.failures.append(f"aborted after {len(samples)} runs: {exc!r}")
        ctx.log(f"{name} FAILED: {traceback.format_exc()}")
        if bc is not None:
            ctx.log(f"agent logs of {name}:\n{bc.cluster.logs()}")
    finally:
        broker.stop()
    result.seconds = time.monotonic() - started
    result.overlap = (len(overlap), bad_runs, max(overlap, default=0.0))
    _summarise(result, fault, broker_kind, samples, gaps)
    return result


def _summarise(result: Result, fault: Fault, broker_kind: str, samples: list[Sample], gaps: list[float]) -> None:
    result.rows.append(Row(fault.metric, "ms", [s.seconds * 1000 for s in samples], fault.target(broker_kind)))
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


def _register(fault: Fault, broker_kind: str) -> None:
    @scenario(f"{fault.key}-{broker_kind}", f"{fault.title}, {broker_kind}")
    def run(ctx: Context) -> Result:
        return run_fault(ctx, fault, broker_kind)


for _broker in ("mosquitto", "amqtt"):
    for _fault in FAULTS:
        _register(_fault, _broker)


def _register_signed(fault: Fault) -> None:
    @scenario(f"{fault.key}-mosquitto-signed", f"{fault.title}, mosquitto, signed control messages")
    def run(ctx: Context) -> Result:
        return run_fault(ctx, fault, "mosquitto", signed=True)


# What signing costs where it could show: the two fastest paths (a crash, a handover), beside the unsigned
# rows of the same run.
for _fault in FAULTS:
    if _fault.key in ("failover-kill", "handover-command"):
        _register_signed(_fault)
