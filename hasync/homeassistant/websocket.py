"""One authenticated websocket to Home Assistant, and the seam it is opened through.

:class:`Connection` numbers requests per connection, matches each ``result``/``pong`` to its waiting request
and hands ``event`` messages to their subscription, all from one receive loop. When the connection ends,
every waiting request fails with :class:`NotConnected` at once.

The seam is :data:`OpenWebSocket`: ``open(url, timeout)`` returns an open :class:`WebSocket` or raises
:class:`NotConnected` saying why. :func:`aiohttp_opener` is the real one; the in-process tests give a fake
Home Assistant (``harness.fakeha``) instead. Authentication is :func:`authenticate`, over either.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from .errors import AuthError, CommandFailed, NotConnected, RequestTimeout

logger = logging.getLogger(__name__)


class WebSocket(Protocol):
    """The part of aiohttp's client websocket the link uses."""

    async def send_json(self, data: Any) -> None: ...
    async def receive(self) -> aiohttp.WSMessage: ...
    async def close(self) -> bool: ...


# open(url, request_timeout): the open websocket, or NotConnected saying why, within request_timeout.
OpenWebSocket = Callable[[str, float], Awaitable[WebSocket]]


def aiohttp_opener(session: aiohttp.ClientSession) -> OpenWebSocket:
    """Open websockets with ``session``, translating every failure into :class:`NotConnected`."""

    async def open_websocket(url: str, request_timeout: float) -> WebSocket:
        timeout = request_timeout
        home, path = _split(url)
        try:
            async with asyncio.timeout(timeout):
                return await session.ws_connect(
                    url,
                    # get_states grows with the installation; HA is trusted, so no size limit.
                    max_msg_size=0,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=timeout),
                )
        except TimeoutError as exc:
            raise NotConnected(
                f"Home Assistant unreachable at {home}: no websocket connection within {timeout:g}s") from exc
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 404:
                raise NotConnected(
                    f"Home Assistant not found at {home}: HTTP 404 for {path} (not Home Assistant, or its "
                    "websocket_api is not loaded yet)"
                ) from exc
            raise NotConnected(
                f"Home Assistant at {home} refused the websocket: HTTP {exc.status} {exc.message}") from exc
        except aiohttp.ClientConnectorError as exc:
            raise NotConnected(f"Home Assistant unreachable at {home}: {_unreachable_reason(exc)}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise NotConnected(f"Home Assistant unreachable at {home}: {type(exc).__name__}: {exc}") from exc

    return open_websocket


def _split(url: str) -> tuple[str, str]:
    """Home Assistant's base URL and the websocket's path, for messages."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}", parts.path or "/"


def _unreachable_reason(exc: aiohttp.ClientConnectorError) -> str:
    os_error = exc.os_error
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS failed ({exc})"
    if isinstance(os_error, socket.gaierror):
        return f"Cannot resolve host {exc.host!r} ({os_error.strerror or os_error})"
    if os_error.errno and os_error.errno > 0:
        return f"Cannot connect ({os.strerror(os_error.errno)})"
    return f"Cannot connect ({os_error})"


async def authenticate(
    ws: WebSocket, url: str, token: str, request_timeout: float
) -> tuple[Connection, str | None]:
    """The auth phase (``auth_required`` -> ``auth`` -> ``auth_ok``), within ``request_timeout``; returns the
    connection (whose requests get the same timeout) and HA's version. Closes the websocket and raises
    :class:`AuthError` or :class:`NotConnected` on failure."""
    timeout = request_timeout
    try:
        async with asyncio.timeout(timeout):
            greeting = await _receive_json(ws, url)
            if greeting.get("type") != "auth_required":
                raise NotConnected(
                    f"{url} does not speak Home Assistant's websocket API (it greeted with "
                    f"{greeting.get('type')!r}, not 'auth_required')"
                )
            await ws.send_json({"type": "auth", "access_token": token})
            answer = await _receive_json(ws, url)
    except TimeoutError as exc:
        await ws.close()
        raise NotConnected(f"Home Assistant at {url} did not complete authentication within {timeout:g}s") from exc
    except BaseException:
        await ws.close()
        raise
    if answer.get("type") == "auth_invalid":
        await ws.close()
        raise AuthError(str(answer.get("message") or "invalid access token"))
    if answer.get("type") != "auth_ok":
        await ws.close()
        raise NotConnected(f"Home Assistant at {url} answered the auth message with {answer.get('type')!r}")
    version = str(answer.get("ha_version") or greeting.get("ha_version") or "") or None
    return Connection(ws, url, timeout), version


async def _receive_json(ws: WebSocket, url: str) -> dict[str, Any]:
    frame = await ws.receive()
    if frame.type is not aiohttp.WSMsgType.TEXT:
        raise NotConnected(f"Home Assistant at {url} closed the websocket during authentication")
    try:
        message = json.loads(frame.data)
    except ValueError as exc:
        raise NotConnected(f"{url} sent something that is not JSON") from exc
    if not isinstance(message, dict):
        raise NotConnected(f"{url} sent a JSON {type(message).__name__}, not an object")
    return message


class Connection:
    """One authenticated websocket: request ids, waiting requests and subscriptions."""

    def __init__(self, ws: WebSocket, url: str, timeout: float) -> None:
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
