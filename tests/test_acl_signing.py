"""The shipped ACL (broker/acl.example, loaded as it is) and signed control messages, on a real Mosquitto
with real agent processes.

The ACL decides who may write at all: each node its own topics, the shared lease and entity topics and
the command topics (its tools' commands are signed); Home Assistant only the command (and probe) topics;
everyone else nothing. Signing decides whose records count: a client holding a node's broker password
but not its key can write the lease topic, and every agent drops what it writes there.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from harness.agents import AgentProcess, TopicRecorder, checked_cluster
from harness.brokers import MosquittoProcess, mosquitto_binary, password_file
from harness.wait import wait_until
from hasync.messages import Command, Heartbeat, LeaseRecord, NodeRole, parse
from hasync.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

ACL = Path(__file__).resolve().parents[1] / "broker" / "acl.example"
USERS = ("ha-a", "ha-b", "homeassistant", "dashboard", "hasync-admin", "stranger")  # stranger: not in the ACL
T = Topics("hasync", "home")  # the ACL's cluster


def password(user: str) -> str:
    return f"pw-{user}"


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    binary = mosquitto_binary()
    if binary is None or not Path("/usr/bin/mosquitto_passwd").exists():
        pytest.skip("mosquitto is not installed")
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    passwd = password_file(workdir / "passwd", {user: password(user) for user in USERS})
    extra = ["allow_anonymous false", f"password_file {passwd}", f"acl_file {ACL}"]
    with MosquittoProcess(workdir, binary=binary, extra_config=extra) as broker:
        yield broker


def url(broker: MosquittoProcess, user: str) -> str:
    return f"mqtt://{user}:{password(user)}@{broker.host}:{broker.port}"


def publish_as(broker: MosquittoProcess, user: str, topic: str, payload: bytes, *, retain: bool = False) -> None:
    """Publish at QoS 1 and wait for the broker's acknowledgement (which it also sends for a denied one)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-{secrets.token_hex(4)}")
    client.username_pw_set(user, password(user))
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def test_the_shipped_acl_lets_each_user_write_only_what_it_should(acl_broker: MosquittoProcess) -> None:
    cases = [  # (user, topic, may write)
        ("ha-a", T.lease, True), ("ha-a", T.heartbeat("ha-a"), True), ("ha-a", T.heartbeat("ha-b"), False),
        ("ha-a", T.command("ha-b"), True), ("ha-a", T.entity("light.kitchen"), True),
        ("ha-b", T.heartbeat("ha-a"), False), ("ha-b", "homeassistant/sensor/hasync_home_ha-a/role/config", False),
        ("homeassistant", T.command("ha-a"), True), ("homeassistant", T.lease, False),
        ("homeassistant", T.heartbeat("ha-a"), False), ("homeassistant", T.entity("light.kitchen"), False),
        ("hasync-admin", T.command("ha-a"), True), ("hasync-admin", T.lease, False),
        ("dashboard", T.lease, False), ("dashboard", T.command("ha-a"), False),
        ("stranger", T.lease, False), ("stranger", T.heartbeat("ha-a"), False), ("stranger", T.command("ha-a"), False),
    ]
    with TopicRecorder(url(acl_broker, "dashboard"), "hasync/#") as recorder:
        for i, (user, topic, _) in enumerate(cases):
            publish_as(acl_broker, user, topic, f"case-{i}".encode())
        publish_as(acl_broker, "ha-a", T.heartbeat("ha-a"), b"sentinel")
        wait_until(lambda: any(m[2] == b"sentinel" for m in recorder.messages), 10, "the sentinel")
        seen = {payload for _, _, payload in recorder.messages}
    wrong = [(user, topic, allowed) for i, (user, topic, allowed) in enumerate(cases)
             if (f"case-{i}".encode() in seen) != allowed]
    assert not wrong, f"(user, topic, should be allowed) the broker got wrong: {wrong}"


def keygen(path: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "hasync", "keygen", str(path)], capture_output=True, text=True,
                            timeout=30, check=True)
    return result.stdout.strip()


def test_signed_agents_ignore_forged_records_and_take_signed_commands(
        acl_broker: MosquittoProcess, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    public = {node: keygen(keys / f"{node}.key") for node in ("ha-a", "ha-b")}
    with checked_cluster(tmp_path / "agents", url(acl_broker, "dashboard"), "hasync") as cluster:
        agents: dict[str, AgentProcess] = {}
        for node, priority in (("ha-a", 200), ("ha-b", 100)):
            agents[node] = cluster.add(
                node, cluster="home", priority=priority,
                broker={"url": url(acl_broker, node)},
                signing={"private_key": str(keys / f"{node}.key"), "public_keys": public})
        assert cluster.wait_for_leader(15) == "ha-a"
        wait_until(lambda: agents["ha-b"].status().get("role") == "standby", 10, "ha-b to follow")
        assert agents["ha-a"].status()["authenticated"]

        lease = parse(LeaseRecord, _retained(acl_broker, T.lease))
        primary = parse(Heartbeat, _retained(acl_broker, T.heartbeat("ha-a")))
        ahead = lease.seq + 1000
        base = lease.model_dump(exclude_none=True, exclude={"sig"})
        forged = {
            "release": LeaseRecord.model_validate({**base, "kind": "release", "seq": ahead, "successor": "ha-b"}),
            "claim": LeaseRecord.model_validate({**base, "kind": "claim", "term": lease.term + 1, "seq": 0,
                                                 "holder": "ha-b", "prev_term": lease.term, "prev_seq": ahead}),
            "renewal": LeaseRecord.model_validate({**base, "term": lease.term + 1, "seq": 1, "holder": "ha-b"}),
        }
        t0 = time.monotonic()
        # Someone with ha-b's broker password but not its key: the ACL lets it write the lease topic.
        for record in forged.values():
            publish_as(acl_broker, "ha-b", T.lease, record.to_payload())
        # Others cannot write there, nor fake a will.
        will = primary.model_copy(update={"online": False, "role": NodeRole.OFFLINE, "sig": None})
        publish_as(acl_broker, "stranger", T.heartbeat("ha-a"), will.to_payload(), retain=True)
        publish_as(acl_broker, "homeassistant", T.lease, forged["release"].to_payload())
        time.sleep(3 * 1.5)  # an observation window of three leases: a forged release or claim acts at once
        assert not cluster.leaders_since(t0)
        assert cluster.current_leader() == "ha-a"
        wait_until(lambda: agents["ha-b"].metric("hasync_messages_dropped_total", reason="unsigned") >= 3, 10,
                   "ha-b to drop the three forged records")
        assert agents["ha-a"].metric("hasync_messages_dropped_total", reason="unsigned") >= 3

        # hasync's own tool, run with ha-b's configuration: its command is signed as ha-b's.
        out = subprocess.run([sys.executable, "-m", "hasync", "status", "-c", str(agents["ha-b"].config_path)],
                             capture_output=True, text=True, timeout=30, check=False)
        assert "signed: every node's messages verified" in out.stdout, out.stdout + out.stderr
        with TopicRecorder(url(acl_broker, "dashboard"), T.command("ha-a")) as commands:
            step = subprocess.run([sys.executable, "-m", "hasync", "step-down", "--node", "ha-a",
                                   "-c", str(agents["ha-b"].config_path)],
                                  capture_output=True, text=True, timeout=30, check=False)
            assert step.returncode == 0, step.stderr
            assert cluster.wait_for_leader(15, after=t0) == "ha-b"
            sent = commands.messages[0][2]
        command = parse(Command, sent)
        assert command.by == "ha-b" and command.sig is not None
        # The same signed command again (a replay by whoever recorded it): accepted once only.
        publish_as(acl_broker, "ha-b", T.command("ha-a"), sent)
        wait_until(lambda: agents["ha-a"].metric("hasync_messages_dropped_total", reason="stale_command") == 1, 10,
                   "ha-a to drop the replayed command")


def _retained(broker: MosquittoProcess, topic: str) -> bytes:
    with TopicRecorder(url(broker, "dashboard"), topic) as recorder:
        wait_until(lambda: recorder.messages, 10, f"the retained {topic}")
        return recorder.messages[0][2]
