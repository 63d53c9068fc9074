"""The two-node home end to end (issue 12), hasync against keepalived in the same run: both move the same
floating IP in the same network namespaces (harness.home), under the same faults, measured by the same
client. For each fault, hasync's runs, then keepalived's (each system started afresh for the fault),
so load on the shared machine drifts as little as possible between the two columns.
"""

from __future__ import annotations

import io
import time
import traceback
from collections.abc import Callable, Sequence

from harness.home import (
    ADVERT_INT,
    PRODUCTION,
    Fault,
    HasyncPair,
    Home,
    KeepalivedPair,
    Sample,
    System,
    keepalived_binary,
    running,
    unavailable,
)

from .registry import Context, scenario
from .report import Result, Row, fmt
from .stats import Summary

NAME = "home-keepalived"
TITLE = "the two-node home end to end: hasync's floating IP against keepalived, same namespaces, same faults"
HOLD = 1.0  # s a fault stands after the other node answers

FAULT_TEXT = {
    Fault.KILL: ("kill -9 of the agent", "kill -9 of keepalived (its whole process group)"),
    Fault.STOP: ("SIGSTOP of the agent", "SIGSTOP of keepalived"),
    Fault.LINK: ("the primary's link down", "the master's link down"),
    Fault.CUT: ("the primary cut off from the broker only", "the two nodes cut off from each other"),
    Fault.BROKER: ("the broker killed, restarted at once", "n/a (VRRP has no broker)"),
    Fault.STEP_DOWN: ("`hasync step-down`", "keepalived stopped gracefully (SIGTERM), started again"),
}

# The targets, on the medians: hasync's outage at most this share of keepalived's.
OUTAGE_TARGET = {Fault.KILL: 0.1, Fault.STOP: 1.0, Fault.LINK: 1.0}
FENCE_TARGET = (Fault.STOP, Fault.LINK)  # zero two-holder time where keepalived shows some

METHOD = (
    "Network namespaces on one bridge (`harness/home.py`): two nodes, each with a stand-in for Home Assistant "
    "(HTTP on port 8123, answering with its node's name) and the system under test moving one floating IPv4 "
    "address; Mosquitto in a namespace of its own; a client namespace that GETs `http://<floating IP>:8123/` "
    "on a new connection every 25 ms (timeout 0.5 s) and records every answer and failure. `ip -ts monitor "
    "address` in both nodes records when each held the address, `ip -ts monitor neigh` in the client where "
    "its ARP entry pointed. **hasync**: production timings (lease "
    f"{PRODUCTION['lease_duration']:g} s, renew deadline {PRODUCTION['renew_deadline']:g} s), broker keepalive "
    "5 s, `vip:` with the default fencing, an http health check on the stand-in, priorities 200/150, "
    "`preempt: false`. **keepalived** (Debian's package): the seed's configuration, VRRP over multicast "
    f"(224.0.0.18, keepalived's default; it crosses a Linux bridge between namespaces), `advert_int "
    f"{ADVERT_INT:g}`, n1 `state MASTER` priority 150, n2 `BACKUP` 100 (so it preempts back), a `vrrp_script` "
    "running `curl` against the local stand-in every 2 s (fall 2, rise 2) in `track_script`, no fencing. "
    "Each run waits until the pair is steady (one holder, the client's last answers all from it, and a "
    "quiet period: a lease + 1.5 s for hasync, 3 advert_int + 1 s for keepalived), "
    "injects the fault into the holder, waits for the other node to answer the client, lets the fault "
    f"stand {HOLD:g} s more, lifts it (restart, SIGCONT, link up, rules removed) and waits until steady "
    "again. **Outage**: the longest time between two answers' arrivals during which requests failed, from "
    "the fault until the fault is lifted (0: no request failed). **Two holders**: the time both nodes had "
    "the address configured, from the fault until steady again; where the old holder cannot act and nothing "
    f"removes its address (keepalived killed or frozen) it lasts until the fault is lifted, so about the "
    f"failover + {HOLD:g} s by construction. "
    "**ARP**: from the fault to the client's entry for the address pointing at the new holder's MAC, as "
    "`ip monitor neigh` reported it (runs where it did, of those where the holder changed).")


def _ms(values: Sequence[float]) -> list[float]:
    return [v * 1000 for v in values]


def _range(values: Sequence[float]) -> str:
    if not values:
        return "—"
    s = Summary.of(values)
    return f"{fmt(s.min)} / {fmt(s.median)} / {fmt(s.max)}"


def _ratio(ours: Sequence[float], theirs: Sequence[float]) -> tuple[str, float | None]:
    if not ours or not theirs:
        return "—", None
    a, b = Summary.of(ours).median, Summary.of(theirs).median
    if b == 0:
        return ("— (both 0)", 0.0) if a == 0 else ("∞ (keepalived 0)", float("inf"))
    return f"{a / b:.2f}", a / b


def _col(rows: list[Sample], field: str) -> str:
    return _range(_ms([getattr(s, field) for s in rows])) if rows else "n/a"


def _most(ours: list[Sample], theirs: list[Sample], field: str) -> str:
    return " / ".join(fmt(max(getattr(s, field) for s in rows) * 1000) if rows else "n/a" for rows in (ours, theirs))


def _arp(rows: list[Sample]) -> str:
    """Runs whose client's ARP entry moved to the new holder, of those where the holder changed."""
    if not rows:
        return "n/a"
    switched = [s.arp for s in rows if s.arp is not None]
    text = f"{len(switched)}/{sum(1 for s in rows if s.new != s.old)}"
    return text + (f", median {fmt(Summary.of(switched).median * 1000)} ms" if switched else "")


def side_by_side(samples: dict[tuple[str, Fault], list[Sample]]) -> str:
    """hasync beside keepalived per fault: the outage (min / median / max, ms) and its ratio, two holders,
    answers from both, the outage when the fault is lifted, the ARP entry's switch, and the issue's targets."""
    lines = [
        "| fault (hasync / keepalived) | runs | outage hasync, ms | outage keepalived, ms | ratio of medians "
        "| two holders hasync, ms | two holders keepalived, ms | answers from both, max ms (h / k) "
        "| outage when lifted, max ms (h / k) | ARP on new holder (h / k) | target | verdict |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for fault in Fault:
        ours = samples.get(("hasync", fault), [])
        theirs = samples.get(("keepalived", fault), [])
        if not ours and not theirs:
            continue
        ratio, value = _ratio([s.outage for s in ours], [s.outage for s in theirs])
        targets, verdicts = [], []
        if fault in OUTAGE_TARGET and value is not None:
            limit = OUTAGE_TARGET[fault]
            targets.append(f"outage ≤ {limit:g} of keepalived's")
            verdicts.append("met" if value <= limit else "**MISSED**")
        if fault in FENCE_TARGET and ours and theirs and max(s.two_holders for s in theirs) > 0:
            targets.append("no two holders")
            verdicts.append("met" if max(s.two_holders for s in ours) == 0 else "**MISSED**")

        h, k = FAULT_TEXT[fault]
        lines.append(
            f"| {fault}: {h} / {k} | {len(ours)} / {len(theirs)} | {_col(ours, 'outage')} "
            f"| {_col(theirs, 'outage')} | {ratio} | {_col(ours, 'two_holders')} "
            f"| {_col(theirs, 'two_holders')} | {_most(ours, theirs, 'both_answered')} "
            f"| {_most(ours, theirs, 'restore_outage')} | {_arp(ours)} / {_arp(theirs)} "
            f"| {'; '.join(targets) or '—'} | {'; '.join(verdicts) or '(no target)'} |")
    return "\n".join(lines)


def rows(samples: dict[tuple[str, Fault], list[Sample]]) -> list[Row]:
    found: list[Row] = []
    for (system, fault), runs in samples.items():
        found += [
            Row(f"{fault}, {system}: client outage", "ms", _ms([s.outage for s in runs])),
            Row(f"{fault}, {system}: two holders of the address", "ms", _ms([s.two_holders for s in runs])),
            Row(f"{fault}, {system}: fault → new holder answers", "ms", _ms([s.failover for s in runs])),
        ]
    return found


def measure(home: Home, system: System, fault: Fault, runs: int, log: Callable[[str], None]) -> list[Sample]:
    found: list[Sample] = []
    out = io.StringIO()
    try:
        with running(system, home, out):
            for i in range(runs):
                sample = home.measure(system, fault)
                found.append(sample)
                log(f"{NAME} {system.name} {fault} {i + 1}/{runs}: {sample.old} -> {sample.new}, outage "
                    f"{sample.outage * 1000:.0f} ms, two holders {sample.two_holders * 1000:.0f} ms, answered "
                    f"after {sample.failover * 1000:.0f} ms, outage when lifted {sample.restore_outage * 1000:.0f} ms")
    except Exception:
        log(f"{NAME} {system.name} {fault} FAILED:\n{traceback.format_exc()}\n{out.getvalue()}")
        raise
    return found


@scenario(NAME, TITLE)
def home_keepalived(ctx: Context) -> Result:
    result = Result(NAME, TITLE, METHOD)
    why = unavailable() or (None if keepalived_binary() else "keepalived is not installed")
    if why is not None:
        result.rows.append(Row("client outage", "ms", pending=f"TODO: not run, {why}"))
        return result
    runs = ctx.runs(1, 5)
    samples: dict[tuple[str, Fault], list[Sample]] = {}
    started = time.monotonic()
    try:
        with Home(ctx.workdir / NAME, hold=HOLD) as home:
            ctx.log(f"{NAME}: home up, floating IP {home.vip}; {runs} runs per fault and system")
            for fault in Fault:
                for system in (HasyncPair(home), KeepalivedPair(home)):
                    if system.supports(fault):
                        samples[(system.name, fault)] = measure(home, system, fault, runs, ctx.log)
    except Exception as exc:
        result.failures.append(f"aborted after {sum(map(len, samples.values()))} runs: {exc!r}")
    result.seconds = time.monotonic() - started
    result.rows = rows(samples)
    result.extra = side_by_side(samples)
    result.notes += [
        "cut, keepalived: VRRP has no broker; the comparable fault is the election's channel cut, here "
        "every packet between the two nodes dropped (iptables in both namespaces): both become master.",
        "broker, keepalived: not applicable. hasync's default `vip:` is fenced: a primary that loses the "
        "broker removes the address at its renew deadline, so the house loses the floating IP until the "
        "broker is back and a lease has been observed.",
        "kill -9 and SIGSTOP take down the agent (or keepalived) only; the node's Home Assistant keeps "
        "answering. keepalived's node keeps the address (two holders until keepalived is restarted or thawed; "
        "the client talks to the old node until the new holder's gratuitous ARP, so it sees no outage). "
        "hasync's does not: after kill -9 the agent's guardian removes it within milliseconds, before the "
        "new primary (elected on the Last Will) adds it; a frozen agent's address reaches the end of its "
        "lifetime (1 s from its last renewal that came back) before a lease of silence lets the other node "
        "claim, so the client sees the gap between the two (the issue's SIGSTOP targets, no two holders and "
        "an outage no longer than keepalived's, cannot both be met: keepalived's 0 ms is its two holders).",
    ]
    return result
