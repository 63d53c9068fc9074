"""The Home Assistant edge: the only module that talks to Home Assistant.

Theory of operation
-------------------
:class:`HomeAssistantLink` keeps one WebSocket connection to ``{url}/api/websocket``. A connection is
made in two steps, both bounded by ``timeout``: the HTTP upgrade, then the auth phase
(``auth_required`` -> ``{"type": "auth", "access_token": ...}`` -> ``auth_ok`` or ``auth_invalid``).
Every request on a connection carries an id, counted from 1 per connection; a single receive task
(``hasync.homeassistant.receive``) matches each ``result``/``pong`` to the waiting request and hands
``event`` messages to their subscription. When the connection ends, every waiting request fails with
:class:`NotConnected` at once, and the supervisor (``hasync.homeassistant.connection``) reconnects.

Reconnect policy lives in the supervisor alone: exponential backoff with full jitter from
``reconnect_min`` to the cap ``reconnect_max`` (the backoff is reset once a connection has passed a
check). A rejected token is permanent: it is retried only every ``reconnect_max`` seconds, since
every attempt also shows up in HA as a failed login.

Health, checked every ``check_interval`` seconds on the live connection:

1. HA answers ``{"type": "ping"}`` with a pong within ``timeout``. A missed pong means HA is hung or
   the TCP connection is half-open: the connection is dropped and made anew.
2. The MQTT config entry (``config_entries/get`` with ``domain: mqtt``) is ``loaded``. This catches
   an integration that is missing, failed to set up (``setup_retry``) or is disabled.
3. HA's MQTT client is connected to its broker, proven by an echo. In HA 2024.3 the MQTT config
   entry stays ``loaded`` while its broker is unreachable (checked: broker stopped, entry still
   ``loaded``), and no websocket command reports the MQTT client's connection state. So the link
   subscribes through HA to a probe topic of its own (``mqtt/subscribe``, an admin-only command) and
   has HA publish a payload of its own there (the ``mqtt.publish`` service, QoS 0, not retained);
   healthy means it came back through the broker to HA within ``timeout``. While HA's MQTT client is
   disconnected the publish fails at once ("Error talking to MQTT: The client is not currently
   connected."), so a stopped broker is seen at the next check; a silent network partition is seen
   when the echo does not arrive. The probe is re-published every half second within one check,
   because HA subscribes to the broker after a short debounce (up to 1 s), not before it answers
   ``mqtt/subscribe``. HA logs a traceback for every publish that fails, so while its MQTT client is
   known to be down the probe runs only every ``5 * check_interval``; ping and entry checks go on.
   Why not watch an MQTT entity turn ``unavailable``? It needs an entity of a known id that has no
   availability topic and no ``expire_after`` of its own, and would tie this module to discovery.
   The cost: each probe is a service call, which HA's recorder stores as a ``call_service`` event
   (one row per check; users may exclude that event type in ``recorder:``).

``healthy`` is True iff all three pass; ``detail`` says what failed (``"ok"`` when healthy).

State watching (for entity sync), when ``on_states`` and ``on_state_changed`` are given: on every new
connection the link subscribes to ``state_changed`` events and then asks for ``get_states``. HA sends both
over the one websocket in the order it handled them, so every event that arrives before the ``get_states``
answer is already reflected in it: those events are discarded, ``on_states(states)`` gets the snapshot, and
every later event goes to ``on_state_changed(event)`` in order. With ``event_types``, the link also subscribes
to those events (before the snapshot, on every connection) and hands each to ``on_event(event)``: the
federation hub follows the registries this way (a subscription HA refuses is logged once and done without;
whatever changed while the link was down, the snapshot that follows a reconnect says to look again).
:meth:`apply_states` sets entities through HA's reproduce-state path (``scene.apply``) and returns the
context id of the call: the ``state_changed`` events it caused carry that id (and arrive before the call's
answer).
``on_change(healthy, detail)`` is called with the first result and then on every flip. A failure is
logged at WARNING (a rejected token at ERROR) the first time its detail is seen in a streak of
failures, and at DEBUG when it repeats; recovery is logged at INFO.

The exceptions are in ``hasync.homeassistant.errors``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import aiohttp

from ..aio import Backoff, wait_or
from .errors import AuthError, CommandFailed, NotConnected, RequestTimeout
from .probe import MqttProbe
from .websocket import Connection, OpenWebSocket, aiohttp_opener, authenticate

logger = logging.getLogger(__name__)

_DOWN_PROBE_FACTOR = 5  # while HA's MQTT client is down, probe every this many check intervals
WS_PATH = "/api/websocket"


class _Lifecycle(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class HomeAssistantLink:
    """One supervised websocket connection to Home Assistant, its health, and automation control.

    ``async with HomeAssistantLink(url, token, on_change=...) as link:`` connects in the background:
    entering never fails because HA is down; ``on_change(healthy, detail)`` reports the first result and
    every flip of ``healthy``. Requests (:meth:`set_automations`) raise :class:`NotConnected` while there
    is no live connection. ``probe_topic`` is the MQTT topic of the echo check (a random one by default);
    HA's MQTT user must be allowed to publish and subscribe to it. ``ha_version`` is what HA reported
    when the link last authenticated.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        on_change: Callable[[bool, str], None],
        session: aiohttp.ClientSession | None = None,
        check_interval: float = 2.0,
        timeout: float = 5.0,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        probe_topic: str | None = None,
        on_states: Callable[[list[dict[str, Any]]], None] | None = None,
        on_state_changed: Callable[[dict[str, Any]], None] | None = None,
        event_types: Sequence[str] = (),
        on_event: Callable[[dict[str, Any]], None] | None = None,
        websocket_url: str | None = None,
        open_websocket: OpenWebSocket | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Home Assistant url must be an http:// or https:// URL with a host, got {url!r}")
        if not token:
            raise ValueError("the Home Assistant access token must not be empty")
        if not (check_interval > 0 and timeout > 0 and 0 < reconnect_min <= reconnect_max):
            raise ValueError(
                "check_interval and timeout must be > 0 and 0 < reconnect_min <= reconnect_max, got "
                f"{check_interval=}, {timeout=}, {reconnect_min=}, {reconnect_max=}"
            )
        topic = probe_topic if probe_topic is not None else f"hasync/ha-probe/{secrets.token_hex(6)}"
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"probe_topic must be a topic without wildcards, got {topic!r}")
        self.url = url.rstrip("/")
        self._token = token
        self._on_change = on_change
        self._session = session
        self._owns_session = False
        self._check_interval = check_interval
        self._timeout = timeout
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max
        self._probe_topic = topic
        self._probe_payload = f"hasync probe {secrets.token_hex(8)}"
        self._lifecycle = _Lifecycle.NEW
        self._task_group: asyncio.TaskGroup | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._conn: Connection | None = None
        self._healthy = False
        self._detail = "not checked yet"
        self._reported: bool | None = None
        self._failures_logged: set[str] = set()
        self.ha_version: str | None = None
        self._on_states = on_states
        self._on_state_changed = on_state_changed
        self._event_types = tuple(event_types) if on_event is not None else ()
        self._on_event = on_event
        self._refused_events: set[str] = set()
        self.websocket_url = websocket_url or self.url + WS_PATH
        self._open_websocket = open_websocket

    # ---- queries ----------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """True iff the last check passed: HA answers, its MQTT entry is loaded and its MQTT link works."""
        return self._healthy

    @property
    def detail(self) -> str:
        """``"ok"`` when healthy, otherwise what failed last."""
        return self._detail

    @property
    def connected(self) -> bool:
        """Whether there is an authenticated websocket connection (healthy or not)."""
        return self._conn is not None and not self._conn.closed.is_set()

    # ---- lifecycle --------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._lifecycle is _Lifecycle.RUNNING:
            raise RuntimeError("This HomeAssistantLink is already running.")
        if self._lifecycle is _Lifecycle.CLOSED:
            raise RuntimeError("Cannot reopen a HomeAssistantLink once it has been closed.")
        self._lifecycle = _Lifecycle.RUNNING
        if self._open_websocket is None:
            if self._session is None:
                self._session = aiohttp.ClientSession()
                self._owns_session = True
            self._open_websocket = aiohttp_opener(self._session)
        self._task_group = asyncio.TaskGroup()
        await self._task_group.__aenter__()
        self._supervisor = self._task_group.create_task(self._supervise(), name="hasync.homeassistant.connection")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lifecycle = _Lifecycle.CLOSED
        if self._supervisor is not None:
            self._supervisor.cancel()
        try:
            if self._task_group is not None:
                await self._task_group.__aexit__(exc_type, exc, tb)
        finally:
            if self._owns_session and self._session is not None:
                await self._session.close()

    # ---- commands ---------------------------------------------------------------------------------

    async def command(self, message: dict[str, Any]) -> Any:
        """Send one command on the live connection and return its result (see ``Connection.command``)."""
        return await self._live().command(message)

    async def apply_states(self, entities: dict[str, dict[str, Any]]) -> str:
        """Set entities with ``scene.apply`` (``{entity_id: {"state": "on", **attributes}}``, states as
        strings); return the context id HA gave the call. Entities HA does not have are skipped by HA."""
        conn = self._live()
        result = await conn.command(
            {"type": "call_service", "domain": "scene", "service": "apply", "service_data": {"entities": entities}}
        )
        context = result.get("context") if isinstance(result, dict) else None
        context_id = context.get("id") if isinstance(context, dict) else None
        if not isinstance(context_id, str):
            raise CommandFailed("call_service", "no_context", f"Home Assistant answered scene.apply with {result!r}")
        return context_id

    async def delete_helper(self, entity_id: str) -> None:
        """Delete a helper made in HA's UI (``{domain}/delete`` with its storage id). YAML helpers cannot be
        deleted this way: HA answers with an error, raised as :class:`CommandFailed`."""
        conn = self._live()
        domain = entity_id.partition(".")[0]
        entry = await conn.command({"type": "config/entity_registry/get", "entity_id": entity_id})
        unique_id = entry.get("unique_id") if isinstance(entry, dict) else None
        if not isinstance(unique_id, str):
            raise CommandFailed("config/entity_registry/get", "no_unique_id", f"{entity_id} has no storage id")
        await conn.command({"type": f"{domain}/delete", f"{domain}_id": unique_id})

    def _live(self) -> Connection:
        conn = self._conn
        if conn is None or conn.closed.is_set():
            raise NotConnected(f"not connected to Home Assistant at {self.url}: {self._detail}")
        return conn

    # ---- supervisor -------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        backoff = Backoff(self._reconnect_min, self._reconnect_max)
        while True:
            permanent = False
            try:
                conn = await self._connect()
            except AuthError as exc:
                permanent = True
                self._record(
                    False,
                    f"access token rejected by Home Assistant at {self.url}",
                    level=logging.ERROR,
                    message=(
                        f"Home Assistant at {self.url} rejected the access token (auth_invalid: {exc}): create a "
                        f"long-lived access token in your Home Assistant profile (Security tab) and configure it; "
                        f"retrying every {self._reconnect_max:g}s"
                    ),
                )
            except NotConnected as exc:
                self._record(False, str(exc))
            except Exception:
                logger.exception("connecting to Home Assistant at %s failed unexpectedly", self.url)
                self._record(False, f"connecting to Home Assistant at {self.url} failed unexpectedly")
            else:
                try:
                    if await self._serve(conn):
                        backoff.reset()
                except Exception:
                    # A bug: log it, count it as a lost connection and reconnect rather than die.
                    logger.exception("the connection to Home Assistant at %s failed unexpectedly", self.url)
                    self._record(False, f"the connection to Home Assistant at {self.url} failed unexpectedly")
            await asyncio.sleep(backoff.next_delay(permanent=permanent))

    async def _connect(self) -> Connection:
        assert self._open_websocket is not None
        ws = await self._open_websocket(self.websocket_url, self._timeout)
        conn, self.ha_version = await authenticate(ws, self.url, self._token, self._timeout)
        return conn

    async def _serve(self, conn: Connection) -> bool:
        """Run the checks until the connection ends; True if any check on it passed."""
        self._conn = conn
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(conn.receive_loop(), name="hasync.homeassistant.receive")
            if self._on_states is not None:
                tasks.create_task(self._watch_states(conn), name="hasync.homeassistant.states")
            try:
                return await self._check_loop(conn)
            finally:
                self._conn = None
                # Ends the receive loop; bounded by the websocket's close timeout (``timeout``).
                await conn.close()

    async def _watch_states(self, conn: Connection) -> None:
        """Subscribe to state changes, then take the snapshot (see the module docstring); retried every
        ``check_interval`` while HA answers with an error or not in time; ends with the connection."""
        on_states, on_changed = self._on_states, self._on_state_changed
        assert on_states is not None and on_changed is not None
        snapshot_taken = False

        def handle(event: Any) -> None:
            if snapshot_taken and isinstance(event, dict):
                on_changed(event)

        def snapshot(states: Any) -> None:
            nonlocal snapshot_taken
            snapshot_taken = True
            on_states(states if isinstance(states, list) else [])

        while not conn.closed.is_set():
            subscriptions: list[int] = []
            try:
                try:
                    await self._subscribe_events(conn, subscriptions)
                    subscriptions.append(await conn.subscribe(
                        {"type": "subscribe_events", "event_type": "state_changed"}, handle))
                    await conn.command({"type": "get_states"}, on_answer=snapshot)
                except BaseException:
                    for subscription in subscriptions:
                        conn.forget(subscription)
                    raise
            except NotConnected:
                return
            except (CommandFailed, RequestTimeout) as exc:
                logger.warning("cannot watch Home Assistant's states at %s: %s; retrying", self.url, exc)
                await wait_or(conn.closed, self._check_interval)
                continue
            return

    async def _subscribe_events(self, conn: Connection, subscriptions: list[int]) -> None:
        """Subscribe to ``event_types``, appending each subscription to ``subscriptions``."""
        on_event = self._on_event

        def handle(event: Any) -> None:
            if on_event is not None and isinstance(event, dict):
                on_event(event)

        for event_type in self._event_types:
            try:
                subscriptions.append(await conn.subscribe({"type": "subscribe_events", "event_type": event_type},
                                                          handle))
            except CommandFailed as exc:
                if event_type not in self._refused_events:
                    self._refused_events.add(event_type)
                    logger.warning("Home Assistant at %s refused a subscription to %s events: %s", self.url,
                                   event_type, exc)

    async def _check_loop(self, conn: Connection) -> bool:
        loop = asyncio.get_running_loop()
        probe = MqttProbe(
            self._probe_topic, self._probe_payload, self._timeout, _DOWN_PROBE_FACTOR * self._check_interval
        )
        passed = False
        while True:
            started = loop.time()
            try:
                ok, detail = await self._check(conn, probe)
            except NotConnected:
                self._record(False, conn.lost_reason or f"connection to Home Assistant at {self.url} lost")
                return passed
            except RequestTimeout as exc:
                # HA is hung or the connection is half-open: a new connection is the way to find out.
                self._record(False, str(exc))
                return passed
            passed = passed or ok
            self._record(ok, detail)
            if await wait_or(conn.closed, max(0.0, self._check_interval - (loop.time() - started))):
                self._record(False, conn.lost_reason)
                return passed

    async def _check(self, conn: Connection, probe: MqttProbe) -> tuple[bool, str]:
        await conn.command({"type": "ping"})
        try:
            entries = await conn.command({"type": "config_entries/get", "domain": "mqtt"})
        except CommandFailed as exc:
            return False, f"Home Assistant cannot list its config entries ({exc.code}: {exc.message})"
        entries = entries if isinstance(entries, list) else []
        states = [entry.get("state") for entry in entries if isinstance(entry, dict)]
        if not states:
            probe.reset(conn)
            return False, "the MQTT integration is not set up in Home Assistant"
        if "loaded" not in states:
            probe.reset(conn)
            return False, f"MQTT integration not loaded (state: {states[0]})"
        return await probe.run(conn)

    # ---- reporting --------------------------------------------------------------------------------

    def _record(self, ok: bool, detail: str, *, level: int = logging.WARNING, message: str | None = None) -> None:
        was = self._reported
        self._healthy = ok
        self._detail = "ok" if ok else detail
        if ok:
            self._failures_logged.clear()
            if was is None:
                logger.info("Home Assistant %s at %s is healthy", self.ha_version or "", self.url)
            elif not was:
                logger.info("Home Assistant at %s recovered: ok", self.url)
        elif detail not in self._failures_logged:
            self._failures_logged.add(detail)
            logger.log(level, "%s", message or f"Home Assistant link unhealthy: {detail}")
        else:
            logger.debug("Home Assistant link still unhealthy: %s", detail)
        if ok == was:
            return
        self._reported = ok
        try:
            self._on_change(ok, self._detail)
        except Exception:
            logger.exception("Home Assistant on_change callback failed")
