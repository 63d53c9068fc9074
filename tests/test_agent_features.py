"""Health check commands, role hooks, the command line and the demo, with agents as real processes, and a
real Mosquitto ACL. These run on Mosquitto only (the election paths are covered on both brokers in
test_integration.py, and in-process in test_agent_inprocess.py).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.agents import FAST_ELECTION, Cluster, checked_cluster, wait_until
from harness.brokers import MosquittoProcess

pytestmark = pytest.mark.integration

LEASE = FAST_ELECTION["lease_duration"]


@pytest.fixture
def cluster(mosquitto: MosquittoProcess, tmp_path: Path, topic_prefix: str) -> Iterator[Cluster]:
    with checked_cluster(tmp_path / "agents", mosquitto.url, topic_prefix) as c:
        yield c


def file_check(path: Path) -> dict[str, object]:
    """A command check that passes while ``path`` exists."""
    return {"name": "flag", "type": "command", "command": f"test -e {path}", "interval": 0.2, "timeout": 0.2,
            "rise": 1, "fall": 1}


def test_unhealthy_node_never_leads_and_unhealthy_leader_hands_over(cluster: Cluster, tmp_path: Path) -> None:
    ok1, ok2 = tmp_path / "ok1", tmp_path / "ok2"
    ok1.touch()
    cluster.add("n1", priority=100, health_checks=[file_check(ok1)])
    cluster.add("n2", priority=200, health_checks=[file_check(ok2)])  # better, but unhealthy
    assert cluster.wait_for_leader(timeout=10) == "n1"
    assert cluster.agents["n2"].status()["healthy"] is False
    time.sleep(LEASE)  # a full lease later, the unhealthy node still has not claimed
    assert not cluster.agents["n2"].promotions()

    ok2.touch()
    wait_until(lambda: cluster.agents["n2"].status().get("eligible"), 5, "n2 to become eligible")
    t0 = time.monotonic()
    ok1.unlink()  # the leader's check fails: it hands over at once to the healthy node
    assert cluster.wait_for_leader(timeout=5, after=t0) == "n2"
    demote = [e for e in cluster.agents["n1"].events() if e["event"] == "demote"][-1]
    assert demote["reason"].startswith("unhealthy")
    assert [e for e in cluster.agents["n1"].events() if e["event"] == "fault"]
    assert cluster.agents["n1"].metric("hasync_healthy") == 0


def test_hooks_run_in_order_with_the_documented_environment(cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "hooks.log"
    hook = f'echo "$HASYNC_EVENT $HASYNC_ROLE $HASYNC_TERM $HASYNC_NODE $HASYNC_CLUSTER $HASYNC_LEADER" >> {out}'
    slow_demote = f"sleep 0.3; {hook}"
    hooks = {"promote": hook, "demote": slow_demote, "fault": hook, "timeout": 5}
    cluster.add("n1", priority=100, hooks=hooks)
    cluster.add("n2", priority=90, hooks=hooks)
    leader = cluster.wait_for_leader(timeout=10)
    wait_until(lambda: out.exists() and "promote" in out.read_text(), 5, "the promote hook")
    # Each agent first runs its demote hook once (a previous run may have died as primary), then
    # the leader its promote hook.
    first = out.read_text().splitlines()
    assert sorted(line.split() for line in first[:2]) == [["demote", "standby", "0", n, "test"] for n in ("n1", "n2")]
    assert [line.split() for line in first[2:]] == [["promote", "primary", "1", leader, "test", leader]]
    out.write_text("")

    t0 = time.monotonic()
    assert cluster.agents[leader].terminate() == 0
    other = "n2" if leader == "n1" else "n1"
    assert cluster.wait_for_leader(timeout=5, after=t0) == other
    wait_until(lambda: out.read_text().count("promote") == 1, 5, "the successor's promote hook")
    lines = out.read_text().splitlines()
    # The old primary's (slow) demote hook finished before the successor's promote hook ran.
    assert [line.split()[0] for line in lines] == ["demote", "promote"]
    assert lines[0].split()[:4] == ["demote", "standby", "1", leader]
    assert lines[1].split()[:4] == ["promote", "primary", "2", other]


def test_failing_hook_is_reported_and_leadership_continues(cluster: Cluster) -> None:
    cluster.add("n1", hooks={"promote": "echo broken >&2; exit 3", "timeout": 5})
    cluster.wait_for_leader(timeout=10)
    agent = cluster.agents["n1"]
    wait_until(lambda: agent.metric("hasync_hook_runs_total", event="promote", result="failed") == 1, 5,
               "the failed hook to be counted")
    assert [e for e in agent.events() if e["event"] == "hook_failed"]
    assert "broken" in agent.log()
    assert agent.http("/role")[0] == 200

def test_invalid_config_exits_nonzero_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("node_id: ok\nelection:\n  lease_duration: 2.0\n  renew_deadline: 2.0\n")
    result = subprocess.run([sys.executable, "-m", "hasync", "agent", "--config", str(config)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "election" in result.stderr and "lease_duration" in result.stderr


def one_error_line(*args: str, timeout: float = 30) -> str:
    """Run ``hasync *args``, expect it to exit 1 with one line on stderr (no traceback); return the line."""
    result = subprocess.run([sys.executable, "-m", "hasync", *args], capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("hasync: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def test_start_errors_are_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_error_line("agent", "--node-id", "n1", "--broker", "mqtt://127.0.0.1:9", "--http-port", str(port),
                              "--log-level", "ERROR")
        assert line == (f"hasync: cannot start the agent: cannot serve the HTTP endpoints on 127.0.0.1:{port}: "
                        "Address already in use (set http.port, or http.enabled: false)"), line
        line = one_error_line("broker", "--port", str(port))
        assert line.startswith(f"hasync: cannot start the embedded amqtt broker on 127.0.0.1:{port}: "), line
    missing = tmp_path / "no-such-dir" / "n1.events"
    line = one_error_line("agent", "--node-id", "n1", "--broker", "mqtt://127.0.0.1:9", "--http-port", "0",
                          "--events-file", str(missing), "--log-level", "ERROR")
    assert line == (f"hasync: cannot start the agent: cannot open events_file {missing}: "
                    "No such file or directory"), line


def test_demo_runs_non_interactively_and_exits_zero() -> None:
    result = subprocess.run([sys.executable, "-m", "hasync", "demo", "--duration", "60"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "crash failover" in result.stdout
    assert "graceful handover" in result.stdout
    assert "never" in result.stdout  # two primaries at once: never
    assert "input_boolean.porch_light = on" in result.stdout.split("state after the failover")[1]


def test_claims_the_broker_silently_drops_never_make_a_primary(tmp_path: Path, topic_prefix: str) -> None:
    """Mosquitto acknowledges a publish its ACL then drops: only an echo may count as acceptance."""
    from harness.brokers import MosquittoProcess, mosquitto_binary

    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("mosquitto is not installed")
    acl = tmp_path / "acl"
    # Anonymous clients may read everything and write their heartbeats, but not the lease topic.
    acl.write_text(f"topic read #\ntopic write {topic_prefix}/test/nodes/#\n")
    with MosquittoProcess(tmp_path / "mosquitto", binary=binary, extra_config=[f"acl_file {acl}"]) as broker, \
            checked_cluster(tmp_path / "agents", broker.url, topic_prefix) as cluster:
        agent = cluster.add("muted")
        wait_until(lambda: agent.status().get("role") not in (None, "observing"), 10, "observation to end")
        # Claim after claim is acknowledged by the broker and never delivered; the agent says so.
        wait_until(lambda: agent.metric("hasync_claims_unanswered_total") >= 2, 15, "two unanswered claims")
        assert agent.metric("hasync_claims_total") >= 2
        assert "is its ACL dropping our publishes" in agent.log()
        assert not agent.promotions()
        assert agent.http("/role")[0] == 503
