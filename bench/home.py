"""The two-node home end to end (issue 12), hasync against keepalived in the same run: both move the same
floating IP and run the same dnsmasq in the same network namespaces (harness.home), under the same faults,
measured by the same client (HTTP over IPv4 and IPv6, DNS, DHCP). hasync twice: its resources (the floating IPs,
the dnsmasq hooks) fenced through a broker loss, the default, and kept. For each fault, hasync fenced's runs,
hasync kept's, then keepalived's (each system started afresh for the fault), so load on the shared machine
drifts as little as possible between the columns.
"""

from __future__ import annotations

import io
import time
import traceback
from collections.abc import Callable, Sequence

from harness.home import (
    ADVERT_INT,
    KEEPALIVED_NOTIFY,
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
TITLE = ("the two-node home end to end: hasync's floating IP and dnsmasq (fenced, kept) against keepalived, "
         "same namespaces, same faults")
HOLD = 1.0  # s a fault stands after the other node answers
EXPLAIN = 5.0  # s: a run whose outage is longer has its observers' records logged
SYSTEMS = ("hasync-fenced", "hasync-kept", "keepalived")
BASELINE = "keepalived"
PROBES = (("http", "HTTP IPv4"), ("http6", "HTTP IPv6"), ("dns", "DNS"), ("dhcp", "DHCP"))

FAULT_TEXT = {
    Fault.KILL: "kill -9 of the agent (keepalived: its whole process group)",
    Fault.STOP: "SIGSTOP of the agent (keepalived: of it)",
    Fault.LINK: "the primary's link down",
    Fault.CUT: "hasync: the primary cut off from the broker only; keepalived: the two nodes from each other",
    Fault.BROKER: "the broker killed, restarted at once (keepalived: n/a)",
    Fault.STEP_DOWN: "`hasync step-down`; keepalived stopped gracefully (SIGTERM), started again",
}

# The targets, on the medians: hasync's client outage at most this share of keepalived's.
OUTAGE_TARGET = {Fault.KILL: 0.1, Fault.STOP: 1.0, Fault.LINK: 1.0}
FENCE_TARGET = (Fault.STOP, Fault.LINK)  # zero double-holder time where keepalived shows some

METHOD = (
    "Network namespaces on one bridge (`harness/home.py`): two nodes, each with a stand-in for Home Assistant "
    "(HTTP on port 8123, IPv4 and IPv6, answering with its node's name) and dnsmasq (DHCP for the LAN, and DNS "
    "answering `whoami.test` with its node's own address), both run by the system under test, which also moves "
    "the floating IP; Mosquitto in a namespace of its own; a client namespace that, continuously and each on "
    "its own schedule, GETs `http://<floating IPv4>:8123/` and `http://[<floating IPv6>]:8123/` on a new "
    "connection every 25 ms (timeout 0.5 s), asks the floating IPv4 for `whoami.test` every 50 ms (UDP, "
    "timeout 0.5 s, no retry), and does a DHCP exchange every 100 ms (DISCOVER with the broadcast flag, REQUEST "
    "of the first offer, ACK within 1 s, from one client MAC; offers are collected for 0.2 s, so a second DHCP "
    "server shows), recording every answer and failure with its time and the node that answered. `ip -ts "
    "monitor address` in both nodes records when each held each floating IP, `ip -ts monitor neigh` in the "
    "client where its ARP and IPv6 neighbour entries pointed. "
    "**hasync** (`hasync-fenced`, `hasync-kept`): production timings (lease "
    f"{PRODUCTION['lease_duration']:g} s, renew deadline {PRODUCTION['renew_deadline']:g} s), broker keepalive "
    "5 s, priorities 200/150, `preempt: false`, `vip:` an IPv4 (/24) and an IPv6 (/64) address, the dnsmasq "
    "recipe as `examples/dnsmasq/` has it (its `dnsmasq.sh` as the promote and demote hook, by pidfile: no "
    "systemd in the namespaces; `on_promote_failure: handover`; a `dns` check of the node's own dnsmasq with "
    "`when: primary`, interval 5 s; an `interface` check of eth0), an http health check on the stand-in; "
    "`on_broker_loss` of both addresses and of the hooks `fenced` (the default) or `kept`. **keepalived** "
    "(Debian's package): the seed's configuration, VRRP over multicast (224.0.0.18, keepalived's default; it "
    f"crosses a Linux bridge between namespaces), `advert_int {ADVERT_INT:g}`, n1 `state MASTER` priority 150, "
    "n2 `BACKUP` 100 (so it preempts back), a `vrrp_script` running `curl` against the local stand-in every 2 s "
    "(fall 2, rise 2) in `track_script`, the IPv4 floating IP only (the seed has no IPv6 address), no fencing; "
    "and, added to it for dnsmasq as keepalived users do, notify scripts: "
    + ", ".join(f"`{line.strip()}`" for line in KEEPALIVED_NOTIFY.format(script="notify.sh").splitlines())
    + " (`master` starts dnsmasq, the others stop it: what `systemctl start|stop dnsmasq` would do, here the "
    "recipe's own script by pidfile, so both systems start and stop dnsmasq the same way). "
    "Each run waits until the pair is steady (one node holds the floating IPs, the other none, the client's "
    "last answers of every probe all from it alone, DHCP offers included, and a quiet period: a lease + 1.5 s "
    "for hasync, 3 advert_int + 1 s for keepalived), injects the fault into the holder, waits for the other "
    f"node to hold the addresses and answer every probe, lets the fault stand {HOLD:g} s more, lifts it "
    "(restart, SIGCONT, link up, rules removed) and waits until steady again. **Outage**: per probe, the "
    "longest time between two answers' arrivals during which attempts failed, from the fault until the fault "
    "is lifted (0: no attempt failed; the resolution is the probe's interval). **Two holders**: the time both "
    "nodes had the floating IP configured, from the fault until steady again. **Two DHCP servers**: DHCP "
    "exchanges that two servers offered to (how many, and the longest run of them, first DISCOVER to last "
    "answer), over the same window. Where the old holder cannot act (killed, frozen) both last until the fault "
    f"is lifted, so about the failover + {HOLD:g} s by construction. **ARP / IPv6 neighbour**: from the fault "
    "to the client's entry for the floating IP pointing at the new holder's MAC, as `ip monitor neigh` "
    "reported it (runs where it did, of those where the holder changed).")


def _label(system: str) -> str:
    return {"hasync-fenced": "hasync, fenced", "hasync-kept": "hasync, kept"}.get(system, system)


def _range(values: Sequence[float]) -> str:
    """min / median / max in ms."""
    if not values:
        return "n/a"
    s = Summary.of([v * 1000 for v in values])
    return f"{fmt(s.min)} / {fmt(s.median)} / {fmt(s.max)}"


def _median(values: Sequence[float]) -> float:
    return Summary.of(values).median


def ratio(ours: Sequence[float], theirs: Sequence[float]) -> tuple[str, float | None]:
    """hasync's median over keepalived's, as text and value (None: nothing to compare)."""
    if not ours or not theirs:
        return "—", None
    a, b = _median(ours), _median(theirs)
    if b == 0:
        return ("— (both 0)", 0.0) if a == 0 else ("∞ (keepalived 0)", float("inf"))
    return f"{a / b:.2f}", a / b


def _outages(rows: list[Sample], probe: str) -> list[float]:
    return [s.outage[probe] for s in rows if probe in s.outage]


def _holders(rows: list[Sample], family: str) -> list[float]:
    return [s.two_holders[family] for s in rows if family in s.two_holders]


def _moved(rows: list[Sample], family: str) -> str:
    """Runs whose client's neighbour entry moved to the new holder, of those where the holder changed."""
    changed = [s for s in rows if s.new != s.old and family in s.moved]
    if not changed:
        return "n/a"
    switched = [t for s in changed if (t := s.moved[family]) is not None]
    text = f"{len(switched)}/{len(changed)}"
    return text + (f", median {fmt(_median(switched) * 1000)} ms" if switched else "")


def _dhcp(rows: list[Sample]) -> str:
    """DHCP exchanges answered by two servers: in how many runs, how many in all, the longest run of them."""
    if not rows:
        return "n/a"
    doubled = [s for s in rows if s.two_dhcp.count]
    if not doubled:
        return "0"
    return (f"{len(doubled)}/{len(rows)} runs, {sum(s.two_dhcp.count for s in rows)} exchanges, max "
            f"{fmt(max(s.two_dhcp.seconds for s in rows) * 1000)} ms")


def verdicts(fault: Fault, ours: list[Sample], theirs: list[Sample]) -> tuple[str, str]:
    """The issue's targets for one hasync system under ``fault`` against keepalived's runs: (targets, verdicts)."""
    targets, found = [], []
    if fault in OUTAGE_TARGET and ours and theirs:
        limit = OUTAGE_TARGET[fault]
        for probe, label in PROBES:
            _, value = ratio(_outages(ours, probe), _outages(theirs, probe))
            if value is not None:
                targets.append(f"{label} outage ≤ {limit:g} of keepalived's")
                found.append(f"{label} {'met' if value <= limit else '**MISSED**'}")
    if fault in FENCE_TARGET and ours and theirs:
        if max(_holders(theirs, "ipv4"), default=0) > 0:
            targets.append("no two holders")
            found.append("two holders " + ("met" if max(_holders(ours, "ipv4")) == 0 else "**MISSED**"))
        if any(s.two_dhcp.count for s in theirs):
            targets.append("no two DHCP servers")
            found.append("two DHCP servers " + ("met" if not any(s.two_dhcp.count for s in ours) else "**MISSED**"))
    return "; ".join(targets) or "—", "; ".join(found) or "(no target)"


def outage_table(samples: dict[tuple[str, Fault], list[Sample]]) -> str:
    """Per fault and system: the client's outage per probe (min / median / max, ms), its ratio to keepalived's
    (medians), the issue's targets and verdicts."""
    lines = ["| fault | system | runs | " + " | ".join(f"{label}, ms" for _, label in PROBES)
             + " | ratio to keepalived (HTTP / DNS / DHCP) | target | verdict |",
             "|---|---|--:|" + "--:|" * len(PROBES) + "--:|---|---|"]
    for fault in Fault:
        baseline = samples.get((BASELINE, fault), [])
        for system in SYSTEMS:
            rows = samples.get((system, fault), [])
            if not rows:
                continue
            cells = " | ".join(_range(_outages(rows, probe)) for probe, _ in PROBES)
            ratios = "—" if system == BASELINE else " / ".join(
                ratio(_outages(rows, p), _outages(baseline, p))[0] for p in ("http", "dns", "dhcp"))
            target, verdict = ("—", "(baseline)") if system == BASELINE else verdicts(fault, rows, baseline)
            lines.append(f"| {fault}: {FAULT_TEXT[fault]} | {_label(system)} | {len(rows)} | {cells} | {ratios} "
                         f"| {target} | {verdict} |")
    return "\n".join(lines)


def holders_table(samples: dict[tuple[str, Fault], list[Sample]]) -> str:
    """Per fault and system: two holders of each floating IP, two DHCP servers, answers from both, the outage
    when the fault is lifted, and the client's neighbour entries."""
    lines = ["| fault | system | IPv4 on both nodes, ms | IPv6 on both nodes, ms | two DHCP servers "
             "| HTTP answers from both, max ms | outage when lifted, max ms (HTTP / DNS / DHCP) "
             "| ARP on new holder | IPv6 neighbour on new holder |",
             "|---|---|--:|--:|---|--:|--:|---|---|"]
    for fault in Fault:
        for system in SYSTEMS:
            rows = samples.get((system, fault), [])
            if not rows:
                continue
            lifted = " / ".join(fmt(max(s.restore_outage.get(p, 0.0) for s in rows) * 1000)
                                for p in ("http", "dns", "dhcp"))
            lines.append(
                f"| {fault} | {_label(system)} | {_range(_holders(rows, 'ipv4'))} | {_range(_holders(rows, 'ipv6'))} "
                f"| {_dhcp(rows)} | {fmt(max(s.both_answered for s in rows) * 1000)} | {lifted} "
                f"| {_moved(rows, 'ipv4')} | {_moved(rows, 'ipv6')} |")
    return "\n".join(lines)


def rows(samples: dict[tuple[str, Fault], list[Sample]]) -> list[Row]:
    found: list[Row] = []
    for (system, fault), runs in samples.items():
        found += [
            Row(f"{fault}, {_label(system)}: client outage, HTTP IPv4", "ms", [s.outage["http"] * 1000 for s in runs]),
            Row(f"{fault}, {_label(system)}: fault → new holder answers", "ms", [s.failover * 1000 for s in runs]),
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
                outage = ", ".join(f"{p} {v * 1000:.0f}" for p, v in sample.outage.items())
                lifted = ", ".join(f"{p} {v * 1000:.0f}" for p, v in sample.restore_outage.items())
                log(f"{NAME} {system.name} {fault} {i + 1}/{runs}: {sample.old} -> {sample.new}, outage ms {outage}, "
                    f"two holders {max(sample.two_holders.values()) * 1000:.0f} ms, two DHCP servers "
                    f"{sample.two_dhcp.count}x {sample.two_dhcp.seconds * 1000:.0f} ms, answered after "
                    f"{sample.failover * 1000:.0f} ms, outage when lifted ms {lifted}")
                if max(sample.outage.values()) > EXPLAIN or max(sample.restore_outage.values()) > EXPLAIN:
                    log(f"{NAME} {system.name} {fault} {i + 1}/{runs}, what the observers saw:\n"
                        f"{home.changes(sample.at)}")
    except Exception:
        log(f"{NAME} {system.name} {fault} FAILED:\n{traceback.format_exc()}\n{out.getvalue()}")
        raise
    return found


def systems(home: Home) -> list[System]:
    return [HasyncPair(home, "fenced"), HasyncPair(home, "kept"), KeepalivedPair(home)]


NOTES = [
    "cut, keepalived: VRRP has no broker; the comparable fault is the election's channel cut, here every "
    "packet between the two nodes dropped (iptables in both namespaces): both become master.",
    "broker, keepalived: not applicable. hasync fenced: a primary that loses the broker removes the addresses "
    "and stops dnsmasq at its renew deadline, so the house loses the floating IP, DNS and DHCP until the "
    "broker is back and a lease has been observed. hasync kept: the primary keeps them through the outage.",
    "cut, hasync kept: the documented trade-off of `on_broker_loss: kept`. The old primary, cut off from the "
    "broker but not from the LAN, keeps the addresses and dnsmasq until it reaches the broker again and sees "
    "the new primary's term, so both nodes hold them (and both DHCP servers answer) for the whole cut and "
    "until it reconnects: the hold + the reconnection here, as long as the cut in a real one.",
    "link, hasync kept: the same trade-off once the cable is plugged back. While the link is down the old "
    "primary reaches nobody (its two holders are not seen by anyone); plugged back, it is on the LAN again "
    "before its connection to the broker recovers (TCP's retransmission backoff, or a reconnect), and until "
    "it reads the new primary's term both nodes hold the addresses and both DHCP servers answer. Fenced: none.",
    "step-down, hasync: the release waits for the demote hook (here the recipe's, stopping dnsmasq) and the "
    "addresses go before it, so the client's outage is the hook's time plus the successor's claim. "
    "`hasync step-down` itself adds ~2 s of CLI start-up before the fault begins to act (not in the outage).",
    "kill -9 and SIGSTOP take down the agent (or keepalived) only: the node's Home Assistant and its dnsmasq "
    "keep answering. keepalived's node keeps the address (two holders until keepalived is restarted or thawed; "
    "the client talks to the old node until the new holder's gratuitous ARP, so it sees no outage). hasync's "
    "fenced addresses do not stay: after kill -9 the agent's guardian removes them within milliseconds, before "
    "the new primary (elected on the Last Will) adds them; a frozen agent's addresses reach the end of their "
    "kernel lifetime (1 s from its last renewal that came back) before a lease of silence lets the other node "
    "claim, so the client sees the gap between the two (the issue's SIGSTOP targets, no two holders and an "
    "outage no longer than keepalived's, cannot both be met: keepalived's 0 ms is its two holders). kept "
    "addresses have no lifetime: a frozen agent keeps them, as a node cut off from the broker does. "
    "The DNS outage after a kill -9 is the new holder's dnsmasq starting: the address moves (and is announced) "
    "first, the promote hook (keepalived: notify_master) starts dnsmasq after; whether a DNS query falls into "
    "that gap (about 0.1 s) depends on the probe's phase: 0 or about 100 ms, for both systems alike. The old "
    "node's dnsmasq, a process the hook started, is stopped by the guardian's fence command (`hooks.fence`, the "
    "recipe's `dnsmasq.sh`): at once after kill -9 (fenced and kept alike), at the renew deadline + 0.5 s when "
    "the agent is frozen (fenced only: kept hooks outlive a stall, so under SIGSTOP kept shows two DHCP servers "
    "like keepalived); fenced, SIGSTOP's DHCP outage is the gap from that fence to the new primary's dnsmasq.",
    "link: hasync's lease (3 s after the last renewal it received) and keepalived's master-down timer (3 "
    "advert_int and the skew after the last advert) are the same gap by design; a verdict on the ratio of "
    "two equal medians is noise.",
    "Two holders of a few milliseconds are within the observers' resolution: `ip monitor` stamps an event "
    "when it reads it, which a loaded machine delays (at a load of 9, a hasync step-down without hooks showed "
    "2.6 ms of two holders, where by construction the successor adds the address only after the release that "
    "follows its removal).",
]


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
            ctx.log(f"{NAME}: home up, floating IPs {home.vips.v4}, {home.vips.v6}; {runs} runs per fault and "
                    f"system")
            for fault in Fault:
                for system in systems(home):
                    if system.supports(fault):
                        samples[(system.name, fault)] = measure(home, system, fault, runs, ctx.log)
    except Exception as exc:
        result.failures.append(f"aborted after {sum(map(len, samples.values()))} runs: {exc!r}")
    result.seconds = time.monotonic() - started
    result.rows = rows(samples)
    result.extra = ("Client-visible outage per probe, min / median / max over the runs (ms):\n\n"
                    + outage_table(samples)
                    + "\n\nTwo holders, two DHCP servers and the client's neighbour entries (ms: min / median / "
                    "max, or the maximum where it says so):\n\n" + holders_table(samples))
    result.notes += NOTES
    return result
