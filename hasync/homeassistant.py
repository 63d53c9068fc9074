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
every later event goes to ``on_state_changed(event)`` in order. :meth:`apply_states` sets entities through
HA's reproduce-state path (``scene.apply``) and returns the context id of the call: the ``state_changed``
events it caused carry that id (and arrive before the call's answer).
``on_change(healthy, detail)`` is called with the first result and then on every flip. A failure is
logged at WARNING (a rejected token at ERROR) the first time its detail is seen in a streak of
failures, and at DEBUG when it repeats; recovery is logged at INFO.

Exceptions::

    HomeAssistantError      base: anything this module raises about Home Assistant
    ├── AuthError           HA rejected the access token (auth_invalid): permanent, retried slowly
    ├── NotConnected        no live connection: unreachable, not HA, handshake failed, or it dropped
    ├── RequestTimeout      HA did not answer a request within ``timeout``
    └── CommandFailed       HA answered a command with an error; carries ``code`` and ``message``
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import aiohttp

from .mqtt import Backoff, wait_or

logger = logging.getLogger(__name__)

_REPUBLISH_AFTER = 0.5  # s without an echo before the MQTT probe publishes another nonce
_DOWN_PROBE_FACTOR = 5  # while HA's MQTT client is down, probe every this many check intervals
_WS_PATH = "/api/websocket"


class HomeAssistantError(Exception):
    """Something went wrong talking to Home Assistant."""


class AuthError(HomeAssistantError):
    """Home Assistant rejected the access token; retrying at once will not help."""


class NotConnected(HomeAssistantError):
    """There is no live connection to Home Assistant (or it dropped while a request waited)."""


class RequestTimeout(HomeAssistantError):
    """Home Assistant did not answer a request in time."""


class CommandFailed(HomeAssistantError):
    """Home Assistant answered a command with an error."""

    def __init__(self, command: str, code: str, message: str) -> None:
        super().__init__(f"{command} failed: {code}: {message}")
        self.command = command
        self.code = code
        self.message = message


class _Lifecycle(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


# ---- one connection ---------------------------------------------------------------------------------


class _Connection:
    """One authenticated websocket: request ids, waiting requests and subscriptions."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, url: str, timeout: float) -> None:
        self._ws = ws
        self._url = url
        self._timeout = timeout
        self._last_id = 0
        # id: (command type, its answer, called with a successful result as it is dispatched)
        self._pending: dict[int, tuple[str, asyncio.Future[Any], Callable[[Any], None] | None]] = {}
        self._handlers: dict[int, Callable[[Any], None]] = {}
        self.closed = asyncio.Event()
        self.lost_reason = ""

    async def command(self, message: dict[str, Any], *, on_answer: Callable[[Any], None] | None = None) -> Any:
        """Send ``message`` with the next id; return its result (None for a pong) within ``timeout``.

        ``on_answer(result)`` is called with a successful result in the receive loop, before any message
        that follows it is dispatched: the caller's own resumption comes later."""
        if self.closed.is_set():
            raise NotConnected(self.lost_reason)
        self._last_id += 1
        msg_id = self._last_id
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = (str(message["type"]), future, on_answer)
        try:
            try:
                await self._ws.send_json({"id": msg_id, **message})
            except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
                # aiohttp raises ConnectionResetError (or RuntimeError in old versions) on a closing socket.
                raise NotConnected(f"connection to Home Assistant at {self._url} lost: {exc}") from exc
            async with asyncio.timeout(self._timeout):
                return await future
        except TimeoutError as exc:
            raise RequestTimeout(
                f"Home Assistant at {self._url} did not answer {message['type']} within {self._timeout:g}s"
            ) from exc
        finally:
            self._pending.pop(msg_id, None)

    async def subscribe(self, message: dict[str, Any], handler: Callable[[Any], None]) -> int:
        """Send a subscribing command; ``handler`` gets each event's payload. Returns the subscription id."""
        msg_id = self._last_id + 1  # the id command() is about to use: events may follow its result at once
        self._handlers[msg_id] = handler
        try:
            await self.command(message)
        except BaseException:
            self._handlers.pop(msg_id, None)
            raise
        return msg_id

    def forget(self, subscription: int) -> None:
        """Stop handing events of ``subscription`` to its handler (HA is not told)."""
        self._handlers.pop(subscription, None)

    async def receive_loop(self) -> None:
        """Dispatch every message until the connection closes; then fail what still waits."""
        reason = "the connection closed"
        try:
            while True:
                frame = await self._ws.receive()
                if frame.type is aiohttp.WSMsgType.TEXT:
                    self._dispatch(frame.data)
                elif frame.type is aiohttp.WSMsgType.CLOSE:
                    reason = f"closed by Home Assistant, code {frame.data}" + (
                        f": {frame.extra}" if frame.extra else ""
                    )
                    break
                elif frame.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                    break
                elif frame.type is aiohttp.WSMsgType.ERROR:
                    reason = f"{type(frame.data).__name__}: {frame.data}"
                    break
        finally:
            self._close(f"connection to Home Assistant at {self._url} lost ({reason})")

    async def close(self) -> None:
        self._close(f"connection to Home Assistant at {self._url} closed")
        await self._ws.close()

    def _close(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.lost_reason = reason
        self.closed.set()
        for _, future, _ in self._pending.values():
            if not future.done():
                future.set_exception(NotConnected(reason))
        self._pending.clear()
        self._handlers.clear()

    def _dispatch(self, data: str) -> None:
        try:
            parsed = json.loads(data)
        except ValueError:
            logger.debug("ignoring a websocket message that is not JSON: %.200s", data)
            return
        # HA sends a JSON array of messages when the client opted into coalescing; we do not, but it is cheap.
        for message in parsed if isinstance(parsed, list) else [parsed]:
            if isinstance(message, dict):
                self._dispatch_one(message)

    def _dispatch_one(self, message: dict[str, Any]) -> None:
        msg_id, kind = message.get("id"), message.get("type")
        if kind == "event":
            handler = self._handlers.get(msg_id) if isinstance(msg_id, int) else None
            if handler is not None:
                handler(message.get("event"))
            return
        command, future, on_answer = self._pending.get(msg_id, ("", None, None)) if isinstance(msg_id, int) else (
            "", None, None)
        if future is None or future.done():
            logger.debug("ignoring an answer nobody waits for: %.200s", message)
            return
        if kind == "pong":
            future.set_result(None)
        elif kind == "result" and message.get("success"):
            if on_answer is not None:
                on_answer(message.get("result"))
            future.set_result(message.get("result"))
        elif kind == "result":
            error = message.get("error") or {}
            future.set_exception(CommandFailed(command, str(error.get("code")), str(error.get("message"))))
        else:
            logger.debug("ignoring a websocket message of type %r", kind)


# ---- the MQTT echo probe ----------------------------------------------------------------------------


class _MqttProbe:
    """Proves HA's MQTT client is connected: HA publishes ``payload`` on ``topic`` and receives it back.

    The payload is the same on every probe of a link: HA's recorder stores each service call as an
    event, and identical event data is stored once. An echo delayed past one probe's deadline could
    confirm the next probe; it did cross the broker, so the link is slow rather than down.
    """

    def __init__(self, topic: str, payload: str, timeout: float, down_interval: float) -> None:
        self.topic = topic
        self._payload = payload
        self._timeout = timeout
        self._down_interval = down_interval
        self._subscription: int | None = None
        self._echo = asyncio.Event()
        self._held: tuple[bool, str] | None = None  # a "down" result repeated until _retry_at
        self._retry_at = 0.0

    def reset(self, conn: _Connection) -> None:
        """Forget the subscription (the MQTT entry was unloaded, or the probe lost its echo)."""
        if self._subscription is not None:
            conn.forget(self._subscription)
        self._subscription = None
        self._held = None

    def _on_event(self, event: Any) -> None:
        if isinstance(event, dict) and event.get("payload") == self._payload:
            self._echo.set()

    async def run(self, conn: _Connection) -> tuple[bool, str]:
        loop = asyncio.get_running_loop()
        if self._held is not None and loop.time() < self._retry_at:
            return self._held
        self._held = None
        if self._subscription is None:
            try:
                self._subscription = await conn.subscribe(
                    {"type": "mqtt/subscribe", "topic": self.topic, "qos": 0}, self._on_event
                )
            except CommandFailed as exc:
                if exc.code == "unauthorized":
                    return False, (
                        "the access token's user is not an administrator; Home Assistant allows only "
                        "administrators to subscribe to MQTT topics (mqtt/subscribe), which the MQTT check needs"
                    )
                return False, f"Home Assistant refused to subscribe to MQTT topic {self.topic}: {exc.message}"
        self._echo.clear()
        publish = {"topic": self.topic, "payload": self._payload, "qos": 0, "retain": False}
        try:
            async with asyncio.timeout(self._timeout):
                while True:  # again every _REPUBLISH_AFTER: HA may not have subscribed at the broker yet
                    await conn.command(
                        {"type": "call_service", "domain": "mqtt", "service": "publish", "service_data": publish}
                    )
                    if await wait_or(self._echo, _REPUBLISH_AFTER):
                        return True, "ok"
        except CommandFailed as exc:
            # HA's MQTT client is disconnected: it refuses to publish. Probe less often (see module docstring).
            self._held = (False, f"Home Assistant's MQTT connection is down ({exc.message})")
            self._retry_at = loop.time() + self._down_interval
            return self._held
        except (TimeoutError, RequestTimeout):
            await self._unsubscribe(conn)
            return False, (
                f"Home Assistant's MQTT connection is down (a test message HA published on {self.topic} did not "
                f"come back within {self._timeout:g}s; with broker ACLs, HA's MQTT user needs read and write "
                "access to that topic)"
            )

    async def _unsubscribe(self, conn: _Connection) -> None:
        """Subscribe afresh next time, in case HA lost our subscription (e.g. an entry reload)."""
        subscription = self._subscription
        self.reset(conn)
        if subscription is None:
            return
        with contextlib.suppress(CommandFailed, RequestTimeout):
            await conn.command({"type": "unsubscribe_events", "subscription": subscription})


# ---- the link ---------------------------------------------------------------------------------------


def _unreachable_reason(exc: aiohttp.ClientConnectorError) -> str:
    os_error = exc.os_error
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS failed ({exc})"
    if isinstance(os_error, socket.gaierror):
        return f"Cannot resolve host {exc.host!r} ({os_error.strerror or os_error})"
    if os_error.errno and os_error.errno > 0:
        return f"Cannot connect ({os.strerror(os_error.errno)})"
    return f"Cannot connect ({os_error})"


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
        self._conn: _Connection | None = None
        self._healthy = False
        self._detail = "not checked yet"
        self._reported: bool | None = None
        self._failures_logged: set[str] = set()
        self._missing_logged: set[str] = set()
        self.ha_version: str | None = None
        self._on_states = on_states
        self._on_state_changed = on_state_changed

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
        if self._session is None:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
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

    async def set_automations(self, enabled: bool, *, keep: Iterable[str] = ()) -> list[str]:
        """Turn every automation on (or off) except those in ``keep``; return the entity ids changed.

        Automations already in the wanted state, and those HA shows as neither on nor off (e.g.
        ``unavailable``), are left alone. Raises :class:`HomeAssistantError` (a subclass) when there is
        no connection or HA answers with an error or not in time.
        """
        kept = set(keep)
        malformed = sorted(entity for entity in kept if not entity.startswith("automation."))
        if malformed:
            raise ValueError(f"automations to keep must be entity ids like 'automation.x', got {malformed}")
        conn = self._live()
        states = await conn.command({"type": "get_states"})
        wanted = "on" if enabled else "off"
        present: set[str] = set()
        change: list[str] = []
        for state in states if isinstance(states, list) else []:
            entity_id = state.get("entity_id") if isinstance(state, dict) else None
            if not isinstance(entity_id, str) or not entity_id.startswith("automation."):
                continue
            present.add(entity_id)
            if entity_id in kept:
                continue
            current = state.get("state")
            if current not in ("on", "off"):
                logger.debug("leaving %s alone: its state is %r", entity_id, current)
            elif current != wanted:
                change.append(entity_id)
        for entity_id in sorted(kept - present - self._missing_logged):
            self._missing_logged.add(entity_id)
            logger.warning("Home Assistant at %s has no %s, which is configured to be kept", self.url, entity_id)
        if not change:
            return []
        change.sort()
        service = "turn_on" if enabled else "turn_off"
        await conn.command(
            {"type": "call_service", "domain": "automation", "service": service, "target": {"entity_id": change}}
        )
        logger.info("turned %s %d automation(s) in Home Assistant: %s", wanted, len(change), ", ".join(change))
        return change

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

    def _live(self) -> _Connection:
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

    async def _connect(self) -> _Connection:
        assert self._session is not None
        try:
            async with asyncio.timeout(self._timeout):
                ws = await self._session.ws_connect(
                    self.url + _WS_PATH,
                    # get_states grows with the installation; HA is trusted, so no size limit.
                    max_msg_size=0,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self._timeout),
                )
        except TimeoutError as exc:
            raise NotConnected(
                f"Home Assistant unreachable at {self.url}: no websocket connection within {self._timeout:g}s"
            ) from exc
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 404:
                raise NotConnected(
                    f"Home Assistant not found at {self.url}: HTTP 404 for {_WS_PATH} (not Home Assistant, or its "
                    "websocket_api is not loaded yet)"
                ) from exc
            raise NotConnected(
                f"Home Assistant at {self.url} refused the websocket: HTTP {exc.status} {exc.message}"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise NotConnected(f"Home Assistant unreachable at {self.url}: {_unreachable_reason(exc)}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise NotConnected(f"Home Assistant unreachable at {self.url}: {type(exc).__name__}: {exc}") from exc
        try:
            async with asyncio.timeout(self._timeout):
                greeting = await self._receive_json(ws)
                if greeting.get("type") != "auth_required":
                    raise NotConnected(
                        f"{self.url}{_WS_PATH} does not speak Home Assistant's websocket API (it greeted with "
                        f"{greeting.get('type')!r}, not 'auth_required')"
                    )
                await ws.send_json({"type": "auth", "access_token": self._token})
                answer = await self._receive_json(ws)
        except TimeoutError as exc:
            await ws.close()
            raise NotConnected(
                f"Home Assistant at {self.url} did not complete authentication within {self._timeout:g}s"
            ) from exc
        except BaseException:
            await ws.close()
            raise
        if answer.get("type") == "auth_invalid":
            await ws.close()
            raise AuthError(str(answer.get("message") or "invalid access token"))
        if answer.get("type") != "auth_ok":
            await ws.close()
            raise NotConnected(f"Home Assistant at {self.url} answered the auth message with {answer.get('type')!r}")
        self.ha_version = str(answer.get("ha_version") or greeting.get("ha_version") or "") or None
        return _Connection(ws, self.url, self._timeout)

    async def _receive_json(self, ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
        frame = await ws.receive()
        if frame.type is not aiohttp.WSMsgType.TEXT:
            raise NotConnected(f"Home Assistant at {self.url} closed the websocket during authentication")
        try:
            message = json.loads(frame.data)
        except ValueError as exc:
            raise NotConnected(f"{self.url}{_WS_PATH} sent something that is not JSON") from exc
        if not isinstance(message, dict):
            raise NotConnected(f"{self.url}{_WS_PATH} sent a JSON {type(message).__name__}, not an object")
        return message

    async def _serve(self, conn: _Connection) -> bool:
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

    async def _watch_states(self, conn: _Connection) -> None:
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
            try:
                subscription = await conn.subscribe({"type": "subscribe_events", "event_type": "state_changed"}, handle)
                try:
                    await conn.command({"type": "get_states"}, on_answer=snapshot)
                except BaseException:
                    conn.forget(subscription)
                    raise
            except NotConnected:
                return
            except (CommandFailed, RequestTimeout) as exc:
                logger.warning("cannot watch Home Assistant's states at %s: %s; retrying", self.url, exc)
                await wait_or(conn.closed, self._check_interval)
                continue
            return

    async def _check_loop(self, conn: _Connection) -> bool:
        loop = asyncio.get_running_loop()
        probe = _MqttProbe(
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

    async def _check(self, conn: _Connection, probe: _MqttProbe) -> tuple[bool, str]:
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
