"""Running as a Home Assistant add-on: the configuration from the add-on's options and from the Supervisor.

Under the Supervisor (Home Assistant OS, Supervised), an add-on finds its options in
``/data/options.json`` and a token in ``SUPERVISOR_TOKEN``. hasync then reaches Home Assistant through
the Supervisor's proxy (the WebSocket API is ``http://supervisor/core/websocket``, authenticated with
that token; not ``<url>/api/websocket``), and, unless the options name a broker, uses the one the
Supervisor's MQTT service announces (the Mosquitto broker add-on). Role hooks are files in the add-on's
configuration folder (``/config/hooks/promote``, ``demote``, ``fault``, ``fence``), not shell text in the UI.

The options use the configuration file's own keys (``node_id``, ``priority``, ``broker.url``,
``homeassistant.managed_automations``...), so an error names the same key either way, except where the
Supervisor's option schema cannot nest as deep as the file (two levels): ``sync.include_domains`` for
``sync.include.domains`` (and the other selection lists), ``log_level`` for ``log.level``. An empty
``node_id`` is the host's name, as in the file. The HTTP endpoints listen on ``0.0.0.0:8765``, where the
Supervisor's watchdog asks for ``/healthz`` (on the host network it connects to the host's address).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from .config import AgentConfig, ConfigError, HookEvent, load_config

SUPERVISOR_URL = "http://supervisor"
OPTIONS = Path("/data/options.json")
HOOK_DIR = Path("/config/hooks")
EVENTS_FILE = "/data/events.jsonl"
SERVICE_TIMEOUT = 10.0  # seconds for the Supervisor to answer
HTTP = {"host": "0.0.0.0", "port": 8765}
# Options the Supervisor's schema cannot nest as deep as the configuration file: add-on key -> file path.
_FLAT: dict[tuple[str, ...], tuple[str, ...]] = {
    ("log_level",): ("log", "level"),
    **{("sync", f"{side}_{kind}"): ("sync", side, kind)
       for side in ("include", "exclude") for kind in ("domains", "entities", "entity_globs")},
}
# Set by the Supervisor, not by the user: an option naming them is a mistake worth one clear line.
_FROM_SUPERVISOR = {"url": "homeassistant.url", "token": "homeassistant.token",
                    "websocket_url": "homeassistant.websocket_url"}


class SupervisorError(Exception):
    """The add-on cannot be configured: one line for the add-on's log."""


def options_tree(options: Mapping[str, Any], token: str, *, supervisor: str = SUPERVISOR_URL,
                 hook_dir: Path = HOOK_DIR) -> dict[str, Any]:
    """The agent's configuration tree: the add-on's options, and what the Supervisor provides."""
    tree: dict[str, Any] = json.loads(json.dumps(dict(options)))  # a deep copy of plain JSON
    _unflatten(tree)
    if tree.get("node_id") == "":
        del tree["node_id"]
    if "http" in tree:
        raise SupervisorError("the option http is fixed in an add-on (0.0.0.0:8765, where the watchdog asks)")
    tree["http"] = dict(HTTP)
    ha = tree.setdefault("homeassistant", {})
    if not isinstance(ha, dict):
        raise SupervisorError("the option homeassistant must be a mapping")
    for key, name in _FROM_SUPERVISOR.items():
        if ha.get(key):
            raise SupervisorError(f"the option {name} is set by the Supervisor in an add-on; remove it")
    ha.update(url=f"{supervisor}/core", token=token, websocket_url=f"{supervisor}/core/websocket")
    if tree.get("hooks"):
        raise SupervisorError(f"hooks are files in the add-on's configuration folder ({hook_dir}/promote, "
                              "demote, fault, fence), not options")
    hooks = {}
    for name in [*(event.value for event in HookEvent), "fence"]:
        path = hook_dir / name
        if path.exists():
            if not os.access(path, os.X_OK):
                raise SupervisorError(f"the hook {path} is not executable (chmod +x)")
            hooks[name] = str(path)
    if hooks:
        tree["hooks"] = hooks
    tree.setdefault("events_file", EVENTS_FILE)
    return tree


def _unflatten(tree: dict[str, Any]) -> None:
    """The add-on's flat selection and log options at the configuration file's paths."""
    for flat, path in _FLAT.items():
        parent: Any = tree
        for key in flat[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or flat[-1] not in parent:
            continue
        value = parent.pop(flat[-1])
        target = tree
        for key in path[:-1]:
            node = target.setdefault(key, {})
            if not isinstance(node, dict):
                raise SupervisorError(f"the option {'.'.join(path[:-1])} must be a mapping")
            target = node
        target[path[-1]] = value


async def mqtt_service(token: str, *, supervisor: str = SUPERVISOR_URL) -> dict[str, Any]:
    """The ``broker`` section for the broker the Supervisor announces (the Mosquitto add-on)."""
    url = f"{supervisor}/services/mqtt"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SERVICE_TIMEOUT)) as session, \
                session.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise SupervisorError(f"cannot ask the Supervisor for its MQTT service at {url}: {exc or type(exc).__name__}") \
            from None
    data = body.get("data") if isinstance(body, dict) else None
    if response.status != 200 or not isinstance(data, dict) or not data.get("host"):
        raise SupervisorError("the Supervisor offers no MQTT service: install and start the Mosquitto broker "
                              "add-on, or set broker.url in this add-on's options")
    scheme = "mqtts" if data.get("ssl") else "mqtt"
    section: dict[str, Any] = {"url": f"{scheme}://{data['host']}:{int(data.get('port') or 1883)}"}
    if data.get("username"):
        section.update(username=str(data["username"]), password=str(data.get("password") or ""))
    return section


def read_options(path: Path = OPTIONS) -> dict[str, Any]:
    """The add-on's options, as the Supervisor wrote them."""
    try:
        options = json.loads(path.read_text())
    except OSError as exc:
        raise SupervisorError(f"cannot read the add-on's options {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise SupervisorError(f"the add-on's options {path} are not JSON: {exc}") from None
    if not isinstance(options, dict):
        raise SupervisorError(f"the add-on's options {path} are not a mapping")
    return options


async def configure(options: Mapping[str, Any], env: Mapping[str, str], *,
                    hook_dir: Path = HOOK_DIR) -> AgentConfig:
    """The agent's configuration as an add-on (``SupervisorError`` or ``ConfigError``, one line each)."""
    token = env.get("SUPERVISOR_TOKEN")
    if not token:
        raise SupervisorError("SUPERVISOR_TOKEN is not set: --addon is for running as a Home Assistant add-on")
    supervisor = env.get("HASYNC_SUPERVISOR_URL", SUPERVISOR_URL).rstrip("/")
    tree = options_tree(options, token, supervisor=supervisor, hook_dir=hook_dir)
    broker = tree.get("broker") or {}
    if not isinstance(broker, dict):
        raise SupervisorError("the option broker must be a mapping")
    if not broker.get("url"):
        tree["broker"] = {**{k: v for k, v in broker.items() if v not in (None, "")},
                          **await mqtt_service(token, supervisor=supervisor)}
    overrides: dict[tuple[str, ...], Any] = {(key,): value for key, value in tree.items()}
    try:
        return load_config(None, env={}, overrides=overrides)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("invalid configuration", "invalid add-on options", 1)) from None
