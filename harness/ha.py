"""A real Home Assistant Core as a child process, for integration tests.

Home Assistant lives in a virtual environment of its own, ``.cache/ha-venv`` (``scripts/setup-ha.sh``;
its library pins clash with hasync's), and always runs with ``--skip-pip``: the installer pre-installs
what HA would otherwise pip-install on its first start. The tests' environment talks to it over HTTP
only: the REST API through urllib, and the websocket (needed once, to create a long-lived token)
through aiohttp on a thread of its own, so every method also works from inside a running event loop.
Methods block; every wait polls with a deadline. In async tests, wrap the long waits
(``wait_for_state``) in ``asyncio.to_thread`` so MQTT clients on the loop keep running.

A controller owns a work directory::

    config/                   HA's config dir; configuration.yaml is rewritten before every start
    hasync-credentials.json   the owner's login and a long-lived token, written once after onboarding
    hass.log                  HA's log of the current run (HA moves the previous one to hass.log.1)
    hass.out                  HA's stdout and stderr, for crashes before its logging is set up

Onboarding happens once per config dir. Copying a stopped, onboarded instance (``copy_of``) keeps the
owner and the token valid: users, refresh tokens and the keys that sign access tokens all live in
``config/.storage/auth``. A copy gets its own HTTP port.

Exceptions::

    HomeAssistantError            base
    ├── HomeAssistantStartError   HA did not come up or could not be set up; the message ends with its log
    └── ApiError                  an HTTP call answered with an unexpected status
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import aiohttp
import yaml

from .brokers import terminate
from .wait import HOST, free_port

HA_VERSION = "2024.3.3"
HA_VENV = Path(__file__).resolve().parent.parent / ".cache" / "ha-venv"
HA_STAMP = HA_VENV / ".hasync-ha-installed"

# With the requirements pre-installed, a start takes 1-2 s here (3 s for two at once on two cores), a new
# config dir included; a cold disk or a slow machine take longer. Generous, as a timeout only fails a test.
START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
REQUEST_TIMEOUT = 10.0
_POLL_INTERVAL = 0.1

OWNER = {"name": "hasync tests", "username": "hasync", "password": "hasync-test-password", "language": "en"}

# The automation the tests fire: event hasync_test_press increments counter.presses.
TEST_EVENT = "hasync_test_press"
GATED_EVENT = "hasync_gated_press"

StatePredicate = Callable[[dict[str, Any] | None], bool]


class HomeAssistantError(RuntimeError):
    """Something went wrong with a Home Assistant under test."""


class HomeAssistantStartError(HomeAssistantError):
    """HA did not come up, or could not be onboarded or connected to MQTT, in time."""


class ApiError(HomeAssistantError):
    """An HTTP call to HA answered with an unexpected status."""

    def __init__(self, method: str, path: str, status: int, body: object) -> None:
        super().__init__(f"{method} {path} answered {status}: {body}")
        self.status = status
        self.body = body


def ha_installed() -> bool:
    """Whether scripts/setup-ha.sh has completed."""
    return (HA_VENV / "bin" / "hass").is_file() and HA_STAMP.is_file()


def configuration(name: str, port: int, *, bulk_helpers: int = 0, recorder: bool = False,
                  demo: bool = False, host: str = HOST) -> dict[str, Any]:
    """HA's configuration.yaml: a minimal core without default_config, plus the helpers the tests use.

    ``bulk_helpers``: that many more input_booleans, ``input_boolean.bulk_0000`` and on, off at start.
    ``recorder``: HA's recorder (SQLite in the config dir; HA refuses an in-memory one) and its history API,
    so a test can read every state change an entity went through, across restarts (``HomeAssistant.history``).
    """
    config: dict[str, Any] = {
        "homeassistant": {
            "name": name,
            "latitude": 52.52,
            "longitude": 13.405,
            "elevation": 34,
            "unit_system": "metric",
            "time_zone": "Europe/Berlin",
            "country": "DE",
        },
        "http": {"server_host": host, "server_port": port},
        "api": None,
        "websocket_api": None,
        "config": None,
        "onboarding": None,
        "scene": None,
        "script": None,
        "automation": [
            {
                "id": "hasync_test_press",
                "alias": "Count test presses",
                "trigger": [{"platform": "event", "event_type": TEST_EVENT}],
                "condition": [],
                "action": [{"service": "counter.increment", "target": {"entity_id": "counter.presses"}}],
            }
        ],
        # The seed's duplicated-action case: the same trigger reaches every instance; the condition
        # lets it run only where this instance's own hasync node (named like the instance) is primary.
        "automation gated": [
            {
                "id": "hasync_gated_press",
                "alias": "Count gated presses (primary only)",
                "trigger": [{"platform": "event", "event_type": GATED_EVENT}],
                "condition": [{"condition": "state", "entity_id": f"binary_sensor.hasync_test_{name}_primary",
                               "state": "on"}],
                "action": [{"service": "counter.increment", "target": {"entity_id": "counter.gated_presses"}}],
            }
        ],
        "input_boolean": {"test_flag": {"name": "Test flag"}},
        "input_number": {"test_level": {"name": "Test level", "min": 0, "max": 100, "step": 1, "mode": "box"}},
        "input_select": {"test_mode": {"name": "Test mode", "options": ["day", "night", "away"]}},
        "input_text": {"test_text": {"name": "Test text", "max": 100}},
        "counter": {"presses": {"name": "Presses", "initial": 0, "step": 1},
                    "gated_presses": {"name": "Gated presses", "initial": 0, "step": 1}},
        "logger": {
            "default": "warning",
            # Start-up time and discovered MQTT entities are worth having in a failed test's log.
            "logs": {"homeassistant.bootstrap": "info", "homeassistant.components.mqtt.discovery": "info"},
        },
    }
    config["input_boolean"].update({bulk_entity(i).partition(".")[2]: {"name": f"Bulk {i}"}
                                    for i in range(bulk_helpers)})
    if demo:
        # HA's demo integration: real lights, covers, climates, locks, fans... with devices and areas.
        config["demo"] = None
    if recorder:
        # commit_interval 0: every state change is readable through the history API at once.
        config["recorder"] = {"commit_interval": 0}
        config["history"] = None
    return config


def bulk_entity(i: int) -> str:
    return f"input_boolean.bulk_{i:04d}"


class HomeAssistant:
    """One Home Assistant instance: config dir, process, onboarding, optional MQTT config entry.

    ``mqtt_port``: if given, ``start()`` adds the MQTT integration for a broker on ``mqtt_host`` at that port
    (once per config dir), logging in as ``mqtt_username`` with ``mqtt_password`` if given, and returns only
    when its config entry is loaded; ``mqtt_discovery=False`` turns its MQTT discovery off (a federation hub's
    HA, which must not import its own exports). ``bulk_helpers``, ``recorder`` and ``demo`` (HA's demo
    integration) go to ``configuration()``. ``host``: the address HA's HTTP server listens on;
    ``command_prefix``: what runs HA's command (``ip netns exec NS`` to run it in a namespace of harness.netns,
    with ``host`` its address).
    """

    def __init__(
        self, workdir: Path, *, name: str, mqtt_port: int | None = None, mqtt_discovery: bool = True,
        bulk_helpers: int = 0, recorder: bool = False, demo: bool = False, mqtt_host: str = HOST,
        mqtt_username: str | None = None, mqtt_password: str | None = None, host: str = HOST,
        command_prefix: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.mqtt_port = mqtt_port
        self.mqtt_host = mqtt_host
        self.mqtt_username = mqtt_username
        self.mqtt_password = mqtt_password
        self.host = host
        self.command_prefix = list(command_prefix)
        self.mqtt_discovery = mqtt_discovery
        self.bulk_helpers = bulk_helpers
        self.recorder = recorder
        self.demo = demo
        self.config_dir = workdir / "config"
        self.log_path = workdir / "hass.log"
        self.out_path = workdir / "hass.out"
        self.credentials_path = workdir / "hasync-credentials.json"
        self.port = free_port()
        self.start_seconds: float | None = None  # how long the last start() took
        self._process: subprocess.Popen[bytes] | None = None
        self._token: str | None = None

    @classmethod
    def copy_of(cls, template: HomeAssistant, workdir: Path, *, name: str, **options: Any) -> Self:
        """A new instance on a copy of ``template``'s (stopped, onboarded) config dir and credentials;
        ``options`` as for the constructor."""
        if template.running:
            raise HomeAssistantError("stop the template before copying it: HA writes .storage while it runs")
        if not template.credentials_path.is_file():
            raise HomeAssistantError(f"{template.workdir} was never onboarded")
        copy = cls(workdir, name=name, **options)
        shutil.copytree(template.config_dir, copy.config_dir)
        shutil.copy2(template.credentials_path, copy.credentials_path)
        return copy

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def token(self) -> str:
        """The owner's long-lived access token."""
        if self._token is None:
            if not self.credentials_path.is_file():
                raise HomeAssistantError("no token before the first start()")
            self._token = str(json.loads(self.credentials_path.read_text())["token"])
        return self._token

    @property
    def pid(self) -> int:
        """The running HA's process id."""
        if self._process is None:
            raise HomeAssistantError(f"{self.name} is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start HA and return when it runs, is onboarded and (with ``mqtt_port``) has MQTT loaded."""
        if self.running:
            raise HomeAssistantError(f"{self.name} is already running")
        started = time.monotonic()
        deadline = started + START_TIMEOUT
        try:
            self._start_http(deadline)
            self._ensure_onboarded()
            self._wait_running(deadline)
            if self.mqtt_port is not None:
                self._ensure_mqtt(deadline)
        except BaseException as exc:
            self.kill()
            if isinstance(exc, HomeAssistantError):
                raise HomeAssistantStartError(self._failure(str(exc))) from exc
            raise
        self.start_seconds = time.monotonic() - started

    def stop(self) -> None:
        """Stop gracefully (SIGTERM: HA saves .storage), killing it after STOP_TIMEOUT."""
        process = self._process
        if process is None:
            return
        terminate(process, STOP_TIMEOUT)
        self._process = None

    def kill(self) -> None:
        """Kill at once (SIGKILL), as in a crash: nothing is saved."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
            process.wait()
        self._process = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- REST API -------------------------------------------------------------------------------------

    def get_state(self, entity_id: str) -> dict[str, Any] | None:
        """The entity's state object, or None if HA has no such entity."""
        status, body = self._request("GET", f"/api/states/{entity_id}", expect=(200, 404))
        return body if status == 200 else None

    def states(self) -> list[dict[str, Any]]:
        """All state objects."""
        _, body = self._request("GET", "/api/states")
        return list(body)

    def wait_for_state(
        self, entity_id: str, expected: str | StatePredicate, timeout: float = 30.0
    ) -> dict[str, Any] | None:
        """Poll until the entity's state equals ``expected`` (or the predicate accepts the state object,
        which is None while the entity does not exist); return that state object."""
        if callable(expected):
            predicate = expected
        else:

            def predicate(state: dict[str, Any] | None) -> bool:
                return state is not None and state["state"] == expected

        deadline = time.monotonic() + timeout
        while True:
            try:
                state = self.get_state(entity_id)
            except OSError as exc:
                if self.running:
                    raise
                raise HomeAssistantError(self._failure(f"is not running; was waiting for {entity_id}")) from exc
            if predicate(state):
                return state
            if time.monotonic() >= deadline:
                shown = "absent" if state is None else repr(state["state"])
                raise TimeoutError(f"{entity_id} did not become {expected!r} within {timeout} s; it is {shown}")
            time.sleep(_POLL_INTERVAL)

    def call_service(self, domain: str, service: str, data: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Call a service; returns the states it changed."""
        _, body = self._request("POST", f"/api/services/{domain}/{service}", data or {})
        return list(body)

    def fire_event(self, event_type: str, data: dict[str, Any] | None = None) -> None:
        self._request("POST", f"/api/events/{event_type}", data or {})

    def websocket(self, *commands: dict[str, Any]) -> list[Any]:
        """Send websocket commands (without ids) on one connection, in order; return their results.
        Raises HomeAssistantError if HA answers one with an error."""
        return self._websocket(list(commands), self.token)

    def subscribe(self, message: dict[str, Any]) -> Subscription:
        """A websocket subscription (``subscribe_events``, ``subscribe_trigger``...) recording what it delivers;
        close it (or use it as a context manager)."""
        return Subscription(self.url.replace("http", "ws", 1) + "/api/websocket", self.token, message)

    def history(self, entity_ids: list[str], since: float, timeout: float = 15.0) -> dict[str, list[dict[str, Any]]]:
        """Each entity's states from wall time ``since`` on, oldest first: the one it had then (if any), then
        every change, attribute-only ones included (``{"s": state, "a": attributes, "lu": last_updated}``).
        Needs ``recorder=True``. The recorder stores changes on a thread of its own: this polls until it has
        stored the state each entity shows now. Entities without a state in that time are left out."""
        start = datetime.fromtimestamp(since, UTC).isoformat()
        command = {"type": "history/history_during_period", "start_time": start, "entity_ids": entity_ids,
                   "significant_changes_only": False, "minimal_response": False, "no_attributes": False}
        deadline = time.monotonic() + timeout
        while True:
            now = {s["entity_id"]: datetime.fromisoformat(s["last_updated"]).timestamp() for s in self.states()}
            [result] = self.websocket(command)
            # (An entity's state at ``since`` comes first, with ``since`` as its time.)
            behind = [e for e in entity_ids
                      if now.get(e, 0) > since and abs(result.get(e, [{"lu": 0}])[-1]["lu"] - now[e]) > 1e-3]
            if not behind:
                return dict(result)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"HA's recorder did not store the current state of {behind[:5]} within {timeout} s")
            time.sleep(_POLL_INTERVAL)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of HA's log of this run (or of its stdout/stderr when it died before logging)."""
        for path in (self.log_path, self.out_path):
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            if text.strip():
                return text[-chars:]
        return "(no log)"

    # --- start-up -------------------------------------------------------------------------------------

    def _start_http(self, deadline: float) -> None:
        """Start the process and wait until its HTTP API answers; move to a new port if ours was taken."""
        while True:
            self._write_config()
            self._spawn()
            if self._wait_http(deadline):
                return
            # Someone took our free_port() before HA bound it; HA carries on without HTTP then.
            self.kill()
            self.port = free_port()

    def _write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        config = configuration(self.name, self.port, bulk_helpers=self.bulk_helpers, recorder=self.recorder,
                               demo=self.demo, host=self.host)
        text = yaml.safe_dump(config, sort_keys=False)
        (self.config_dir / "configuration.yaml").write_text(text)

    def _spawn(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        command = [
            *self.command_prefix,
            str(HA_VENV / "bin" / "hass"),
            "--config",
            str(self.config_dir),
            "--skip-pip",
            "--log-file",
            str(self.log_path),
            "--log-no-color",
        ]
        with self.out_path.open("ab") as out:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)

    def _wait_http(self, deadline: float) -> bool:
        """True once GET /api/onboarding answers (it needs no token); False if the port was taken."""
        port_taken = f"Failed to create HTTP server at port {self.port}"
        while True:
            try:
                status, _ = self._request("GET", "/api/onboarding", auth=False, expect=(200,), timeout=2.0)
            except (OSError, ApiError):
                pass
            else:
                if status == 200:
                    return True
            if not self.running:
                raise HomeAssistantError("exited during start-up")
            if self.log_path.is_file() and port_taken in self.log_path.read_text(errors="replace"):
                return False
            if time.monotonic() >= deadline:
                raise HomeAssistantError(f"its HTTP API did not answer within {START_TIMEOUT} s")
            time.sleep(_POLL_INTERVAL)

    def _ensure_onboarded(self) -> None:
        if self.credentials_path.is_file():
            self._request("GET", "/api/")  # the stored token must still be accepted
            return
        _, steps = self._request("GET", "/api/onboarding", auth=False)
        if any(step["step"] == "user" and step["done"] for step in steps):
            raise HomeAssistantError(f"onboarded before, but {self.credentials_path} with its token is gone")
        client_id = f"{self.url}/"
        _, created = self._request("POST", "/api/onboarding/users", {"client_id": client_id, **OWNER}, auth=False)
        form = {"grant_type": "authorization_code", "code": created["auth_code"], "client_id": client_id}
        _, tokens = self._request("POST", "/auth/token", form=form, auth=False)
        token = self._create_long_lived_token(str(tokens["access_token"]))
        credentials = {"username": OWNER["username"], "password": OWNER["password"], "token": token}
        self.credentials_path.write_text(json.dumps(credentials, indent=2) + "\n")
        self._token = token

    def _create_long_lived_token(self, access_token: str) -> str:
        request = {"type": "auth/long_lived_access_token", "client_name": "hasync tests", "lifespan": 3650}
        [token] = self._websocket([request], access_token)
        return str(token)

    def _websocket(self, commands: list[dict[str, Any]], access_token: str) -> list[Any]:
        # asyncio.run() on a thread of its own: the caller may be inside a running event loop.
        with ThreadPoolExecutor(1, thread_name_prefix="ha-websocket") as pool:
            return pool.submit(asyncio.run, self._websocket_commands(commands, access_token)).result()

    async def _websocket_commands(self, commands: list[dict[str, Any]], access_token: str) -> list[Any]:
        async with (
            asyncio.timeout(REQUEST_TIMEOUT),
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{self.url}/api/websocket", max_msg_size=0) as ws,
        ):
            await _authenticate(ws, access_token)
            results = []
            for msg_id, command in enumerate(commands, start=1):
                await ws.send_json({"id": msg_id, **command})
                while (answer := await ws.receive_json()).get("id") != msg_id or answer.get("type") != "result":
                    pass  # an event of a subscription (none here) or a late answer
                if not answer.get("success"):
                    raise HomeAssistantError(f"{command['type']} answered {answer}")
                results.append(answer.get("result"))
            return results

    def _wait_running(self, deadline: float) -> None:
        """Wait for the core state RUNNING: HTTP answers while later integrations are still set up."""
        while True:
            _, config = self._request("GET", "/api/config")
            if config.get("recovery_mode") or config.get("safe_mode"):
                raise HomeAssistantError("started in recovery mode (an integration failed to import)")
            if config.get("state") == "RUNNING":
                return
            if time.monotonic() >= deadline:
                raise HomeAssistantError(f"core state {config.get('state')!r}, not RUNNING, after {START_TIMEOUT} s")
            time.sleep(_POLL_INTERVAL)

    def _ensure_mqtt(self, deadline: float) -> None:
        """Add the MQTT config entry unless the config dir has one; wait until it is loaded."""
        entries = "/api/config/config_entries/entry?domain=mqtt"
        _, existing = self._request("GET", entries)
        if not existing:
            _, flow = self._request("POST", "/api/config/config_entries/flow", {"handler": "mqtt"})
            if flow.get("type") == "form":
                _, flow = self._request("POST", f"/api/config/config_entries/flow/{flow['flow_id']}",
                                        self._mqtt_broker())
            if flow.get("type") != "create_entry":
                raise HomeAssistantError(f"the MQTT config flow for port {self.mqtt_port} ended with {flow}")
            if not self.mqtt_discovery:
                self._mqtt_options({"discovery": False})
        while True:
            _, existing = self._request("GET", entries)
            if existing and existing[0]["state"] == "loaded":
                return
            if time.monotonic() >= deadline:
                raise HomeAssistantError(f"the MQTT config entry is not loaded after {START_TIMEOUT} s: {existing}")
            time.sleep(_POLL_INTERVAL)

    def _mqtt_broker(self) -> dict[str, Any]:
        """The MQTT entry's broker step: address, port and the login if any."""
        broker: dict[str, Any] = {"broker": self.mqtt_host, "port": self.mqtt_port}
        if self.mqtt_username is not None:
            broker.update(username=self.mqtt_username, password=self.mqtt_password or "")
        return broker

    def _mqtt_options(self, options: dict[str, Any]) -> None:
        """The MQTT entry's options flow (the broker again, then the options; the rest keep their defaults),
        and the reload of the entry that follows it. (HA reloads it in a task of its own: until then the old
        entry shows loaded, and while it reloads ``mqtt.publish`` is missing, which an agent's health check
        then reports as HA's MQTT connection down.)"""
        _, [entry] = self._request("GET", "/api/config/config_entries/entry?domain=mqtt")

        def mqtt(state: Callable[[str], bool]) -> Callable[[Any], bool]:
            return lambda changes: any(isinstance(c, dict) and c.get("entry", {}).get("entry_id") == entry["entry_id"]
                                       and state(c["entry"].get("state", "")) for c in changes)

        path = "/api/config/config_entries/options/flow"
        with self.subscribe({"type": "config_entries/subscribe"}) as changes:
            _, flow = self._request("POST", path, {"handler": entry["entry_id"]})
            for step in (self._mqtt_broker(), options):
                if flow.get("type") != "form":
                    break
                _, flow = self._request("POST", f"{path}/{flow['flow_id']}", step)
            if flow.get("type") != "create_entry":
                raise HomeAssistantError(f"the MQTT options flow ended with {flow}")
            unloaded, _ = changes.wait_for(mqtt(lambda state: state != "loaded"), REQUEST_TIMEOUT,
                                           "the MQTT entry to reload with its new options")
            changes.wait_for(mqtt(lambda state: state == "loaded"), START_TIMEOUT, "the MQTT entry loaded again",
                             start=unloaded + 1)

    # --- plumbing -------------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        form: dict[str, str] | None = None,
        auth: bool = True,
        expect: tuple[int, ...] = (200, 201),
        timeout: float = REQUEST_TIMEOUT,
    ) -> tuple[int, Any]:
        headers = {}
        data = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
            exc.close()
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        if status not in expect:
            raise ApiError(method, path, status, parsed)
        return status, parsed

    def _failure(self, what: str) -> str:
        return f"Home Assistant {self.name!r} ({self.url}) {what}; log {self.log_path}:\n{self.log_tail()}"


async def _authenticate(ws: aiohttp.ClientWebSocketResponse, access_token: str) -> None:
    greeting = await ws.receive_json()
    if greeting.get("type") != "auth_required":
        raise HomeAssistantError(f"websocket greeted with {greeting}")
    await ws.send_json({"type": "auth", "access_token": access_token})
    if (answer := await ws.receive_json()).get("type") != "auth_ok":
        raise HomeAssistantError(f"websocket authentication answered {answer}")


class Subscription:
    """One websocket subscription of a Home Assistant, on a thread of its own (the tests are synchronous):
    ``events`` holds every event it delivered, in order (HA's ``event`` object: for ``subscribe_events`` the
    event with its ``time_fired``, for ``subscribe_trigger`` the trigger's variables)."""

    def __init__(self, url: str, token: str, message: dict[str, Any]) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self._error: BaseException | None = None
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._run(url, token, message))
        self._thread = threading.Thread(target=self._serve, name="ha-subscription", daemon=True)
        self._thread.start()
        if not self._subscribed.wait(REQUEST_TIMEOUT + 5) or self._error is not None:
            self.close()
            raise HomeAssistantError(f"could not subscribe with {message}: {self._error!r}")

    def _serve(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # close()
            self._loop.run_until_complete(self._task)

    async def _run(self, url: str, token: str, message: dict[str, Any]) -> None:
        try:
            async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as ws:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await _authenticate(ws, token)
                    await ws.send_json({"id": 1, **message})
                    answer = await ws.receive_json()
                if not answer.get("success"):
                    raise HomeAssistantError(f"{message['type']} answered {answer}")
                self._subscribed.set()
                async for frame in ws:
                    if frame.type is not aiohttp.WSMsgType.TEXT:
                        break
                    data = json.loads(frame.data)
                    if data.get("type") == "event":
                        with self._changed:
                            self.events.append(data["event"])
                            self._changed.notify_all()
        except Exception as exc:  # reported by the constructor, or by wait_for as the subscription's end
            self._error = exc
        finally:
            self._subscribed.set()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str,
                 start: int = 0) -> tuple[int, dict[str, Any]]:
        """The first event from index ``start`` on that ``predicate`` accepts, and its index; waits for it up to
        ``timeout`` seconds (AssertionError naming ``what``)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for index in range(start, len(self.events)):
                    if predicate(self.events[index]):
                        return index, self.events[index]
                start = len(self.events)
                remaining = deadline - time.monotonic()
                if self._task.done():
                    raise AssertionError(f"the subscription ended ({self._error!r}) while waiting for {what}")
                if remaining <= 0:
                    raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
                self._changed.wait(min(remaining, 1.0))

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join(REQUEST_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


StartHA = Callable[..., list[HomeAssistant]]
"""The ``start_ha`` fixture: ``start_ha(*names, mqtt_port=None, each=None, **options)`` starts copies of the
onboarded template (``options`` as for ``HomeAssistant``; ``each`` maps a name to more options for that one)."""


def start_home_assistants(workdir: Path, names: list[str], mqtt_port: int,
                          options: dict[str, dict[str, Any]] | None = None) -> dict[str, HomeAssistant]:
    """Onboard a template instance once, copy it per name (MQTT on ``mqtt_port``; ``options[name]`` as for
    ``HomeAssistant``), start the copies at once. The caller stops them with ``stop_home_assistants``, also
    when this raises part way."""
    template = HomeAssistant(workdir / "ha-template", name="template")
    try:
        template.start()
    finally:
        template.stop()
    has = {name: HomeAssistant.copy_of(template, workdir / name, name=name, mqtt_port=mqtt_port,
                                       **(options or {}).get(name, {})) for name in names}
    with ThreadPoolExecutor(len(has)) as pool:
        list(pool.map(lambda ha: ha.start(), has.values()))
    return has


def stop_home_assistants(has: dict[str, HomeAssistant]) -> None:
    with ThreadPoolExecutor(max(len(has), 1)) as pool:
        list(pool.map(lambda ha: ha.stop(), has.values()))
