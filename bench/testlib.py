"""A typed shim over the test-suite's controllers in ``tests/`` (brokers.py, agents.py, ha.py).

The benchmarks reuse them rather than copying them. ``tests/`` is not a package: its modules import
each other by plain name (``from brokers import free_port``), so it goes on ``sys.path`` and they are
loaded by name at run time. mypy does not see ``tests/`` when checking ``bench``; the Protocols below
state the part of their interface the benchmarks use, and each factory casts to one.
"""

from __future__ import annotations

import importlib
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, cast

TESTS = Path(__file__).resolve().parent.parent / "tests"


def _module(name: str) -> ModuleType:
    if str(TESTS) not in sys.path:
        sys.path.append(str(TESTS))
    return importlib.import_module(name)


class Broker(Protocol):
    log_path: Path

    @property
    def url(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def running(self) -> bool: ...

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def restart(self) -> None: ...


class Agent(Protocol):
    node: str
    events_path: Path
    log_path: Path
    http_port: int
    process: subprocess.Popen[bytes] | None

    @property
    def pid(self) -> int: ...
    @property
    def alive(self) -> bool: ...

    def start(self) -> Agent: ...
    def kill(self) -> float: ...
    def signal(self, sig: signal.Signals) -> None: ...
    def terminate(self, timeout: float = 15) -> int: ...
    def status(self) -> dict[str, Any]: ...
    def metric(self, name: str, **labels: str) -> float: ...
    def events(self) -> list[dict[str, Any]]: ...
    def log(self) -> str: ...


class Cluster(Protocol):
    agents: dict[str, Agent]

    def add(self, node: str, **settings: Any) -> Agent: ...
    def stop_all(self) -> None: ...
    def logs(self) -> str: ...


class HomeAssistant(Protocol):
    name: str
    start_seconds: float | None

    @property
    def url(self) -> str: ...
    @property
    def token(self) -> str: ...
    @property
    def running(self) -> bool: ...

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def get_state(self, entity_id: str) -> dict[str, Any] | None: ...
    def wait_for_state(self, entity_id: str, expected: str, timeout: float = 30.0) -> dict[str, Any] | None: ...
    def log_tail(self, chars: int = 4000) -> str: ...
    def call_service(self, domain: str, service: str, data: dict[str, Any] | None = None) -> list[dict[str, Any]]: ...


def free_port() -> int:
    port: int = _module("brokers").free_port()
    return port


def mosquitto_binary() -> str | None:
    binary: str | None = _module("brokers").mosquitto_binary()
    return binary


def mosquitto(workdir: Path, *, persistence: bool = False) -> Broker:
    return cast(Broker, _module("brokers").MosquittoProcess(workdir, persistence=persistence))


def amqtt(workdir: Path) -> Broker:
    return cast(Broker, _module("brokers").AmqttProcess(workdir))


def cluster(workdir: Path, broker_url: str, prefix: str) -> Cluster:
    return cast(Cluster, _module("agents").Cluster(workdir, broker_url, prefix))


def ha_installed() -> bool:
    installed: bool = _module("ha").ha_installed()
    return installed


def ha_version() -> str:
    return str(_module("ha").HA_VERSION)


def home_assistant(workdir: Path, *, name: str, mqtt_port: int | None = None) -> HomeAssistant:
    return cast(HomeAssistant, _module("ha").HomeAssistant(workdir, name=name, mqtt_port=mqtt_port))


def home_assistant_copy(template: HomeAssistant, workdir: Path, *, name: str, mqtt_port: int) -> HomeAssistant:
    """A copy of a stopped, onboarded instance (``HomeAssistant.copy_of``)."""
    ha = _module("ha").HomeAssistant
    return cast(HomeAssistant, ha.copy_of(template, workdir, name=name, mqtt_port=mqtt_port))


def start_home_assistants(workdir: Path, names: list[str], mqtt_port: int) -> dict[str, HomeAssistant]:
    """Onboard a template instance once, copy it per name (MQTT on ``mqtt_port``), start the copies at once.
    The caller stops them with ``stop_home_assistants``, also when this raises part way."""
    template = home_assistant(workdir / "ha-template", name="template")
    try:
        template.start()
    finally:
        template.stop()
    has = {name: home_assistant_copy(template, workdir / name, name=name, mqtt_port=mqtt_port) for name in names}
    with ThreadPoolExecutor(len(has)) as pool:
        list(pool.map(lambda ha: ha.start(), has.values()))
    return has


def stop_home_assistants(has: dict[str, HomeAssistant]) -> None:
    with ThreadPoolExecutor(max(len(has), 1)) as pool:
        list(pool.map(lambda ha: ha.stop(), has.values()))
