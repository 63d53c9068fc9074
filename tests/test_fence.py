"""The guardian's fence (hasync.guardian, hasync.fence; the config's ``hooks.fence``): the command that stops what
the promote hook started when the agent dies as primary or stalls past its deadline.

Three tiers: the pipe's little language (pure, fuzzed); the guardian program on its own, driven through its
pipe like the agent drives it (no root); two real agents on the embedded broker whose hooks keep a record of
who serves, with the primary killed and frozen. The floating IPs' side of the guardian, which needs root and
namespaces, is tests/test_vip_netns.py; dnsmasq fenced end to end is tests/test_dnsmasq_netns.py and
tests/test_home_e2e.py."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.agents import Cluster, checked_cluster
from harness.brokers import AmqttProcess
from harness.wait import wait_until
from hasync import guardian
from hasync.fence import FENCE_MARGIN, Guardian, fence_after
from hasync.metrics import Metrics

# ---- the pipe's lines ---------------------------------------------------------------------------------------


def test_the_agent_s_lines() -> None:
    assert guardian.command(b"arm 1234.5 7") == guardian.Armed(1234.5, "7")
    assert guardian.command(b"arm inf 7") == guardian.Armed(math.inf, "7")
    assert guardian.command(b"disarm") is None
    for bad in (b"", b"arm", b"arm 1 x", b"arm nan 3", b"arm 1 2 3", b"disarm now", b"ARM 1 2", b"\xff\xfe"):
        with pytest.raises(ValueError):
            guardian.command(bad)


def test_lines_are_split_across_reads_and_a_long_one_is_dropped_whole() -> None:
    lines = guardian.Commands()
    assert lines.feed(b"arm 1 2\ndis") == [b"arm 1 2"]
    assert lines.feed(b"arm\n") == [b"disarm"]
    assert lines.feed(b"x" * (guardian.MAX_LINE + 1)) == []
    assert lines.feed(b"y" * 10 + b"\narm 3 4\n") == [b"arm 3 4"]  # (the rest of the long line went with it)


@given(st.lists(st.binary(max_size=600), max_size=20))
def test_no_bytes_on_the_pipe_make_the_guardian_raise(chunks: list[bytes]) -> None:
    lines = guardian.Commands()
    for chunk in chunks:
        for line in lines.feed(chunk):
            assert len(line) <= guardian.MAX_LINE
            with contextlib.suppress(ValueError):
                guardian.command(line)


def test_the_fence_comes_after_a_live_agent_has_demoted_and_before_a_takeover() -> None:
    assert fence_after(2.0, 3.0) == FENCE_MARGIN  # the defaults: 2.5 s after the renewal, the takeover at 3 s
    assert fence_after(0.7, 0.85) == pytest.approx(0.075)  # the fast profile: half the 0.15 s gap


def test_guardian_options() -> None:
    opts = guardian.options(["--fence", "stop it", "--fence-timeout", "5", "eth0", "10.0.0.5/24"])
    assert (opts.fence, opts.fence_timeout, [str(t) for t in opts.targets]) == ("stop it", 5.0, ["10.0.0.5/24 on eth0"])
    assert guardian.options([]) == guardian.Options(None, 30.0, [])
    for bad in (["--fence", "x"], ["--fence", "x", "--fence-timeout", "0"], ["--fence", "x", "--fence-timeout", "nan"]):
        with pytest.raises(ValueError):
            guardian.options(bad)


# ---- the guardian program on its own ------------------------------------------------------------------------

# The fence command records its reason, term and the moment it ran (CLOCK_MONOTONIC, the agent's clock too).
RECORD = (f"{shlex.quote(sys.executable)} -c 'import os, time; print(os.environ[\"HASYNC_EVENT\"], "
          f"os.environ[\"HASYNC_REASON\"].replace(\" \", \"_\"), os.environ[\"HASYNC_TERM\"], time.monotonic())' >> ")


class Driven:
    """A guardian started like the agent starts it, with the agent's end of its pipe in our hands."""

    def __init__(self, tmp_path: Path, timeout: float = 5.0) -> None:
        self.record = tmp_path / "fenced"
        read, self.pipe = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hasync.guardian", "--fence", RECORD + shlex.quote(str(self.record)),
             "--fence-timeout", str(timeout)], stdin=read, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.close(read)
        assert self.process.stdout is not None
        assert self.process.stdout.readline().split()[0] == guardian.READY  # no addresses: no CAP_NET_ADMIN needed

    def send(self, line: str) -> None:
        os.write(self.pipe, (line + "\n").encode())

    def close(self) -> float:
        os.close(self.pipe)
        return time.monotonic()

    def fences(self) -> list[tuple[str, str, str, float]]:
        if not self.record.exists():
            return []
        return [(event, reason, term, float(t)) for event, reason, term, t in
                (line.split() for line in self.record.read_text().splitlines())]

    def stop(self) -> str:
        with contextlib.suppress(OSError):
            os.close(self.pipe)
        assert self.process.wait(10) == 0
        assert self.process.stderr is not None
        return self.process.stderr.read()


@pytest.fixture
def driven(tmp_path: Path) -> Iterator[Driven]:
    d = Driven(tmp_path)
    try:
        yield d
    finally:
        if d.process.poll() is None:
            d.process.kill()
        d.process.__exit__(None, None, None)  # (waits, closes its pipes)


@pytest.mark.timeout(30)
def test_a_deadline_that_passes_runs_the_fence_once_and_tells_the_agent(driven: Driven) -> None:
    deadline = time.monotonic() + 0.4
    driven.send(f"arm {deadline!r} 12")
    assert driven.process.stdout is not None
    assert driven.process.stdout.readline().split() == [guardian.FENCED, "12", "ok"]
    [(event, reason, term, ran)] = driven.fences()
    assert (event, reason, term) == ("fence", "agent_stalled", "12") and ran >= deadline
    print(f"fence command ran {(ran - deadline) * 1000:.1f} ms after the deadline (with its interpreter's start)")
    driven.close()  # disarmed by the fence: the agent's end closing runs nothing more
    assert "stalled as primary of term 12: fence command ok" in driven.stop() and len(driven.fences()) == 1


@pytest.mark.timeout(30)
def test_a_deadline_renewed_in_time_never_fences_and_the_death_of_an_armed_agent_does(driven: Driven) -> None:
    end = time.monotonic() + 1.5
    while time.monotonic() < end:  # the agent renewing every 0.1 s, its deadline 0.3 s ahead
        driven.send(f"arm {time.monotonic() + 0.3!r} 3")
        driven.send("garbage that must not disarm it")
        time.sleep(0.1)
    assert driven.fences() == []
    closed = driven.close()
    assert "is gone: fence command ok" in driven.stop()
    [(_, reason, term, ran)] = driven.fences()
    assert (reason, term) == ("agent_died", "3") and ran >= closed


@pytest.mark.timeout(30)
def test_disarmed_or_armed_for_death_only_it_waits(driven: Driven) -> None:
    driven.send(f"arm {time.monotonic() + 0.2!r} 5")
    driven.send("disarm")
    driven.send("arm inf 6")  # kept hooks: through a stall, only the agent's death fences
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        assert driven.fences() == [] and driven.process.poll() is None
        time.sleep(0.05)
    driven.close()
    driven.stop()
    assert [(reason, term) for _, reason, term, _ in driven.fences()] == [("agent_died", "6")]


@pytest.mark.timeout(30)
def test_a_fence_command_that_hangs_is_killed_with_its_group(tmp_path: Path) -> None:
    read, write = os.pipe()
    child = tmp_path / "child.pid"
    with subprocess.Popen([sys.executable, "-m", "hasync.guardian", "--fence", f"sleep 60 & echo $! > {child}; wait",
                           "--fence-timeout", "0.5"], stdin=read, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        os.close(read)
        assert process.stdout is not None and process.stdout.readline().startswith(guardian.READY)
        os.write(write, b"arm inf 1\n")
        os.close(write)
        assert process.wait(10) == 0
        assert process.stderr is not None and "fence command timed out after 0.5 s" in process.stderr.read()
    pid = int(child.read_text())
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
               5, "the fence command's child to be killed with its group")


# ---- the agent's side: hasync.fence.Guardian ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_the_agent_side_arms_rearms_a_new_guardian_and_hears_of_a_fence(tmp_path: Path) -> None:
    record = tmp_path / "fenced"
    heard: list[tuple[int, str]] = []

    async def scenario() -> None:
        g = Guardian([], Metrics(), fence=RECORD + shlex.quote(str(record)), fence_timeout=5,
                     env={"HASYNC_NODE": "n1"}, on_fenced=lambda term, outcome: heard.append((term, outcome)))
        task = asyncio.create_task(g.run())
        try:
            await asyncio.wait_for(_until(lambda: g.pid is not None), 10)
            g.arm(time.monotonic() + 60, 4)
            first = g.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)  # a guardian killed is started again, and told it is armed
            await asyncio.wait_for(_until(lambda: g.starts == 2 and g.pid is not None), 10)
            assert not record.exists()  # (killed, it fenced nothing)
            g.arm(time.monotonic() + 0.3, 5)
            await asyncio.wait_for(_until(lambda: bool(heard)), 10)
            assert heard == [(5, "ok")] and g.status()["stall_fences"] == 1 and not g.status()["armed"]
            g.disarm()  # (already disarmed by the fence: nothing is sent, nothing runs)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await g.close()
        assert [line.split()[:3] for line in record.read_text().splitlines()] == [["fence", "agent_stalled", "5"]]

    asyncio.run(scenario())


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():  # noqa: ASYNC110 (the guardian's state has no event to wait on: polled, bounded by the caller)
        await asyncio.sleep(0.01)


# ---- two agents: the primary killed, the primary frozen ---------------------------------------------------------


@contextlib.contextmanager
def serving_pair(tmp_path: Path, topic_prefix: str) -> Iterator[tuple[Cluster, Path]]:
    """n1 (priority 200) and n2 on amqtt; each one's hooks keep ``<dir>/serving-<node>`` (promote creates it, demote
    and fence remove it) and log every run with its time to ``<dir>/runs``."""
    log = tmp_path / "runs"
    hook = (f"{shlex.quote(sys.executable)} -c 'import os, sys, time; e = os.environ; "
            f"p = sys.argv[1] + \"/serving-\" + e[\"HASYNC_NODE\"]; "
            f"open(p, \"w\").close() if e[\"HASYNC_EVENT\"] == \"promote\" else (os.path.exists(p) and os.remove(p)); "
            f"open(sys.argv[1] + \"/runs\", \"a\").write(\" \".join([e[\"HASYNC_NODE\"], e[\"HASYNC_EVENT\"], "
            f"repr(time.monotonic())]) + \"\\n\")' {shlex.quote(str(tmp_path))}")
    with AmqttProcess(tmp_path / "amqtt") as broker, \
            checked_cluster(tmp_path / "agents", broker.url, topic_prefix) as cluster:
        for node, priority in (("n1", 200), ("n2", 100)):
            cluster.add(node, priority=priority, preempt=False,
                        hooks={"promote": hook, "demote": hook, "fence": hook, "timeout": 10})
        assert cluster.wait_for_leader(30) == "n1"
        wait_until(ran(log, "n1", "promote"), 10, "n1's promote hook")
        yield cluster, log


def runs(log: Path) -> list[tuple[str, str, float]]:
    """Every hook run so far (a line is written after the run's change to ``serving-<node>``)."""
    if not log.exists():
        return []
    return [(node, event, float(t)) for node, event, t in (line.split() for line in log.read_text().splitlines())]


def ran(log: Path, node: str, event: str) -> Callable[[], bool]:
    return lambda: any((n, e) == (node, event) for n, e, _ in runs(log))


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_frozen_primary_is_fenced_before_the_other_starts_serving(tmp_path: Path, topic_prefix: str) -> None:
    with serving_pair(tmp_path, topic_prefix) as (cluster, log):
        agent = cluster.agents["n1"]
        frozen = time.monotonic()
        agent.signal(signal.SIGSTOP)
        wait_until(ran(log, "n2", "promote"), 20, "n2 to serve")
        fence = [t for node, event, t in runs(log) if (node, event) == ("n1", "fence")]
        promote = [t for node, event, t in runs(log) if (node, event) == ("n2", "promote")]
        assert len(fence) == 1 and len(promote) == 1 and frozen < fence[0] < promote[0], runs(log)
        assert not (tmp_path / "serving-n1").exists()  # never two serving: the fence ran first
        print(f"SIGSTOP: n1 fenced {fence[0] - frozen:.3f} s after, n2 promoted {promote[0] - frozen:.3f} s after "
              f"({(promote[0] - fence[0]) * 1000:.0f} ms apart)")
        agent.signal(signal.SIGCONT)  # thawed: it learns it was fenced, is no longer primary, and runs no promote
        wait_until(lambda: "the guardian ran the fence command (ok)" in agent.log(), 10, "n1 to hear of the fence")
        wait_until(lambda: agent.status().get("role") == "standby", 10, "n1 back as standby")
        assert agent.metric("hasync_stall_fences_total") == 1
        assert [e for n, e, _ in runs(log) if n == "n1" and e == "promote"] == ["promote"]  # (its first, only)


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_killed_primary_is_fenced_and_a_standby_or_a_clean_stop_is_not(tmp_path: Path, topic_prefix: str) -> None:
    with serving_pair(tmp_path, topic_prefix) as (cluster, log):
        killed = cluster.kill("n1")
        wait_until(ran(log, "n2", "promote"), 20, "n2 to serve")
        wait_until(ran(log, "n1", "fence"), 10, "n1's guardian to fence")
        fence = [t for node, event, t in runs(log) if (node, event) == ("n1", "fence")]
        promote = [t for node, event, t in runs(log) if (node, event) == ("n2", "promote")]
        print(f"kill -9: n1 fenced {(fence[0] - killed) * 1000:.1f} ms after, n2 promoted "
              f"{(promote[0] - killed) * 1000:.1f} ms after")
        assert not (tmp_path / "serving-n1").exists() and len(fence) == 1 and killed < fence[0]
        # n1 back as a standby (its start runs the demote hook) and killed again: a standby's death fences
        # nothing; then n2, primary, stopped cleanly (it hands over, its demote hook disarms): nothing either.
        agent = cluster.agents["n1"]
        agent.start()
        wait_until(lambda: agent.status().get("role") == "standby", 20, "n1 back as standby")
        guardians = [cluster.agents[node].status()["guardian"]["pid"] for node in ("n1", "n2")]
        cluster.kill("n1")
        cluster.agents["n2"].terminate()
        wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in guardians), 10, "both guardians to exit")
        assert [(n, e) for n, e, _ in runs(log) if e == "fence"] == [("n1", "fence")]
        assert runs(log)[-1][:2] == ("n2", "demote")
