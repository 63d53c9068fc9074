"""Shared fixtures: real brokers on free ports, and a topic prefix of each test's own."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import AmqttProcess, BrokerProcess, MosquittoProcess, mosquitto_binary


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
