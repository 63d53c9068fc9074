"""The command line, in-process where it needs no broker: where it finds its configuration, and how it
reads the cluster's state (the observer follows the lease by the election's rules)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.sim import claim, release, renew
from hasync import cli
from hasync.messages import Heartbeat, LeaderAnnouncement, NodeRole
from hasync.status import ClusterView, CommandRefused
from hasync.topics import Topics
from hasync.transport import Incoming

T = Topics("hasync", "home")


def test_status_and_step_down_read_the_agents_default_config_file(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "hasync.yaml"
    config.write_text("cluster: attic\nbroker: {url: 'mqtt://127.0.0.1:9'}\n")
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_PATH", config)
    for args in (["status", "--wait", "0.1"], ["step-down", "--node", "n1"], ["resume", "--node", "n1"]):
        result = CliRunner().invoke(cli.main, args)
        assert result.exit_code == 1, result.output
        # It used the file's broker (port 9, nothing listens): the one clear line names it.
        assert "mqtt://127.0.0.1:9" in result.output, result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("priority: many\n")
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_PATH", bad)
    result = CliRunner().invoke(cli.main, ["status"])
    assert result.exit_code == 2 and "priority" in result.output
    monkeypatch.setattr(cli, "DEFAULT_CONFIG_PATH", tmp_path / "absent.yaml")  # no file: the defaults
    result = CliRunner().invoke(cli.main, ["status", "--wait", "0.1", "--broker", "mqtt://127.0.0.1:9"])
    assert result.exit_code == 1 and "mqtt://127.0.0.1:9" in result.output


def view_of(*messages: tuple[str, bytes, bool], now: float = 10.0) -> ClusterView:
    view = ClusterView(T)
    for topic, payload, retain in messages:
        view.apply(Incoming(topic, payload, retain), now)
    return view


def hb(node: str, role: NodeRole, *, eligible: bool = True, maintenance: bool = False) -> tuple[str, bytes, bool]:
    beat = Heartbeat(node=node, incarnation=f"{node}-1", conn=1, online=True, role=role, eligible=eligible,
                     healthy=True, maintenance=maintenance)
    return (T.heartbeat(node), beat.to_payload(), False)


def test_the_observer_follows_the_lease_by_the_elections_rules() -> None:
    view = view_of(
        (T.lease, renew("a", 3, 5).to_payload(), True),
        (T.lease, renew("b", 3, 9).to_payload(), False),  # not the holder of term 3: ignored
        (T.lease, claim("c", 3, (2, 0)).to_payload(), False),  # an outdated position: ignored
        (T.lease, renew("a", 3, 6).to_payload(), False),
    )
    assert view.to_json(10.0)["lease"] == {"kind": "renew", "term": 3, "seq": 6, "holder": "a", "successor": None}
    view.apply(Incoming(T.lease, release("a", 3, 7, successor="b").to_payload(), False), 11.0)
    assert view.to_json(11.0)["lease"]["kind"] == "release"


def test_the_observer_drops_what_is_not_valid_on_every_topic_it_reads() -> None:
    view = view_of((T.leader, b"not json", True), (T.lease, b"[]", False), (T.heartbeat("a"), b"{}", True),
                   (T.leader, LeaderAnnouncement(leader="a", term=3, sent_at=0.0).to_payload(), True))
    assert view.dropped == 3
    assert view.to_json(10.0)["leader"] == "a"


def test_a_step_down_is_refused_unless_the_cluster_shows_it_makes_sense() -> None:
    view = view_of(hb("a", NodeRole.PRIMARY), hb("b", NodeRole.STANDBY), hb("c", NodeRole.STANDBY, eligible=False),
                   hb("d", NodeRole.STANDBY, eligible=False, maintenance=True))
    view.check_step_down("a", None, 10.5)
    view.check_step_down("a", "b", 10.5)
    for node, successor, error in (
        ("x", None, "no node 'x' in cluster 'home' under hasync/home/ (nodes seen: a, b, c, d)"),
        ("b", None, "b is not the primary (it is standby); the primary is a"),
        ("a", "a", "a cannot hand over to itself"),
        ("a", "x", "no node 'x'"),
        ("a", "c", "c cannot take over: it is not eligible yet"),
        ("a", "d", "d cannot take over: it is in maintenance"),
    ):
        with pytest.raises(CommandRefused, match="^" + error.replace("(", r"\(").replace(")", r"\)")):
            view.check_step_down(node, successor, 10.5)
    with pytest.raises(CommandRefused, match="it is unknown"):  # no live heartbeat for a while
        view.check_step_down("a", None, 20.0)


def test_keygen_writes_a_private_key_once_and_prints_its_public_key(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    made = CliRunner().invoke(cli.main, ["keygen", str(path)])
    assert made.exit_code == 0, made.output
    public = made.output.strip()
    assert len(public) == 43 and "PRIVATE KEY" in path.read_text()
    shown = CliRunner().invoke(cli.main, ["keygen", "--show", str(path)])
    assert shown.output.strip() == public
    again = CliRunner().invoke(cli.main, ["keygen", str(path)])
    assert again.exit_code == 1 and again.output.strip() == f"hasync: {path} exists; not overwriting a key"
    assert shown.output.strip() == CliRunner().invoke(cli.main, ["keygen", "--show", str(path)]).output.strip()


def test_an_agent_whose_key_does_not_match_its_listed_public_key_says_so_in_one_line(tmp_path: Path) -> None:
    mine, other = tmp_path / "mine.key", tmp_path / "other.key"
    CliRunner().invoke(cli.main, ["keygen", str(mine)])
    listed = CliRunner().invoke(cli.main, ["keygen", str(other)]).output.strip()
    config = tmp_path / "hasync.yaml"
    config.write_text(f"node_id: a\nhttp: {{enabled: false}}\nbroker: {{url: 'mqtt://127.0.0.1:9'}}\n"
                      f"signing: {{private_key: {mine}, public_keys: {{a: {listed}}}}}\n")
    result = CliRunner().invoke(cli.main, ["agent", "--config", str(config)])
    assert result.exit_code == 1
    (line,) = [out for out in result.output.splitlines() if out.startswith("hasync:")]
    assert line.startswith(f"hasync: cannot start the agent: signing: the private key {mine} does not match "
                           "public_keys.a")
    for args in (["status", "--wait", "0.1"], ["step-down", "--node", "a"]):
        refused = CliRunner().invoke(cli.main, [*args, "--config", str(config)])
        assert refused.exit_code == 1 and "signing: the private key" in refused.output


def test_without_the_broker_extra_the_demo_and_broker_commands_say_how_to_get_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "amqtt" else real(name, *a))
    for args in (["broker", "--port", "0"], ["demo", "--duration", "1"]):
        result = CliRunner().invoke(cli.main, args)
        assert result.exit_code == 1
        assert result.output.strip() == ("hasync: the embedded broker is not installed: pip install 'hasync[broker]' "
                                         "(or use Mosquitto)")
