"""The agent's HTTP endpoints: ``/healthz``, ``/role`` (200 only on the primary) and ``/metrics``.

A small HTTP/1.1 server on asyncio's streams, not a web framework: three GET endpoints do not need one, and
aiohttp's server costs an agent about 14 MiB of memory (it is still imported where the agent talks to Home
Assistant). HTTP/1.1 keep-alive: a client may send its requests one after another on one connection (Prometheus
does, and so do the benchmarks, a thousand changes a second); ``Connection: close``, HTTP/1.0 without
``Connection: keep-alive``, an answer to a malformed request and ``KEEP_ALIVE_REQUESTS`` requests end it.
Whatever a client sends is bounded: the request line and headers (``MAX_HEAD``), a body (``MAX_BODY``, with
``Content-Length`` only) and the time it takes (``REQUEST_TIMEOUT``, which is also how long a connection may
wait idle for its next request); anything else is a 4xx answer or a closed connection, never an error in
the agent.

Other parts of the agent may add routes of their own (``routes``): the memory sync backend's test API is
served only when that backend is configured (``hasync.sync.memory``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

logger = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024  # request line and headers
MAX_BODY = 1024 * 1024
REQUEST_TIMEOUT = 10.0  # seconds for a client to send its request (or, kept alive, to begin the next one)
KEEP_ALIVE_REQUESTS = 10_000  # requests on one connection before the server closes it
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            413: "Content Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable"}


class HttpServerError(Exception):
    """The endpoints could not be served (the port is taken, the address is not this host's)."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str]
    body: bytes = b""
    params: Mapping[str, str] = field(default_factory=dict)  # the route's {name} parts
    keep_alive: bool = False  # the client will send more on this connection (HTTP/1.1 unless it says close)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain"

    @classmethod
    def json(cls, value: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(value).encode(), "application/json")

    @classmethod
    def text(cls, text: str, status: int) -> Response:
        return cls(status, text.encode())


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    """``method`` on ``path``; a last segment written ``{name}`` matches any one segment (``params[name]``)."""

    method: str
    path: str
    handler: Handler

    def match(self, path: str) -> dict[str, str] | None:
        if "{" not in self.path:
            return {} if path == self.path else None
        prefix, _, name = self.path.rpartition("/")
        head, _, last = path.rpartition("/")
        if head != prefix or not last:
            return None
        return {name.strip("{}"): unquote(last)}


class _BadRequest(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


class HttpServer:
    """``async with HttpServer(host, port, status=..., is_primary=..., metrics=...)``; port 0 picks one."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        status: Callable[[], dict[str, Any]],
        is_primary: Callable[[], bool],
        ready: Callable[[], bool],
        metrics: Callable[[], bytes],
        routes: Iterable[Route] = (),
    ) -> None:
        self.host = host
        self.port = port
        self._status = status
        self._is_primary = is_primary
        self._ready = ready
        self._metrics = metrics
        self._routes = [Route("GET", "/healthz", self._healthz), Route("GET", "/role", self._role),
                        Route("GET", "/metrics", self._metrics_handler), *routes]
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def __aenter__(self) -> HttpServer:
        try:
            self._server = await asyncio.start_server(self._client, self.host, self.port, limit=MAX_HEAD)
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise HttpServerError(
                f"cannot serve the HTTP endpoints on {self.host}:{self.port}: {why} "
                "(set http.port, or http.enabled: false)"
            ) from exc
        if self.port == 0 and self._server.sockets:
            self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        # Closing a connection ends its task (an idle kept-alive one reads the end of the stream). Not cancelled:
        # Python 3.11's streams log a traceback for a cancelled connection task.
        for writer in self._clients.values():
            writer.close()
        if self._clients:
            _, late = await asyncio.wait(self._clients, timeout=2)
            for task in late:
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    # ---- one connection, one request ----------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients[task] = writer
        try:
            for served in range(KEEP_ALIVE_REQUESTS):
                if not await self._serve_one(reader, writer, first=served == 0,
                                             last=served == KEEP_ALIVE_REQUESTS - 1):
                    return
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self._clients.pop(task, None)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, first: bool,
                         last: bool) -> bool:
        """Read one request and answer it; True if the connection stays open for the next."""
        head_only = keep_alive = False
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await _read_request(reader)
            head_only = request.method == "HEAD"
            keep_alive = request.keep_alive and not last
            response = await self._dispatch(request)
        except _BadRequest as exc:
            response = Response.text(f"{exc}\n", exc.status)
        except TimeoutError:
            if not first:
                return False  # a kept-alive connection left idle: closed without a word
            response = Response.text("request timeout\n", 408)
        except (ConnectionError, asyncio.IncompleteReadError):
            return False
        except Exception:  # a handler's bug: an answer, a log line, and the agent goes on
            logger.exception("HTTP handler failed")
            response = Response.text("internal error\n", 500)
        await _write(writer, response, head_only=head_only, keep_alive=keep_alive)
        return keep_alive

    async def _dispatch(self, request: Request) -> Response:
        allowed = []
        for route in self._routes:
            params = route.match(request.path)
            if params is None:
                continue
            if route.method == request.method or (route.method == "GET" and request.method == "HEAD"):
                return await route.handler(replace(request, params=params))
            allowed.append(route.method)
        if allowed:
            return Response.text(f"method {request.method} not allowed here ({', '.join(allowed)})\n", 405)
        return Response.text("not found\n", 404)

    # ---- the endpoints ------------------------------------------------------------------------

    async def _healthz(self, request: Request) -> Response:
        return Response.json(self._status(), 200 if self._ready() else 503)

    async def _role(self, request: Request) -> Response:
        primary = self._is_primary()
        return Response.json(self._status(), 200 if primary else 503)

    async def _metrics_handler(self, request: Request) -> Response:
        return Response(200, self._metrics(), CONTENT_TYPE_LATEST.split(";")[0])


async def _read_request(reader: asyncio.StreamReader) -> Request:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest(431, "request head too large") from None
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise _BadRequest(400, "incomplete request") from None
        raise
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, "not an HTTP/1.x request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400, "malformed header")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise _BadRequest(501, "chunked bodies are not supported: send Content-Length")
    body = b""
    if "content-length" in headers:
        length = headers["content-length"]
        if not length.isdigit():
            raise _BadRequest(400, "bad Content-Length")
        if int(length) > MAX_BODY:
            raise _BadRequest(413, f"a body of at most {MAX_BODY} bytes")
        body = await reader.readexactly(int(length))
    url = urlsplit(target)
    if not url.path.startswith("/"):
        raise _BadRequest(400, "the target must be a path")
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    return Request(method, url.path, dict(parse_qsl(url.query)), body, keep_alive=keep_alive)


async def _write(writer: asyncio.StreamWriter, response: Response, *, head_only: bool, keep_alive: bool) -> None:
    reason = _REASONS.get(response.status, "Unknown")
    head = (f"HTTP/1.1 {response.status} {reason}\r\nContent-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n").encode()
    writer.write(head if head_only else head + response.body)
    await writer.drain()
