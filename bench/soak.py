"""The fast timing profile's soak: does it ever fail over when nothing failed? (issue 13)

Two agents (real processes, memory sync backend) on Mosquitto in the fast profile (``election: {profile:
fast}``), 1,000 entity changes a second made on the primary through its HTTP API and applied by the standby,
and a CPU burner (a Python busy loop) pinned to the machine's second core, for ``--soak-seconds`` (an hour by
default). Not part of ``--quick`` or ``--full``: run it with ``--only soak-fast``. ``soak-default`` is the
same with the default timings, the baseline for the same machine and load.

The agents and the burner each run in a session of their own: with the kernel's autogroup scheduling, a
session is what shares the CPU, so they compete like separate services (in production each agent has a
machine of its own).

What it counts: leadership changes and demotions (the agents' events: with no fault injected, every one is a
false failover); sync updates made and applied; the 1-minute load average every 10 s (the machine may be
shared: other processes add to the burner). How close the profile came to a false failover, two ways:

* the **renewal margin** (the primary's own view, ``hasync_renewal_margin_seconds``): its renew deadline
  less the time each renewal came back, which extends it. At 0 it demotes itself. Nominally
  ``renew_deadline - renew_interval - echo`` (0.6 s); a stalled event loop, a late renewal or a slow echo
  eat into it. From the histogram (buckets of 2.5 % of the deadline), so min / p1 / p50 are bucket bounds.
* the **silence** a follower sees: the time between consecutive lease records on the broker, as a paho
  client in the benchmark's process receives them (exact, but it includes the benchmark's own scheduling
  delays, so it errs on the side of danger). At ``lease_duration`` a follower would claim.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from harness.agents import AgentProcess, LeaseRecorder
from harness.brokers import MosquittoProcess
from harness.wait import wait_until
from hasync.config import Profile

from .cluster import BenchCluster, profile_config
from .footprint import cpu_seconds, rss_mib
from .registry import Context, scenario
from .report import Result, Row, Target, fmt
from .stats import percentile
from .syncbench import background_load

NODES = {"n1": 200, "n2": 100}
RATE = 1000  # entity changes per second
SAMPLE = 10.0  # s between two load-average samples
PROGRESS = 300.0  # s between two progress lines
MARGIN = "hasync_renewal_margin_seconds"
LAG = "hasync_event_loop_lag_seconds"
GC = ("hasync_gc_pause_seconds", 'generation="2",')  # full collections


@contextlib.contextmanager
def burner(cpu: int) -> Iterator[subprocess.Popen[bytes]]:
    """A Python busy loop pinned to ``cpu`` (the machine's other core), until the block ends."""
    # A session of its own: another service's load, not a share of the benchmark's (autogroup scheduling).
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        if cpu < (os.cpu_count() or 1):
            os.sched_setaffinity(process.pid, {cpu})
        yield process
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)


def buckets(agent: AgentProcess, histogram: str, labels: str = "") -> dict[float, float]:
    """One of the agent's histograms: cumulative count per upper bound (seconds); ``labels`` as the text
    before ``le`` (``generation="2",``)."""
    _, text = agent.http("/metrics")
    pattern = re.compile(rf'^{histogram}_bucket{{{re.escape(labels)}le="([^"]+)"}} (\S+)$', re.MULTILINE)
    return {float(le): float(count) for le, count in pattern.findall(text)}


def histogram_quantile(buckets: dict[float, float], q: float) -> float:
    """The ``q``-quantile (0-1) of a cumulative histogram, interpolated linearly within its bucket (as
    Prometheus does); the first bucket's lower bound is taken as its upper bound."""
    bounds = sorted(b for b in buckets if math.isfinite(b))
    total = buckets.get(math.inf, buckets[bounds[-1]] if bounds else 0.0)
    if total <= 0:
        raise ValueError("an empty histogram")
    rank, below, lower = q * total, 0.0, bounds[0]
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            inside = count - below
            return bound if inside <= 0 else lower + (bound - lower) * (rank - below) / inside
        below, lower = count, bound
    return bounds[-1]


def _lowest(buckets: dict[float, float]) -> str:
    """The bucket of the smallest observation, as ``(a, b]`` seconds."""
    bounds = sorted(b for b in buckets if math.isfinite(b))
    for i, bound in enumerate(bounds):
        if buckets[bound] > 0:
            return f"≤ {fmt(bound * 1000)}" if i == 0 else f"{fmt(bounds[i - 1] * 1000)}-{fmt(bound * 1000)}"
    return "none"


def _subtract(after: dict[float, float], before: dict[float, float]) -> dict[float, float]:
    return {le: count - before.get(le, 0.0) for le, count in after.items()}


@dataclass
class Soaked:
    """What one soak saw (times are monotonic; ``events`` and ``records`` are those within the window)."""

    window: float = 0.0
    made: float = 0.0
    applied: float = 0.0
    burner: float = 0.0  # % of a core
    loads: list[float] = field(default_factory=list)
    rss: dict[str, list[float]] = field(default_factory=dict)  # MiB, each agent every 10 s
    margins: dict[float, float] = field(default_factory=dict)  # both agents' histograms, summed
    lags: dict[str, dict[float, float]] = field(default_factory=dict)  # each agent's loop lag and GC histograms
    events: list[dict[str, Any]] = field(default_factory=list)
    records: list[float] = field(default_factory=list)  # when each lease record reached the recorder
    start: float = 0.0


@scenario("soak-fast", "fast timing profile: false failovers over a soak at 1,000 sync updates/s, other core "
          "loaded, Mosquitto", modes=())
def soak_fast(ctx: Context) -> Result:
    return soak(ctx, "fast")


@scenario("soak-default", "default timings: false failovers over a soak at 1,000 sync updates/s, other core "
          "loaded, Mosquitto (soak-fast's baseline)", modes=())
def soak_default(ctx: Context) -> Result:
    return soak(ctx, "default")


def soak(ctx: Context, profile: Profile) -> Result:
    name = f"soak-{profile}"
    config = profile_config(profile)
    lease, deadline = config.election.lease_duration, config.election.renew_deadline
    result = Result(name, f"{profile} timing profile soak ({ctx.soak_seconds / 60:.0f} min), 1,000 sync "
                    "updates/s, other core loaded, Mosquitto",
                    __doc__.split("\n\n", 1)[1].replace("\n", " ") if __doc__ else "")
    workdir = ctx.workdir / name
    broker = MosquittoProcess(workdir / "broker", quiet=True)
    started = time.monotonic()
    broker.start()
    try:
        with BenchCluster(workdir / "agents", broker.url, NODES, profile=profile, new_session=True,
                          sync={"backend": "memory", "max_entities": 100_000}) as bc, \
                LeaseRecorder(broker.url, bc.prefix) as recorder, burner(1) as burn:
            soaked = _soak(ctx, name, bc, recorder, burn.pid)
    finally:
        broker.stop()
    result.seconds = time.monotonic() - started
    promotions = [e for e in soaked.events if e["event"] == "promote"]
    demotions = [e for e in soaked.events if e["event"] == "demote"]
    silences = [(b - a) * 1000 for a, b in itertools.pairwise(soaked.records)]
    result.rows += [
        Row("leadership changes (promotions during the soak)", "count", [float(len(promotions))], Target("max", 0)),
        Row("demotions during the soak", "count", [float(len(demotions))], Target("max", 0)),
        Row("silence between lease records, as a follower sees it", "ms", silences, Target("max", lease * 1000)),
        Row("1-minute load average, every 10 s", "", soaked.loads),
        *[Row(f"RSS of {node}, every 10 s", "MiB", rss) for node, rss in sorted(soaked.rss.items())],
    ]
    result.extra = _margins_table(soaked.margins, silences, lease, deadline) + "\n\n" + _lag_table(soaked.lags)
    window, start = soaked.window, soaked.start
    result.notes += [
        f"{window:.0f} s; sync updates made on the primary {soaked.made:,.0f} ({soaked.made / window:,.0f}/s), "
        f"applied on the standby {soaked.applied:,.0f}; the burner used {soaked.burner:.0f} % of a core",
        *[f"{e['node']} promoted (term {e['term']}) at +{e['t'] - start:.1f} s" for e in promotions],
        *[f"{e['node']} demoted at +{e['t'] - start:.1f} s: {e.get('cause')} ({e.get('reason')})" for e in demotions],
    ]
    return result


def _soak(ctx: Context, name: str, bc: BenchCluster, recorder: LeaseRecorder, burner_pid: int) -> Soaked:
    agents = bc.agents
    leader = bc.wait_stable(timeout=60, hold=3.0)
    standby = next(n for n in NODES if n != leader)
    before = {(n, h): buckets(a, *h) for n, a in agents.items() for h in ((MARGIN, ""), (LAG, ""), GC)}
    made_before = agents[leader].metric("hasync_sync_local_changes_total")
    applied_before = agents[standby].metric("hasync_sync_applied_total")
    burn_before = cpu_seconds(burner_pid)
    soaked = Soaked(start=time.monotonic())
    end = soaked.start + ctx.soak_seconds
    ctx.log(f"{name}: {leader} primary; {RATE} updates/s, burner on CPU 1, for {ctx.soak_seconds:.0f} s")
    with background_load(agents[leader].http_port, RATE):
        next_progress = soaked.start + PROGRESS
        while (now := time.monotonic()) < end:
            time.sleep(min(SAMPLE, end - now))  # the soak window itself, sampled
            soaked.loads.append(os.getloadavg()[0])
            dead = [n for n, a in agents.items() if not a.alive]
            if dead:
                raise RuntimeError(f"agent {', '.join(dead)} exited during the soak")
            for node, agent in agents.items():
                soaked.rss.setdefault(node, []).append(rss_mib(agent.pid))
            if time.monotonic() >= next_progress:
                next_progress += PROGRESS
                changes = sum(1 for e in bc.events() if e["event"] == "promote" and e["t"] > soaked.start)
                ctx.log(f"{name}: {time.monotonic() - soaked.start:.0f} s, leadership changes {changes}, "
                        f"applied {agents[standby].metric('hasync_sync_applied_total') - applied_before:.0f}, "
                        f"load {soaked.loads[-1]:.2f}")
    soaked.window = time.monotonic() - soaked.start
    soaked.burner = (cpu_seconds(burner_pid) - burn_before) / soaked.window * 100
    soaked.made = agents[leader].metric("hasync_sync_local_changes_total") - made_before
    # The standby applies what was made (a bounded wait for the tail to drain).
    with contextlib.suppress(AssertionError):
        wait_until(lambda: agents[standby].metric("hasync_sync_applied_total") - applied_before >= soaked.made, 30,
                   "the standby to apply the last updates")
    soaked.applied = agents[standby].metric("hasync_sync_applied_total") - applied_before
    for node, agent in agents.items():
        for le, count in _subtract(buckets(agent, MARGIN), before[node, (MARGIN, "")]).items():
            soaked.margins[le] = soaked.margins.get(le, 0.0) + count
        soaked.lags[node] = _subtract(buckets(agent, LAG), before[node, (LAG, "")])
        soaked.lags[f"{node}, full GC pauses"] = _subtract(buckets(agent, *GC), before[node, GC])
    soaked.events = [e for e in bc.events() if e["t"] > soaked.start]
    soaked.records = [t for t, _ in recorder.records if soaked.start < t <= soaked.start + soaked.window]
    return soaked


def _margins_table(margins: dict[float, float], silences: list[float], lease: float, deadline: float) -> str:
    lines = ["| how close | renewals | min | p1 | p50 | fails at |", "|---|--:|--:|--:|--:|--:|"]
    total = margins.get(math.inf, 0.0)
    if total > 0:
        p1, p50 = (histogram_quantile(margins, q) * 1000 for q in (0.01, 0.5))
        lines.append(f"| renewal margin (primary: deadline - echo), ms | {total:,.0f} | {_lowest(margins)} | "
                     f"{fmt(p1)} | {fmt(p50)} | 0 (deadline {fmt(deadline * 1000)}) |")
    if silences:
        left = [lease * 1000 - s for s in silences]
        lines.append(f"| silence margin (follower: lease - silence), ms | {len(silences):,} | {fmt(min(left))} | "
                     f"{fmt(percentile(left, 1))} | {fmt(percentile(left, 50))} | 0 (lease {fmt(lease * 1000)}) |")
    return "\n".join(lines)


def _highest(histogram: dict[float, float]) -> str:
    """The bucket of the largest observation, as ``a-b`` ms (``> a`` past the last bound)."""
    bounds = sorted(histogram)
    total = histogram.get(math.inf, 0.0)
    for i, bound in enumerate(bounds):
        if histogram[bound] >= total:
            low = fmt(bounds[i - 1] * 1000) if i else "0"
            return f"> {low}" if bound == math.inf else f"{low}-{fmt(bound * 1000)}"
    return "none"


def _lag_table(lags: dict[str, dict[float, float]]) -> str:
    """How late each agent's timers ran (``hasync_event_loop_lag_seconds``): a stalled process, not the network."""
    lines = ["| event-loop lag (timer wake-ups); full GC pauses | count | p50 ms | p99 ms | max (bucket) ms |",
             "|---|--:|--:|--:|--:|"]
    for node, histogram in sorted(lags.items()):
        total = histogram.get(math.inf, 0.0)
        if total > 0:
            p50, p99 = (fmt(histogram_quantile(histogram, q) * 1000) for q in (0.5, 0.99))
            lines.append(f"| {node} | {total:,.0f} | {p50} | {p99} | {_highest(histogram)} |")
    return "\n".join(lines)
