"""The agent's small HTTP server (hasync.http): the endpoints, routes of other parts, and whatever a client
sends (bounded, answered or closed, never an error in the agent)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hasync import http
from hasync.http import HttpServer, HttpServerError, Request, Response, Route


async def echo(request: Request) -> Response:
    return Response.json({"method": request.method, "params": dict(request.params), "query": dict(request.query),
                          "body": request.body.decode()})


def server(primary: bool = False, ready: bool = True) -> HttpServer:
    return HttpServer("127.0.0.1", 0, status=lambda: {"role": "primary" if primary else "standby"},
                      is_primary=lambda: primary, ready=lambda: ready, metrics=lambda: b"hasync_up 1\n",
                      routes=[Route("PUT", "/things/{name}", echo), Route("GET", "/things", echo)])


@pytest.fixture
async def running() -> AsyncIterator[HttpServer]:
    async with server() as s:
        yield s


async def exchange(port: int, raw: bytes, *, close: bool = True) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    if close:
        writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


async def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return await exchange(port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


async def test_the_endpoints_answer_by_role_and_readiness() -> None:
    async with server(primary=False, ready=True) as s:
        status, headers, body = await get(s.port, "/healthz")
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"role": "standby"} and int(headers["Content-Length"]) == len(body)
        assert (await get(s.port, "/role"))[0] == 503
        status, headers, body = await get(s.port, "/metrics")
        assert status == 200 and body == b"hasync_up 1\n" and headers["Content-Type"] == "text/plain"
        status, headers, body = await get(s.port, "/role", "HEAD")
        assert status == 503 and body == b"" and int(headers["Content-Length"]) > 0
    async with server(primary=True, ready=False) as s:
        assert (await get(s.port, "/role"))[0] == 200 and (await get(s.port, "/healthz"))[0] == 503


async def test_routes_of_other_parts_and_what_is_not_there(running: HttpServer) -> None:
    body = b'{"a": 1}'
    status, _, answer = await exchange(running.port, b"PUT /things/lamp%201?x=2 HTTP/1.1\r\nContent-Length: 8\r\n\r\n"
                                       + body)
    assert status == 200 and json.loads(answer) == {"method": "PUT", "params": {"name": "lamp 1"},
                                                     "query": {"x": "2"}, "body": '{"a": 1}'}
    assert (await get(running.port, "/nothing"))[0] == 404
    assert (await get(running.port, "/things/a/b"))[0] == 404
    assert (await get(running.port, "/healthz", "POST"))[0] == 405
    assert (await get(running.port, "/things/lamp"))[0] == 405  # only PUT there


@pytest.mark.parametrize(("raw", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /healthz\r\n\r\n", 400),
    (b"GET /healthz SPDY/3\r\n\r\n", 400),
    (b"GET evil HTTP/1.1\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nno colon\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\n folded: x\r\n\r\n", 400),
    (b"PUT /things/a HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"PUT /things/a HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 413),
    (b"PUT /things/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    (b"GET /healthz HTTP/1.1\r\nX: " + b"a" * (http.MAX_HEAD + 10) + b"\r\n\r\n", 431),
    (b"GET /healthz HTTP/1.1\r\nHost: x", 400),  # the head never ends
])
async def test_malformed_requests_get_a_4xx_or_5xx_and_the_server_goes_on(running: HttpServer, raw: bytes,
                                                                        status: int) -> None:
    assert (await exchange(running.port, raw))[0] == status
    assert (await get(running.port, "/healthz"))[0] == 200


async def test_a_client_that_sends_nothing_is_timed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "REQUEST_TIMEOUT", 0.2)
    async with server() as s:
        status, _, _ = await exchange(s.port, b"GET /healthz HTTP/1.1\r\n", close=False)
        assert status == 408


async def test_requests_follow_each_other_on_a_kept_alive_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    async def ask(raw: bytes) -> tuple[int, dict[str, str], bytes]:
        writer.write(raw)
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode()
        lines = head.strip().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        return int(lines[0].split(" ")[1]), headers, await reader.readexactly(int(headers["Content-Length"]))

    async def closed() -> bool:
        return await asyncio.wait_for(reader.read(), 5) == b""

    monkeypatch.setattr(http, "REQUEST_TIMEOUT", 0.3)
    async with server() as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        for i in range(3):  # one connection, a request after another (the second with a body)
            status, headers, body = await ask(b"PUT /things/t%d HTTP/1.1\r\nContent-Length: 1\r\n\r\nx" % i)
            assert status == 200 and headers["Connection"] == "keep-alive" and json.loads(body)["params"] == {
                "name": f"t{i}"}
        status, headers, _ = await ask(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert status == 200 and headers["Connection"] == "close" and await closed()
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        status, headers, _ = await ask(b"GET /healthz HTTP/1.0\r\n\r\n")  # 1.0: closed unless asked
        assert headers["Connection"] == "close" and await closed()
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        assert (await ask(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"))[1]["Connection"] == (
            "keep-alive")
        status, headers, _ = await ask(b"GET /healthz HTTP/1.1\r\nno colon\r\n\r\n")  # malformed: answered, closed
        assert status == 400 and headers["Connection"] == "close" and await closed()
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        assert (await ask(b"GET /healthz HTTP/1.1\r\n\r\n"))[0] == 200
        assert await closed()  # left idle past the timeout: closed without an answer
        writer.close()

        monkeypatch.setattr(http, "KEEP_ALIVE_REQUESTS", 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        assert (await ask(b"GET /healthz HTTP/1.1\r\n\r\n"))[1]["Connection"] == "keep-alive"
        assert (await ask(b"GET /healthz HTTP/1.1\r\n\r\n"))[1]["Connection"] == "close" and await closed()
        writer.close()


async def test_closing_the_server_ends_kept_alive_connections_quietly() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        async with server() as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
            writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"keep-alive\r\n\r\n"), 5)
        assert await asyncio.wait_for(reader.read(), 5) == b"{\"role\": \"standby\"}"  # the body, then the end
        writer.close()
        await asyncio.sleep(0.05)  # (what a cancelled connection task would log comes a turn or two later)
    finally:
        loop.set_exception_handler(None)
    assert errors == []


async def test_a_failing_handler_is_a_500_and_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(request: Request) -> Response:
        raise RuntimeError("bug")

    async with HttpServer("127.0.0.1", 0, status=dict, is_primary=lambda: False, ready=lambda: True,
                          metrics=bytes, routes=[Route("GET", "/broken", broken)]) as s:
        assert (await get(s.port, "/broken"))[0] == 500
        assert (await get(s.port, "/healthz"))[0] == 200
    assert [r.message for r in caplog.records] == ["HTTP handler failed"]


async def test_a_busy_port_is_one_clear_error() -> None:
    async with server() as first:
        with pytest.raises(HttpServerError, match=rf"cannot serve the HTTP endpoints on 127.0.0.1:{first.port}: "
                                                  r"Address already in use \(set http.port"):
            async with HttpServer("127.0.0.1", first.port, status=dict, is_primary=bool, ready=bool, metrics=bytes):
                pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(
    st.binary(max_size=400),
    st.builds(lambda m, p, h: f"{m} {p} HTTP/1.1\r\n{h}\r\n\r\n".encode("latin-1", "replace"),
              st.sampled_from(["GET", "HEAD", "PUT", "DELETE", "OPTIONS", "\x00"]),
              st.text(max_size=30), st.text(max_size=60)),
))
def test_no_bytes_from_a_client_break_the_server(raw: bytes) -> None:
    async def scenario() -> Any:
        async with server() as s:
            # An answer that is no HTTP response to parse here, or a closed connection: both fine.
            with contextlib.suppress(ValueError, IndexError, ConnectionError):
                await exchange(s.port, raw)
            return (await get(s.port, "/healthz"))[0]

    assert asyncio.run(scenario()) == 200
