"""The Home Assistant add-on (addon/): its files as the Supervisor reads them, and its image run as the
Supervisor runs it, with a stand-in Supervisor (harness/standin_supervisor.py) in front of a real Home
Assistant and a real Mosquitto.

What is not the real thing: the Supervisor itself, and s6-overlay's /init (Home Assistant's base image is on
ghcr.io, which this machine cannot reach; harness/addon_base runs the add-on's s6 run and finish scripts as
s6 does). The add-on's Dockerfile, run and finish scripts, options and the agent are the shipped ones.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.brokers import MosquittoProcess
from harness.containers import ROOT, Container
from harness.ha import StartHA
from harness.standin_supervisor import StandInSupervisor
from harness.wait import wait_until
from hasync import __version__, supervisor
from hasync.config import load_config
from hasync.homeassistant.discovery import Discovery
from hasync.topics import Topics

ADDON = ROOT / "addon"
TOKEN = "addon-token-3f9c"  # the add-on's SUPERVISOR_TOKEN
# The Supervisor's option schema grammar (supervisor/addons/options.py), with "?" for optional.
_ELEMENT = re.compile(r"^(str|bool|email|url|port|password|device|float|int)(\(-?[\d.]*,-?[\d.]*\))?\??$|"
                      r"^match\(.+\)\??$|^list\([^)]+\)\??$")


def addon_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((ADDON / "config.yaml").read_text())
    return config


def test_the_addon_folder_is_what_the_supervisor_reads() -> None:
    config = addon_config()
    assert config["version"] == __version__ and config["slug"] == "hasync"
    assert config["init"] is False  # s6-overlay is PID 1
    assert config["host_network"] is True
    assert set(config["privileged"]) == {"NET_ADMIN", "NET_RAW"}  # the floating IP
    assert 60 <= config["timeout"] <= 300  # the Supervisor allows 10-300 s; a handover needs more than 10
    assert "mqtt:want" in config["services"] and config["homeassistant_api"] is True
    assert config["watchdog"] == f"http://[HOST]:[PORT:{supervisor.HTTP['port']}]/healthz"
    schema = config["schema"]

    def leaves(tree: dict[str, Any], path: str = "") -> list[tuple[str, Any]]:
        out = []
        for key, value in tree.items():
            if isinstance(value, dict):
                assert not path, f"{path}.{key}: the Supervisor's schema nests two levels at most"
                out += leaves(value, key)
            else:
                out.append((f"{path}.{key}" if path else key, value))
        return out

    for name, element in leaves(schema):
        for item in element if isinstance(element, list) else [element]:
            for leaf in item.values() if isinstance(item, dict) else [item]:  # a list of mappings: one level
                assert isinstance(leaf, str) and _ELEMENT.match(leaf), f"schema {name}: {leaf!r}"

    def keys(tree: dict[str, Any], path: str = "") -> set[str]:
        return {k for key, v in tree.items()
                for k in (keys(v, f"{path}{key}.") if isinstance(v, dict) else {f"{path}{key}"})}

    assert keys(config["options"]) <= keys(schema)
    # The options' defaults make a valid configuration of the agent (the broker from the Supervisor).
    tree = supervisor.options_tree(config["options"], TOKEN, hook_dir=Path("/nonexistent"))
    assert tree["http"] == supervisor.HTTP and "node_id" not in tree  # the host's name
    tree["broker"] = {"url": "mqtt://core-mosquitto:1883"}
    cfg = load_config(None, env={}, overrides={(key,): value for key, value in tree.items()})
    assert cfg.homeassistant.websocket_url == "http://supervisor/core/websocket" and cfg.sync.enabled
    # Exactly one add-on in the repository: the Supervisor takes every config.{json,yaml,yml} as one.
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    found = [p for p in listed.split() if re.search(r"(^|/)config\.(json|ya?ml)$", p)
             and not any(part.startswith(".") or part == "rootfs" for part in Path(p).parts)]
    assert found == ["addon/config.yaml"], found
    assert yaml.safe_load((ROOT / "repository.yaml").read_text())["name"]
    build = yaml.safe_load((ADDON / "build.yaml").read_text())
    assert set(build["build_from"]) == set(config["arch"])
    assert build["args"]["HASYNC_IMAGE"].endswith(f":{__version__}")
    translations = yaml.safe_load((ADDON / "translations" / "en.yaml").read_text())["configuration"]
    assert set(translations) == set(schema), "every option has a name and a description"
    service = ADDON / "rootfs/etc/s6-overlay/s6-rc.d"
    assert (service / "hasync/type").read_text().strip() == "longrun"
    assert (service / "user/contents.d/hasync").exists()
    for script in ("run", "finish"):
        assert os.access(service / "hasync" / script, os.X_OK)
    assert (ADDON / "DOCS.md").exists() and (ADDON / "README.md").exists()


def _options(**overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {**addon_config()["options"], "node_id": "ha-addon", **overrides}
    return options


def _run_addon(image: str, workdir: Path, sup: StandInSupervisor, options: dict[str, Any]) -> Container:
    data = workdir / "data"
    config = workdir / "config"
    (config / "hooks").mkdir(parents=True)
    data.mkdir()
    (data / "options.json").write_text(json.dumps(options))
    return Container(f"hasync-addon-{workdir.name}", image, options=[
        "--network", "host", "-e", f"SUPERVISOR_TOKEN={TOKEN}", "-e", f"HASYNC_SUPERVISOR_URL={sup.url}",
        "-v", f"{data}:/data", "-v", f"{config}:/config",
    ])


def _healthz() -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{supervisor.HTTP['port']}/healthz", timeout=2) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body
    except (OSError, ValueError):
        return None


@pytest.mark.integration
@pytest.mark.container
@pytest.mark.mosquitto
@pytest.mark.timeout(900)
def test_the_addon_reaches_home_assistant_through_the_supervisor_and_shows_its_device(
    addon_image: str, mosquitto: MosquittoProcess, start_ha: StartHA, tmp_path: Path,
) -> None:
    (ha,) = start_ha("ha-main", mqtt_port=mosquitto.port)
    mqtt = {"host": "127.0.0.1", "port": mosquitto.port, "ssl": False, "protocol": "3.1.1",
            "username": "", "password": ""}
    with StandInSupervisor(token=TOKEN, ha_url=ha.url, ha_token=ha.token, mqtt=mqtt) as sup:
        addon = _run_addon(addon_image, tmp_path / "good", sup, _options(topic_prefix=f"a{os.getpid()}"))
        try:
            status = wait_until(lambda: (s := _healthz()) and s["role"] == "primary"
                                and s.get("home_assistant", {}).get("healthy") and s,
                                90, "the add-on's agent to be primary and reach Home Assistant through the Supervisor")
            assert status["node"] == "ha-addon"
            assert sup.websockets >= 1 and sup.refused == 0  # through the proxy, with the add-on's token
            topics = Topics(f"a{os.getpid()}", "home")
            discovery = Discovery(topics, "ha-addon", "homeassistant", 0.0, __version__)
            sensor = f"binary_sensor.{discovery.unique_prefix}_primary".replace("-", "_")  # HA's object id
            ha.wait_for_state(sensor, "on", 60)
            devices = ha.websocket({"type": "config/device_registry/list"})[0]
            assert any(d["name"] == "hasync ha-addon" for d in devices), [d["name"] for d in devices]
            took, code = addon.stop(60)
            assert took < 60
            assert code == 0, addon.logs()[-3000:]  # SIGTERM through the init: a graceful stop
            assert "hasync agent ha-addon stopped" in addon.logs()
        except AssertionError:
            print(addon.logs()[-6000:])
            raise
        finally:
            addon.remove()


@pytest.mark.integration
@pytest.mark.container
@pytest.mark.timeout(900)
def test_a_bad_option_is_one_line_in_the_addon_log_and_stops_the_addon(
    addon_image: str, tmp_path: Path,
) -> None:
    with StandInSupervisor(token=TOKEN, ha_url="http://127.0.0.1:9", ha_token="x", mqtt=None) as sup:
        addon = _run_addon(addon_image, tmp_path / "bad", sup, _options(priority=5000,
                                                                         broker={"url": "mqtt://127.0.0.1:9"}))
        try:
            wait_until(lambda: not addon.running, 30, "the add-on to stop on a configuration error")
            assert addon.inspect()["State"]["ExitCode"] == 2
            errors = [line for line in addon.logs().splitlines() if line.startswith("hasync:")]
            assert errors[0].startswith("hasync: invalid add-on options"), errors
            assert any("priority" in line for line in addon.logs().splitlines()), addon.logs()
            assert "Traceback" not in addon.logs()
            assert errors[-1] == "hasync: stopping the add-on: fix the option named above, then start it again"
        finally:
            addon.remove()
