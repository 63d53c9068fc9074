"""hasync's container image, built from the Dockerfile and run as the README tells users to run it.

Needs Debian's docker.io and a dockerd (scripts/setup-docker.sh, which scripts/test runs); the base image is
a local debootstrap of this machine's Debian mirror, because Docker Hub is not reachable here.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.agents import FAST_ELECTION
from harness.brokers import MosquittoProcess
from harness.containers import Container, docker, image_size_mb
from harness.wait import free_port, wait_until
from hasync.audit import decreasing_terms, overlaps, read_events, tenures, terms_with_two_winners

pytestmark = [pytest.mark.integration, pytest.mark.container, pytest.mark.timeout(900)]

IMAGE_LIMIT_MB = 150.0
STOP_TIMEOUT = 60  # the compose example's stop_grace_period and the systemd unit's TimeoutStopSec
UID = 10001  # the image's user


def test_the_image_is_small_runs_as_a_user_and_carries_no_build_tools(hasync_image: str) -> None:
    size = image_size_mb(hasync_image)
    assert size <= IMAGE_LIMIT_MB, f"the image is {size:.1f} MB"
    container = Container(f"hasync-props-{os.getpid()}", hasync_image, ["60"], options=["--entrypoint", "sleep"])
    try:
        assert container.exec("id", "-u").stdout.strip() == str(UID)
        # No compiler, no pip, no test tools; the agent's modules import without the network.
        probe = container.exec("sh", "-c", "command -v gcc cc pip pip3 pytest; "
                               "python3 -c 'import pip' 2>/dev/null && echo pip-module; true")
        assert probe.stdout.strip() == "", probe.stdout
        imports = container.exec("python3", "-c", "import hasync.agent, hasync.signing, nacl.signing, aiomqtt")
        assert imports.returncode == 0, imports.stderr
        assert container.exec("hasync", "--help").returncode == 0
    finally:
        container.remove()
    config = container_config(hasync_image)
    assert config["User"] == "hasync"
    assert config["StopSignal"] == "SIGTERM"
    assert config["Healthcheck"]["Test"] == ["CMD", "hasync", "healthcheck"]
    assert config["Entrypoint"][0] == "/usr/bin/tini"  # PID 1 reaps the hooks' children
    assert "/data" in config["Volumes"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "hasync"
    assert labels["org.opencontainers.image.version"] and labels["org.opencontainers.image.revision"]


def container_config(image: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
    return data


class Node:
    """One agent in a container: its configuration read-only in /etc/hasync, its state in /data."""

    def __init__(self, image: str, workdir: Path, name: str, broker: str, prefix: str, priority: int) -> None:
        self.node = name
        self.data = workdir / name / "data"
        config_dir = workdir / name / "etc"
        self.data.mkdir(parents=True)
        config_dir.mkdir()
        os.chown(self.data, UID, UID)
        self.http_port = free_port()
        (config_dir / "hasync.yaml").write_text(yaml.safe_dump({
            "node_id": name, "cluster": "test", "topic_prefix": prefix, "priority": priority,
            "broker": {"url": broker, "keepalive": 2, "reconnect_min": 0.05, "reconnect_max": 0.5},
            "election": dict(FAST_ELECTION), "http": {"port": self.http_port},
            "homeassistant": {"discovery": False},
        }))
        (config_dir / "hasync.yaml").chmod(0o644)
        self.container = Container(f"hasync-{prefix}-{name}", image, options=[
            "--network", "host", "--health-interval", "1s",
            "-v", f"{config_dir}:/etc/hasync:ro", "-v", f"{self.data}:/data",
        ])

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.data / "events.jsonl")


@pytest.fixture
def three_containers(hasync_image: str, mosquitto: MosquittoProcess, tmp_path: Path,
                     topic_prefix: str) -> Iterator[dict[str, Node]]:
    nodes: dict[str, Node] = {}
    try:
        for name, priority in (("c1", 300), ("c2", 200), ("c3", 100)):
            nodes[name] = Node(hasync_image, tmp_path, name, mosquitto.url, topic_prefix, priority)
        yield nodes
    finally:
        for node in nodes.values():
            node.container.remove()


def test_three_containers_elect_one_primary_and_docker_stop_hands_it_over(
    three_containers: dict[str, Node],
) -> None:
    nodes = three_containers

    def events() -> list[dict[str, Any]]:
        return [e for n in nodes.values() for e in n.events()]

    def promoted(after: float = 0.0) -> list[str]:
        return [e["node"] for e in sorted(events(), key=lambda e: e["t"]) if e["event"] == "promote" and e["t"] > after]

    try:
        first = wait_until(promoted, 60, "a primary among the containers")[0]
        assert first == "c1"  # the highest priority, at a cold start
        for node in nodes.values():
            node.container.wait_healthy(60)  # the image's HEALTHCHECK: hasync healthcheck against /healthz
        # The default configuration path in the image is the mounted one: the CLI inside sees the cluster.
        status = nodes["c2"].container.exec("hasync", "status", "--json", "--wait", "2")
        assert status.returncode == 0, status.stderr
        roles = {n["node"]: n["role"] for n in json.loads(status.stdout)["nodes"]}
        assert roles == {"c1": "primary", "c2": "standby", "c3": "standby"}, roles

        before = time.monotonic()
        took, code = nodes["c1"].container.stop(STOP_TIMEOUT)
        assert code == 0, nodes["c1"].container.logs()[-3000:]  # SIGTERM, a clean exit: not killed at the timeout
        assert took < STOP_TIMEOUT
        successor = wait_until(lambda: promoted(before), 10, "a successor after docker stop")[0]
        assert successor == "c2"
        # A handover, not a lease expiry: c1 demoted itself for the shutdown and released the lease to c2.
        demotions = [e for e in nodes["c1"].events() if e["event"] == "demote"]
        assert [e["cause"] for e in demotions] == ["shutdown"], demotions
        assert "hasync agent c1 stopped" in nodes["c1"].container.logs()
    except AssertionError:
        for node in nodes.values():
            print(f"==== {node.node}\n{node.container.logs()[-4000:]}\n{node.container.health_log()}")
        raise
    now = time.monotonic()
    all_events = events()
    assert not overlaps(tenures(all_events, now)), "two primaries at once"
    assert not terms_with_two_winners(all_events)
    assert not decreasing_terms(all_events)


def test_the_compose_example_runs_the_image_and_stops_cleanly(
    hasync_image: str, mosquitto: MosquittoProcess, tmp_path: Path, topic_prefix: str,
) -> None:
    """examples/docker-compose.yaml as it is, with only the image and the configuration folder chosen."""
    from harness.containers import ROOT

    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    http_port = free_port()
    (config_dir / "hasync.yaml").write_text(yaml.safe_dump({
        "node_id": "solo", "cluster": "test", "topic_prefix": topic_prefix, "broker": {"url": mosquitto.url},
        "election": dict(FAST_ELECTION), "http": {"port": http_port}, "homeassistant": {"discovery": False},
    }))
    (config_dir / "hasync.yaml").chmod(0o644)
    project = f"hasync{topic_prefix}"
    env = dict(os.environ, HASYNC_IMAGE=hasync_image, HASYNC_CONFIG_DIR=str(config_dir))

    def compose(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker-compose", "-f", str(ROOT / "examples" / "docker-compose.yaml"),
                               "-p", project, *args], capture_output=True, text=True, env=env, timeout=120,
                              check=False)

    try:
        up = compose("up", "-d")
        assert up.returncode == 0, up.stderr
        container_id = compose("ps", "-q", "hasync").stdout.strip()
        assert container_id

        def role() -> int | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/role", timeout=2) as response:
                    return int(response.status)
            except (OSError, ValueError):
                return None

        assert wait_until(role, 60, "the composed agent to be primary (/role 200)") == 200
        stop = compose("stop")
        assert stop.returncode == 0, stop.stderr
        state = json.loads(docker("inspect", container_id).stdout)[0]["State"]
        assert state["ExitCode"] == 0 and not state["OOMKilled"], state
        assert docker("inspect", container_id, "--format", "{{.HostConfig.NetworkMode}}").stdout.strip() == "host"
    finally:
        compose("down", "-v")
