"""Shared fixtures: real brokers on free ports, and a topic prefix of each test's own."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from harness.brokers import AmqttProcess, BrokerProcess, MosquittoProcess, mosquitto_binary
from harness.ha import HA_VENV, HA_VERSION, HomeAssistant, StartHA, ha_installed


def _require_mosquitto() -> str:
    binary = mosquitto_binary()
    if binary is not None:
        return binary
    if "CI" in os.environ:
        pytest.fail("mosquitto is not installed and CI is set, so this fails: apt-get install mosquitto")
    pytest.skip("mosquitto is not installed (apt-get install mosquitto); under CI=true this fails instead")


@pytest.fixture
def mosquitto(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A running Mosquitto on a free port, stopped after the test.

    Options for MosquittoProcess go through indirect parametrization, e.g.
    ``@pytest.mark.parametrize("mosquitto", [{"persistence": True}], indirect=True)``.
    """
    options: dict[str, Any] = getattr(request, "param", {})
    with MosquittoProcess(tmp_path / "mosquitto", binary=_require_mosquitto(), **options) as broker:
        yield broker


@pytest.fixture
def amqtt_broker(tmp_path: Path) -> Iterator[AmqttProcess]:
    """A running embedded amqtt broker (``python -m hasync.broker``) on a free port, stopped afterwards."""
    with AmqttProcess(tmp_path / "amqtt") as broker:
        yield broker


@pytest.fixture(params=["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
def broker(request: pytest.FixtureRequest) -> BrokerProcess:
    """Each broker in turn: the test runs once against amqtt and once against Mosquitto."""
    name = "amqtt_broker" if request.param == "amqtt" else "mosquitto"
    started: BrokerProcess = request.getfixturevalue(name)
    return started


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix no other test uses, so tests never see each other's (retained) messages."""
    return f"t{uuid.uuid4().hex[:10]}"


# ---- the container image (harness/containers.py) ------------------------------------------------------


@pytest.fixture(scope="session")
def hasync_image() -> str:
    """hasync's image, built by scripts/build-image.sh (which sets up docker.io and a local base; as root)."""
    from harness.containers import DockerError, build

    if os.geteuid() != 0 and not Path("/usr/bin/docker").exists():
        if "CI" in os.environ:
            pytest.fail("the container tests need docker.io (scripts/setup-docker.sh, as root) and CI is set")
        pytest.skip("the container tests need docker.io and a dockerd: run scripts/setup-docker.sh as root")
    try:
        return build("build-image.sh")
    except DockerError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def addon_image(hasync_image: str) -> str:
    """The add-on's image as the Supervisor builds it (addon/Dockerfile), on a stand-in for HA's base image."""
    from harness.containers import DockerError, build

    try:
        return build("build-addon.sh")
    except DockerError as exc:
        pytest.fail(str(exc))


# ---- a real Home Assistant (harness/ha.py) ----------------------------------------------------------



def _require_ha() -> None:
    if ha_installed():
        return
    reason = f"Home Assistant {HA_VERSION} is not installed in {HA_VENV}; run scripts/setup-ha.sh"
    if "CI" in os.environ:
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)")
    pytest.skip(f"{reason}; under CI this fails instead")


@pytest.fixture(scope="session")
def ha_template(tmp_path_factory: pytest.TempPathFactory) -> HomeAssistant:
    """A stopped, onboarded HA config dir (owner and long-lived token), to be copied by each test."""
    _require_ha()
    template = HomeAssistant(tmp_path_factory.mktemp("ha-template"), name="template")
    try:
        template.start()
    finally:
        template.stop()
    print(f"\nHA template: first start with onboarding took {template.start_seconds:.1f} s")
    return template


@pytest.fixture
def start_ha(ha_template: HomeAssistant, tmp_path: Path) -> Iterator[StartHA]:
    """``start_ha(*names, mqtt_port=None, **options)`` starts copies of the template at once (``options`` as for
    ``HomeAssistant``: ``bulk_helpers``, ``recorder``; ``each={name: options}`` adds some for one of them); all
    stop afterwards."""
    started: list[HomeAssistant] = []

    def start(*names: str, each: dict[str, dict[str, Any]] | None = None, **options: Any) -> list[HomeAssistant]:
        instances = [HomeAssistant.copy_of(ha_template, tmp_path / n, name=n, **{**options, **(each or {}).get(n, {})})
                     for n in names]
        started.extend(instances)
        with ThreadPoolExecutor(len(instances)) as pool:
            list(pool.map(HomeAssistant.start, instances))
        for instance in instances:
            print(f"\nHA {instance.name}: start on a copied config took {instance.start_seconds:.1f} s")
        return instances

    yield start
    with ThreadPoolExecutor(max(len(started), 1)) as pool:
        list(pool.map(HomeAssistant.stop, started))
