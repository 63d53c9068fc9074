"""Health checks: config validation, rise/fall hysteresis (pure), real command and HTTP probes, monitor."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import struct
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from harness.brokers import wait_exited
from harness.wait import free_port
from hasync import health
from hasync.config import CommandCheck, DnsCheck, HealthCheckConfig, HttpCheck, InterfaceCheck, TcpCheck
from hasync.health import (
    CheckState,
    HealthMonitor,
    run_command_check,
    run_dns_check,
    run_http_check,
    run_interface_check,
    run_tcp_check,
)

CHECKS = TypeAdapter(list[HealthCheckConfig])


def command_check(command: str, **fields: Any) -> CommandCheck:
    return CommandCheck(type="command", name=fields.pop("name", "cmd"), command=command, **fields)


def http_check(url: str, **fields: Any) -> HttpCheck:
    return HttpCheck(type="http", name=fields.pop("name", "web"), url=url, **fields)




@contextlib.contextmanager
def fifo_reader(path: Path) -> Iterator[asyncio.Queue[bytes]]:
    """A FIFO at ``path`` whose incoming data arrives on the yielded queue (no polling)."""
    os.mkfifo(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    # Our own idle writer keeps the FIFO from reporting end-of-file between the child's writes.
    keepalive = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    received: asyncio.Queue[bytes] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def readable() -> None:
        with contextlib.suppress(BlockingIOError):
            received.put_nowait(os.read(fd, 4096))

    loop.add_reader(fd, readable)
    try:
        yield received
    finally:
        loop.remove_reader(fd)
        os.close(keepalive)
        os.close(fd)


# ---- configuration ------------------------------------------------------------------------------


def test_config_parses_both_kinds_by_type() -> None:
    checks = CHECKS.validate_python(
        [
            {"type": "command", "name": "db", "command": "pg_isready"},
            {"type": "http", "name": "ha.api", "url": "https://ha.local:8123/api/", "expect_status": [401]},
        ]
    )
    assert isinstance(checks[0], CommandCheck)
    assert (checks[0].interval, checks[0].timeout, checks[0].rise, checks[0].fall) == (2.0, 1.0, 2, 2)
    assert isinstance(checks[1], HttpCheck)
    assert checks[1].expect_status == [401]
    assert checks[1].verify_tls is True


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"type": "command", "command": "true", "interval": 0},
            "interval must be a finite number of seconds > 0",
        ),
        (
            {"type": "command", "command": "true", "timeout": 0},
            "timeout must be a finite number of seconds > 0",
        ),
        ({"type": "command", "command": "true", "interval": 2, "timeout": 3}, "must not exceed interval"),
        ({"type": "command", "command": "true", "rise": 0}, "rise must be >= 1"),
        ({"type": "command", "command": "true", "fall": 0}, "fall must be >= 1"),
        ({"type": "command", "command": "true", "name": "has space"}, "check name 'has space' must be"),
        ({"type": "command", "command": "true", "name": "x" * 65}, "must be 1-64 characters"),
        ({"type": "command", "command": "true", "retries": 3}, "Extra inputs are not permitted"),
        ({"type": "command", "command": "  "}, "command must not be empty"),
        ({"type": "http", "url": "ftp://host/"}, "url must be an http:// or https:// URL"),
        ({"type": "http", "url": "http://"}, "url must be an http:// or https:// URL"),
        ({"type": "http", "url": "http://h/", "expect_status": []}, "at least one status"),
        ({"type": "http", "url": "http://h/", "expect_status": [200, 99]}, "HTTP statuses 100-599, got [99]"),
        ({"type": "smtp", "host": "h"}, "does not match any of the expected tags"),
        ({"type": "tcp", "host": "h"}, "port\\n  Field required"),
        ({"type": "tcp", "host": "h", "port": 0}, "greater than or equal to 1"),
        ({"type": "dns", "server": "router", "query": "ha.home"}, "server must be an IP address"),
        ({"type": "dns", "server": "10.0.0.1", "query": "bad name!"}, "query must be a DNS name"),
        ({"type": "dns", "server": "::1", "query": "ha", "record": "AAAA", "expect": ["10.0.0.5"]},
         "not an answer to a AAAA"),
        ({"type": "interface", "interface": "eth/0"}, "interface must be an interface name"),
        ({"type": "tcp", "host": "h", "port": 1, "weight": 1001}, "less than or equal to 1000"),
        ({"type": "tcp", "host": "h", "port": 1, "when": "primary", "weight": -5}, "cannot have a weight"),
    ],
)
def test_config_rejects_invalid_checks(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        CHECKS.validate_python([{"name": "c", **fields}])


def test_config_is_frozen() -> None:
    check = command_check("true")
    with pytest.raises(ValidationError):
        check.interval = 5


# ---- hysteresis (pure) --------------------------------------------------------------------------


def test_first_result_sets_the_state_directly() -> None:
    up = CheckState(rise=3, fall=3)
    assert up.up is None
    assert up.record(True, "exit 0") is True
    assert up.up is True

    down = CheckState(rise=3, fall=3)
    assert down.record(False, "exit 1") is True
    assert down.up is False
    assert down.last_detail == "exit 1"


def test_fall_consecutive_failures_bring_it_down() -> None:
    state = CheckState(rise=2, fall=3)
    state.record(True, "ok")
    assert [state.record(False, f"bad {i}") for i in range(2)] == [False, False]
    assert state.up is True
    assert state.record(True, "ok") is False  # a success resets the failure streak
    assert state.consecutive_failures == 0
    assert [state.record(False, f"bad {i}") for i in range(3)] == [False, False, True]
    assert state.up is False
    assert state.consecutive_failures == 3
    assert state.last_detail == "bad 2"
    assert state.record(False, "still bad") is False


def test_rise_consecutive_successes_bring_it_up() -> None:
    state = CheckState(rise=3, fall=1)
    state.record(False, "bad")
    assert [state.record(True, "ok"), state.record(True, "ok")] == [False, False]
    assert state.record(False, "bad") is False  # a failure resets the success streak
    assert state.consecutive_successes == 0
    assert [state.record(True, "ok") for _ in range(3)] == [False, False, True]
    assert state.up is True
    assert state.consecutive_successes == 3
    assert state.record(False, "bad") is True  # fall=1: one failure is enough


def test_rise_and_fall_of_one_follow_every_result() -> None:
    state = CheckState(rise=1, fall=1)
    results = [True, False, False, True, True, False]
    assert [state.record(ok, "") for ok in results] == [True, True, False, True, False, True]


def test_check_state_rejects_zero_rise_or_fall() -> None:
    with pytest.raises(ValueError, match="rise and fall must be >= 1"):
        CheckState(rise=0, fall=1)


# ---- command probe ------------------------------------------------------------------------------


async def test_command_exit_zero_is_ok() -> None:
    assert await run_command_check(command_check("true")) == (True, "exit 0")


async def test_command_nonzero_exit_fails_with_its_status() -> None:
    assert await run_command_check(command_check("false")) == (False, "exit 1")
    ok, detail = await run_command_check(command_check("no-such-command-hasync"))
    assert not ok
    assert detail.startswith("exit 127: ")


async def test_command_output_is_truncated_to_its_tail() -> None:
    ok, detail = await run_command_check(
        command_check("yes filler | head -c 200000; echo broken >&2; exit 3")
    )
    assert not ok
    assert detail.startswith("exit 3: ...")
    assert detail.endswith("broken")
    assert len(detail) < 250


async def test_command_timeout_kills_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    check = command_check(f"echo waiting; sleep 5 & echo $! > {pidfile}; wait", interval=0.2, timeout=0.2)
    started = time.monotonic()
    assert await run_command_check(check) == (False, "timed out after 0.2s: waiting")
    assert time.monotonic() - started < 2
    await wait_exited(int(pidfile.read_text()))  # the grandchild, not only the shell


# ---- HTTP probe ---------------------------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[str]:
    """A real aiohttp server on a free port: /ok, /fail (500), /empty (204) and /slow (never answers)."""
    release = asyncio.Event()

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="fine")

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500, text="database is locked")

    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/fail", fail)
    app.router.add_get("/empty", empty)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        release.set()
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def test_http_2xx_is_ok(server: str, session: aiohttp.ClientSession) -> None:
    assert await run_http_check(http_check(f"{server}/ok"), session) == (True, "HTTP 200")
    assert await run_http_check(http_check(f"{server}/empty"), session) == (True, "HTTP 204")


async def test_http_500_fails_with_status_and_body(server: str, session: aiohttp.ClientSession) -> None:
    assert await run_http_check(http_check(f"{server}/fail"), session) == (
        False,
        "HTTP 500: database is locked",
    )


async def test_http_expect_status_replaces_the_2xx_rule(server: str, session: aiohttp.ClientSession) -> None:
    assert (await run_http_check(http_check(f"{server}/fail", expect_status=[500]), session))[0] is True
    assert (await run_http_check(http_check(f"{server}/ok", expect_status=[204]), session))[0] is False


async def test_http_slow_handler_times_out(server: str, session: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    check = http_check(f"{server}/slow", interval=0.2, timeout=0.2)
    assert await run_http_check(check, session) == (False, "timed out after 0.2s")
    assert time.monotonic() - started < 2


async def test_http_connection_refused(session: aiohttp.ClientSession) -> None:
    ok, detail = await run_http_check(http_check(f"http://127.0.0.1:{free_port()}/"), session)
    assert not ok
    assert detail.startswith("request failed: ClientConnectorError")


# ---- TCP, DNS and interface probes --------------------------------------------------------------


async def test_tcp_check_connects_or_says_why_not() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        check = TcpCheck(type="tcp", name="t", host="127.0.0.1", port=port)
        assert await run_tcp_check(check) == (True, f"connected to 127.0.0.1:{port}")
    finally:
        server.close()
        await server.wait_closed()
    ok, detail = await run_tcp_check(TcpCheck(type="tcp", name="t", host="127.0.0.1", port=port))
    assert not ok and detail.startswith(f"127.0.0.1:{port}: ") and ("refused" in detail or "failed" in detail)


class DnsServer(asyncio.DatagramProtocol):
    """Answers every query with ``answer(query)`` (bytes), or not at all when it returns None."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = self.answer(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def dns_reply(query: bytes, *, rcode: int = 0, answers: Sequence[tuple[int, bytes]] = ()) -> bytes:
    """A reply to ``query``: its header with QR set, its question, then ``answers`` (type, rdata) with a name
    compressed to the question's."""
    ident = query[:2]
    question = query[12:]
    header = ident + struct.pack("!HHHHH", 0x8180 | rcode, 1, len(answers), 0, 0)
    records = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", rtype, 1, 60, len(rdata)) + rdata
                       for rtype, rdata in answers)
    return header + question + records


@contextlib.asynccontextmanager
async def dns_server(answer: Any) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: DnsServer(answer), local_addr=("127.0.0.1", 0))
    try:
        yield transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


def dns_check(port: int, **fields: Any) -> DnsCheck:
    return DnsCheck(type="dns", name="dns", server="127.0.0.1", port=port, query="ha.home", timeout=0.3,
                    interval=0.3, **fields)


async def test_dns_check_reads_the_answer_and_its_errors() -> None:
    address = bytes([192, 168, 1, 5])
    async with dns_server(lambda q: dns_reply(q, answers=[(5, b"\x02ha\x00"), (1, address)])) as port:
        assert await run_dns_check(dns_check(port)) == (True, "ha.home is 192.168.1.5")
        assert await run_dns_check(dns_check(port, expect=["192.168.1.5"])) == (True, "ha.home is 192.168.1.5")
        assert await run_dns_check(dns_check(port, expect=["192.168.1.6"])) == (
            False, "ha.home is 192.168.1.5, not 192.168.1.6")
        assert await run_dns_check(dns_check(port, record="AAAA")) == (
            False, "127.0.0.1: no AAAA record for ha.home")
    async with dns_server(lambda q: dns_reply(q, rcode=3)) as port:
        assert await run_dns_check(dns_check(port)) == (False, "127.0.0.1: answer NXDOMAIN")
    async with dns_server(lambda q: b"\x00\x01garbage") as port:
        ok, detail = await run_dns_check(dns_check(port))
        assert not ok and detail in ("127.0.0.1: not the answer to this query", "127.0.0.1: malformed answer")
    async with dns_server(lambda q: None) as port:
        assert await run_dns_check(dns_check(port)) == (False, "no answer from 127.0.0.1 within 0.3s")


@settings(max_examples=2000, deadline=None)
@given(data=st.binary(max_size=600), record=st.sampled_from(["A", "AAAA"]))
def test_no_bytes_make_the_dns_parser_raise_anything_but_a_dns_error(data: bytes, record: str) -> None:
    query_id = int.from_bytes(data[:2] or b"\0\0", "big")
    try:
        addresses = health.parse_dns_answer(data, query_id, record)
    except health.DnsError:
        return
    assert all(isinstance(a, str) for a in addresses)


@settings(max_examples=500, deadline=None)
@given(answers=st.lists(st.tuples(st.sampled_from([1, 5, 28]), st.binary(max_size=20)), max_size=5),
       cut=st.integers(min_value=0, max_value=400))
def test_truncated_or_odd_answers_are_errors_or_addresses(answers: list[tuple[int, bytes]], cut: int) -> None:
    query = health.dns_query(7, "ha.home", "A")
    reply = dns_reply(query, answers=answers)
    for data in (reply, reply[:cut]):
        try:
            addresses = health.parse_dns_answer(data, 7, "A")
        except health.DnsError:
            continue
        assert addresses == [str(ipaddress.ip_address(r)) for t, r in answers if t == 1 and len(r) == 4]


def test_interface_check_reads_the_link_state(tmp_path: Path) -> None:
    def interface(name: str, operstate: str, carrier: str | None) -> InterfaceCheck:
        (tmp_path / name).mkdir()
        (tmp_path / name / "operstate").write_text(operstate + "\n")
        if carrier is not None:
            (tmp_path / name / "carrier").write_text(carrier + "\n")
        return InterfaceCheck(type="interface", name=name, interface=name)

    assert run_interface_check(interface("eth0", "up", "1"), tmp_path) == (True, "eth0 is up")
    assert run_interface_check(interface("tun0", "unknown", "1"), tmp_path) == (True, "tun0 is up")
    assert run_interface_check(interface("eth1", "down", None), tmp_path) == (False, "eth1 is down, no carrier")
    assert run_interface_check(interface("eth2", "lowerlayerdown", "0"), tmp_path) == (
        False, "eth2 is lowerlayerdown, no carrier")
    missing = InterfaceCheck(type="interface", name="x", interface="wlan9")
    assert run_interface_check(missing, tmp_path) == (False, "no interface wlan9")
    assert run_interface_check(InterfaceCheck(type="interface", name="lo", interface="lo"))[0]  # the real one


# ---- the monitor --------------------------------------------------------------------------------


class Changes:
    """Collects on_change calls; ``next()`` waits for the next one."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, str]] = []
        self._queue: asyncio.Queue[tuple[bool, str]] = asyncio.Queue()

    def __call__(self, healthy: bool, detail: str) -> None:
        self.calls.append((healthy, detail))
        self._queue.put_nowait((healthy, detail))

    async def next(self) -> tuple[bool, str]:
        return await asyncio.wait_for(self._queue.get(), 2)


async def test_monitor_without_checks_is_healthy_at_once() -> None:
    changes = Changes()
    async with HealthMonitor([], on_change=changes) as monitor:
        assert monitor.healthy is True
        assert monitor.states() == {}
        assert monitor.detail() == ""
        assert changes.calls == [(True, "")]


async def test_monitor_reports_flips_of_a_check(tmp_path: Path) -> None:
    flag = tmp_path / "healthy"
    flag.touch()
    check = command_check(f"test -e {flag}", name="flappy", interval=0.05, timeout=0.05, rise=2, fall=2)
    changes = Changes()
    async with HealthMonitor([check], on_change=changes) as monitor:
        assert await changes.next() == (True, "")
        assert monitor.healthy is True
        assert monitor.states() == {"flappy": True}

        flag.unlink()
        assert await changes.next() == (False, "flappy: exit 1")
        assert monitor.healthy is False
        assert monitor.states() == {"flappy": False}
        assert monitor.detail() == "flappy: exit 1"

        flag.touch()
        assert await changes.next() == (True, "")
        assert monitor.detail() == ""
    assert changes.calls == [(True, ""), (False, "flappy: exit 1"), (True, "")]


async def test_monitor_aggregates_command_and_http_checks(server: str) -> None:
    checks: list[HealthCheckConfig] = [
        command_check("true", name="cmd-ok", interval=0.5, timeout=0.5),
        http_check(f"{server}/ok", name="web-ok", interval=0.5, timeout=0.5),
        http_check(f"{server}/fail", name="web-bad", interval=0.5, timeout=0.5),
    ]
    changes = Changes()
    async with HealthMonitor(checks, on_change=changes) as monitor:
        # The tasks have not run yet: unknown health is not health.
        assert monitor.healthy is False
        assert "cmd-ok: no result yet" in monitor.detail()
        assert await changes.next() == (False, "web-bad: HTTP 500: database is locked")
        assert monitor.states() == {"cmd-ok": True, "web-ok": True, "web-bad": False}
    assert len(changes.calls) == 1


async def test_monitor_counts_a_raising_check_as_failed_and_keeps_going(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def flaky(check: CommandCheck) -> tuple[bool, str]:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("boom")
        return True, "exit 0"

    monkeypatch.setattr(health, "run_command_check", flaky)
    changes = Changes()
    check = command_check("true", name="buggy", interval=0.05, timeout=0.05, rise=1, fall=1)
    async with HealthMonitor([check], on_change=changes):
        assert await changes.next() == (False, "buggy: check raised RuntimeError: boom")
        assert await changes.next() == (True, "")
    raised = [r for r in caplog.records if r.name == "hasync.health" and r.levelno == logging.ERROR]
    assert len(raised) == 1  # the repeat is logged at DEBUG
    assert raised[0].exc_info is not None


async def test_monitor_logs_first_failure_as_warning_and_recovery_as_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="hasync.health")
    flag = tmp_path / "healthy"
    check = command_check(f"test -e {flag}", name="svc", interval=0.05, timeout=0.05, rise=1, fall=3)
    changes = Changes()
    async with HealthMonitor([check], on_change=changes):
        assert await changes.next() == (False, "svc: exit 1")
        flag.touch()
        assert await changes.next() == (True, "")
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "hasync.health"]
    assert records[0] == (logging.WARNING, "health check svc failed: exit 1")
    assert records[-1] == (logging.INFO, "health check svc recovered: exit 0")
    assert all(level == logging.DEBUG for level, _ in records[1:-1])


async def test_monitor_exit_kills_a_running_command(tmp_path: Path) -> None:
    fifo = tmp_path / "started"
    with fifo_reader(fifo) as started:
        check = command_check(f"sleep 5 & echo $! > {fifo}; wait", name="hang", interval=3, timeout=3)
        began = time.monotonic()
        async with HealthMonitor([check]) as monitor:
            pid = int(await asyncio.wait_for(started.get(), 2))
            assert monitor.detail() == "hang: no result yet"
        assert time.monotonic() - began < 2
        await wait_exited(pid)


async def test_monitor_rejects_duplicate_names_and_reuse() -> None:
    with pytest.raises(ValueError, match="must be unique, repeated: a"):
        HealthMonitor([command_check("true", name="a"), command_check("false", name="a")])
    monitor = HealthMonitor([])
    async with monitor:
        pass
    with pytest.raises(RuntimeError, match="Cannot reopen a HealthMonitor once it has been closed"):
        async with monitor:
            pass
