"""Health checks that gate leadership or weigh on it, like keepalived's ``track_script`` and
``track_interface``.

A node is *healthy* when every gating check (``weight`` 0) is up; only a healthy node may claim or keep the
lease. A weighted check moves the node's priority instead (keepalived's ``weight``): a negative weight is
added while it is down, a positive one while it is up, so a node with a flaky camera integration still
beats a dead one. A check with ``when: primary`` runs only while the node is primary (``set_primary``:
"does the DHCP server I started answer?"); it starts up after each promotion and is probed from one
``interval`` later (the service's start-up), and failing it makes the primary unhealthy: its fault hook
runs and it hands over. Off the primary it counts as up.

Each check is a shell command (exit status 0 is success), an HTTP GET (a 2xx status, or one of
``expect_status``), a TCP connection, a DNS query over UDP (an answer with a record of the type asked,
optionally one of ``expect``) or an interface's link state (up, with a carrier), run every ``interval``
seconds and given ``timeout`` seconds to finish.

Flapping is damped per check by rise/fall hysteresis (:class:`CheckState`, pure and synchronous): an
up check goes down after ``fall`` consecutive failures, a down check comes up after ``rise``
consecutive successes. The very first result sets the state directly, so a node that starts healthy
does not wait ``rise`` intervals before it may take part in the election.

:class:`HealthMonitor` runs one named task per check in a TaskGroup and reports the aggregate through
``on_change(healthy, detail)``: once when every check has produced its first result, then on every
change; and the weights' sum through ``on_priority(delta)``, likewise. Until then ``healthy`` is False, so a
starting node never claims on unknown health.

A check's command runs in its own session (process group); on timeout or shutdown the whole group is
killed. A check is finished when its shell has exited *and* its output is closed, so a command that
starts a background process must redirect that process's output, or it counts as still running.
Errors are results, not exceptions: a probe returns ``(ok, detail)``, and anything a probe raises
unexpectedly is logged and counted as a failure.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import secrets
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from .config import CommandCheck, DnsCheck, HealthCheckConfig, HttpCheck, InterfaceCheck, TcpCheck
from .process import describe_exit, kill_group

if TYPE_CHECKING:  # aiohttp only for HTTP checks: 14 MiB an agent without them does not pay
    import aiohttp

logger = logging.getLogger(__name__)

_DETAIL_CHARS = 200  # of a probe's output kept in its detail (the tail: errors come last)
_OUTPUT_BYTES = 4096  # of a command's output kept in memory while it runs


# ---- hysteresis ---------------------------------------------------------------------------------


@dataclass
class CheckState:
    """One check's up/down state with rise/fall hysteresis. Pure: no I/O, no clock.

    ``up`` is None until the first result, which sets it directly. After that, ``rise`` consecutive
    successes bring a down check up and ``fall`` consecutive failures bring an up check down.
    """

    rise: int = 2
    fall: int = 2
    up: bool | None = None
    consecutive_successes: int = 0
    consecutive_failures: int = 0
    last_ok: bool | None = None
    last_detail: str = ""

    def __post_init__(self) -> None:
        if self.rise < 1 or self.fall < 1:
            raise ValueError(f"rise and fall must be >= 1, got rise={self.rise} fall={self.fall}")

    def record(self, ok: bool, detail: str) -> bool:
        """Apply one result; return True if ``up`` changed (including the first result)."""
        self.last_ok = ok
        self.last_detail = detail
        if ok:
            self.consecutive_successes += 1
            self.consecutive_failures = 0
        else:
            self.consecutive_failures += 1
            self.consecutive_successes = 0
        if self.up is None:
            self.up = ok
            return True
        if not self.up and self.consecutive_successes >= self.rise:
            self.up = True
            return True
        if self.up and self.consecutive_failures >= self.fall:
            self.up = False
            return True
        return False


# ---- probes -------------------------------------------------------------------------------------


def _clip(text: str) -> str:
    """One line, at most _DETAIL_CHARS, keeping the end (where errors usually are)."""
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_CHARS else "..." + text[-(_DETAIL_CHARS - 3) :]


async def _read_tail(stream: asyncio.StreamReader, into: bytearray) -> None:
    """Read ``stream`` to EOF, keeping only its last _OUTPUT_BYTES in ``into``."""
    while chunk := await stream.read(65536):
        into += chunk
        del into[:-_OUTPUT_BYTES]


async def run_command_check(check: CommandCheck) -> tuple[bool, str]:
    """Run the check's command once; ``(True, ...)`` iff it exits 0 within ``check.timeout``."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            check.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return False, f"could not start: {exc}"
    stdout = proc.stdout
    assert stdout is not None
    output = bytearray()
    try:
        async with asyncio.timeout(check.timeout):
            await _read_tail(stdout, output)
            returncode = await proc.wait()
    except TimeoutError:
        await kill_group(proc, lambda: _read_tail(stdout, output), "health check")
        text = _clip(output.decode(errors="replace"))
        return False, f"timed out after {check.timeout:g}s" + (f": {text}" if text else "")
    except asyncio.CancelledError:
        await kill_group(proc, lambda: _read_tail(stdout, output), "health check")
        raise
    text = _clip(output.decode(errors="replace"))
    detail = describe_exit(returncode) + (f": {text}" if text else "")
    return returncode == 0, detail


async def run_http_check(check: HttpCheck, session: aiohttp.ClientSession) -> tuple[bool, str]:
    """GET the check's URL once; ``(True, ...)`` iff the status is expected, within ``check.timeout``."""
    import aiohttp

    try:
        async with (
            asyncio.timeout(check.timeout),
            session.get(check.url, allow_redirects=False, ssl=check.verify_tls) as response,
        ):
            status = response.status
            ok = status in check.expect_status if check.expect_status else 200 <= status < 300
            body = b"" if ok else await response.content.read(_DETAIL_CHARS)
    except TimeoutError:
        return False, f"timed out after {check.timeout:g}s"
    except aiohttp.ClientError as exc:
        return False, _clip(f"request failed: {type(exc).__name__}: {exc}")
    text = _clip(body.decode(errors="replace"))
    return ok, f"HTTP {status}" + (f": {text}" if text else "")


async def run_tcp_check(check: TcpCheck) -> tuple[bool, str]:
    """Connect once; ``(True, ...)`` iff the connection is accepted within ``check.timeout``."""
    try:
        async with asyncio.timeout(check.timeout):
            _, writer = await asyncio.open_connection(check.host, check.port)
    except TimeoutError:
        return False, f"no connection to {check.host}:{check.port} within {check.timeout:g}s"
    except OSError as exc:
        return False, _clip(f"{check.host}:{check.port}: {exc.strerror or exc}")
    writer.close()
    try:
        async with asyncio.timeout(check.timeout):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        pass  # the connection was accepted: that was the check
    return True, f"connected to {check.host}:{check.port}"


_QTYPE = {"A": 1, "AAAA": 28}
_RCODES = {1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
_MAX_NAME_HOPS = 128  # labels and pointers followed in one name: a loop of pointers ends here


class DnsError(ValueError):
    """A DNS answer that is an error or cannot be read (the detail of a failed check)."""


def dns_query(query_id: int, name: str, record: str) -> bytes:
    """A recursive query for ``name``'s ``record`` (A or AAAA), as a UDP payload."""
    qname = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.rstrip(".").split("."))
    return struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + qname + b"\0" + struct.pack("!HH", _QTYPE[record], 1)


def _skip_name(data: bytes, offset: int) -> int:
    """The offset after the (possibly compressed) name at ``offset``."""
    for _ in range(_MAX_NAME_HOPS):
        length = data[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:  # a pointer ends the name where it stands
            if offset + 2 > len(data):
                raise DnsError("truncated name")
            return offset + 2
        if length & 0xC0:
            raise DnsError("bad label")
        offset += 1 + length
    raise DnsError("name too long")


def parse_dns_answer(data: bytes, query_id: int, record: str) -> list[str]:
    """The addresses of type ``record`` in the answer to query ``query_id``; ``DnsError`` for an error
    answer or anything malformed (the bytes come from the network: nothing here may raise otherwise)."""
    try:
        ident, flags, qdcount, ancount = struct.unpack_from("!HHHH", data, 0)
        if ident != query_id or not flags & 0x8000:
            raise DnsError("not the answer to this query")
        rcode = flags & 0x000F
        if rcode:
            raise DnsError(f"answer {_RCODES.get(rcode, f'rcode {rcode}')}")
        offset = 12
        for _ in range(qdcount):
            offset = _skip_name(data, offset) + 4
        addresses = []
        for _ in range(ancount):
            offset = _skip_name(data, offset)
            rtype, _class, _ttl, length = struct.unpack_from("!HHIH", data, offset)
            offset += 10
            rdata = data[offset:offset + length]
            if len(rdata) != length:
                raise DnsError("truncated answer")
            offset += length
            if rtype == _QTYPE[record] and length == (4 if record == "A" else 16):
                addresses.append(str(ipaddress.ip_address(rdata)))
        return addresses
    except (struct.error, IndexError):
        raise DnsError("malformed answer") from None


class _DnsClient(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.answer.done():
            self.answer.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


async def run_dns_check(check: DnsCheck) -> tuple[bool, str]:
    """Ask once; ``(True, ...)`` iff an answer without error holds a record of the type asked (one of
    ``expect``, if given) within ``check.timeout``."""
    query_id = secrets.randbits(16)
    loop = asyncio.get_running_loop()
    transport = None
    try:
        async with asyncio.timeout(check.timeout):
            transport, client = await loop.create_datagram_endpoint(_DnsClient,
                                                                    remote_addr=(check.server, check.port))
            transport.sendto(dns_query(query_id, check.query, check.record))
            answer = await client.answer
        addresses = parse_dns_answer(answer, query_id, check.record)
    except TimeoutError:
        return False, f"no answer from {check.server} within {check.timeout:g}s"
    except OSError as exc:
        return False, _clip(f"{check.server}: {exc.strerror or exc}")
    except DnsError as exc:
        return False, f"{check.server}: {exc}"
    finally:
        if transport is not None:
            transport.close()
    if not addresses:
        return False, f"{check.server}: no {check.record} record for {check.query}"
    if check.expect and not set(addresses) & set(check.expect):
        return False, _clip(f"{check.query} is {', '.join(addresses)}, not {', '.join(check.expect)}")
    return True, _clip(f"{check.query} is {', '.join(addresses)}")


SYS_CLASS_NET = Path("/sys/class/net")


def run_interface_check(check: InterfaceCheck, sys_class_net: Path = SYS_CLASS_NET) -> tuple[bool, str]:
    """The interface's link is up: ``operstate`` up, or unknown (virtual devices) with a carrier."""
    base = sys_class_net / check.interface
    try:
        operstate = (base / "operstate").read_text().strip()
    except OSError:
        return False, f"no interface {check.interface}"
    try:
        carrier = (base / "carrier").read_text().strip() == "1"
    except OSError:  # reading carrier fails while the interface is down
        carrier = False
    if operstate == "up" or (operstate == "unknown" and carrier):
        return True, f"{check.interface} is up"
    return False, f"{check.interface} is {operstate}" + ("" if carrier else ", no carrier")


# ---- the monitor --------------------------------------------------------------------------------

Probe = Callable[[HealthCheckConfig], Awaitable[tuple[bool, str]]]


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class HealthMonitor:
    """Runs health checks and reports the node's aggregate health.

    ``async with HealthMonitor(checks, on_change=cb) as monitor:`` starts one task per check;
    leaving the block cancels them and kills any command still running. ``on_change(healthy,
    detail)`` is called from the monitor's tasks (keep it quick): once with the initial aggregate when
    every check has produced a result (at once when there are no checks), then on every change;
    ``on_priority(delta)``, the weighted checks' sum, likewise. ``set_primary`` starts and stops the checks
    that run only on the primary. HTTP checks share ``session`` if one is given, else a session the monitor
    opens and closes.
    """

    def __init__(
        self,
        checks: Sequence[HealthCheckConfig],
        on_change: Callable[[bool, str], None] | None = None,
        *,
        on_priority: Callable[[int], None] | None = None,
        session: aiohttp.ClientSession | None = None,
        sys_class_net: Path = SYS_CLASS_NET,
        probe: Probe | None = None,
    ) -> None:
        """``probe``: runs one check (the seam; default: the real probes above)."""
        names = [check.name for check in checks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"health check names must be unique, repeated: {', '.join(duplicates)}")
        self._checks = list(checks)
        self._on_change = on_change
        self._on_priority = on_priority
        self._session = session
        self._sys_class_net = sys_class_net
        self._probe_seam = probe
        self._owns_session = False
        self._states = {check.name: self._initial(check) for check in checks}
        self._raising: set[str] = set()
        self._reported: bool | None = None
        self._reported_delta: int | None = None
        self._primary = asyncio.Event()
        self._tenure = 0  # bumped by every set_primary: a primary check's result from a past tenure is dropped
        self._state = _State.NEW
        self._task_group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ---- queries ------------------------------------------------------------------------------

    @staticmethod
    def _initial(check: HealthCheckConfig) -> CheckState:
        # A check of the primary's own services starts up: it has nothing to say before they run.
        return CheckState(rise=check.rise, fall=check.fall, up=True if check.when == "primary" else None)

    @property
    def healthy(self) -> bool:
        """True iff every gating check is up (so True with no checks, False until every check has a result)."""
        return all(self._states[check.name].up for check in self._checks if check.weight == 0)

    @property
    def priority_delta(self) -> int:
        """What the weighted checks add to the node's priority now (a check without a result counts down)."""
        total = 0
        for check in self._checks:
            up = bool(self._states[check.name].up)
            if (check.weight < 0 and not up) or (check.weight > 0 and up):
                total += check.weight
        return total

    def set_primary(self, primary: bool) -> None:
        """This node became primary (the checks ``when: primary`` start) or stopped being (they stop, up)."""
        if primary == self._primary.is_set():
            return
        self._tenure += 1
        if primary:
            self._primary.set()
            return
        self._primary.clear()
        for check in self._checks:
            if check.when == "primary":
                self._states[check.name] = self._initial(check)
        self._report()

    def states(self) -> dict[str, bool]:
        """Each check's state by name; a check without a result yet counts as down."""
        return {name: bool(state.up) for name, state in self._states.items()}

    def detail(self) -> str:
        """A short description of the checks that are not up; empty when healthy."""
        parts = []
        for check in self._checks:
            state = self._states[check.name]
            if check.weight:
                continue  # weighs on the priority, not on health
            if state.up is None:
                parts.append(f"{check.name}: no result yet")
            elif not state.up:
                parts.append(f"{check.name}: {state.last_detail}")
        return "; ".join(parts)

    # ---- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state is _State.RUNNING:
            raise RuntimeError("This HealthMonitor is already running.")
        if self._state is _State.CLOSED:
            raise RuntimeError("Cannot reopen a HealthMonitor once it has been closed.")
        self._state = _State.RUNNING
        if self._session is None and self._probe_seam is None and any(isinstance(c, HttpCheck) for c in self._checks):
            # A fresh connection per probe: a check should prove the server still accepts them.
            import aiohttp

            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
            self._owns_session = True
        # The loops let nothing but cancellation escape; should one fail anyway, the TaskGroup cancels
        # the task that entered the monitor and __aexit__ raises the error, as a supervisor should.
        self._task_group = asyncio.TaskGroup()
        await self._task_group.__aenter__()
        for check in self._checks:
            self._tasks.append(
                self._task_group.create_task(self._loop(check), name=f"hasync.health[{check.name}]")
            )
        self._report()  # no checks, or only checks of the primary's services: the aggregate is known at once
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._state = _State.CLOSED
        for task in self._tasks:
            task.cancel()
        try:
            if self._task_group is not None:
                await self._task_group.__aexit__(exc_type, exc, tb)
        finally:
            if self._owns_session and self._session is not None:
                await self._session.close()

    # ---- internals ----------------------------------------------------------------------------

    async def _probe(self, check: HealthCheckConfig) -> tuple[bool, str]:
        if self._probe_seam is not None:
            return await self._probe_seam(check)
        match check:
            case CommandCheck():
                return await run_command_check(check)
            case TcpCheck():
                return await run_tcp_check(check)
            case DnsCheck():
                return await run_dns_check(check)
            case InterfaceCheck():
                return run_interface_check(check, self._sys_class_net)
        assert self._session is not None
        return await run_http_check(check, self._session)

    async def _loop(self, check: HealthCheckConfig) -> None:
        loop = asyncio.get_running_loop()
        graced = -1  # the tenure as primary whose start-up this check has waited out
        while True:
            tenure = self._tenure
            if check.when == "primary" and (not self._primary.is_set() or graced != tenure):
                await self._primary.wait()
                graced = self._tenure
                await asyncio.sleep(check.interval)  # the primary's services are starting
                continue
            started = loop.time()
            try:
                ok, detail = await self._probe(check)
            except Exception as exc:
                # A bug or an unforeseen library error: count it as a failure and keep checking.
                if check.name in self._raising:
                    logger.debug("health check %s raised again", check.name, exc_info=True)
                else:
                    logger.exception("health check %s raised", check.name)
                self._raising.add(check.name)
                ok, detail = False, _clip(f"check raised {type(exc).__name__}: {exc}")
            else:
                self._raising.discard(check.name)
            if check.when == "primary" and tenure != self._tenure:
                continue  # the node stopped being primary meanwhile: this result belongs to that tenure
            self._record(check, ok, detail)
            await asyncio.sleep(max(0.0, check.interval - (loop.time() - started)))

    def _record(self, check: HealthCheckConfig, ok: bool, detail: str) -> None:
        state = self._states[check.name]
        first = state.up is None
        changed = state.record(ok, detail)
        if not ok:
            if state.consecutive_failures == 1:
                logger.warning("health check %s failed: %s", check.name, detail)
            elif changed:
                logger.warning(
                    "health check %s is down after %d failures: %s",
                    check.name,
                    state.consecutive_failures,
                    detail,
                )
            else:
                logger.debug(
                    "health check %s failed (%d in a row): %s", check.name, state.consecutive_failures, detail
                )
        elif changed and not first:
            logger.info("health check %s recovered: %s", check.name, detail)
        elif first:
            logger.debug("health check %s is up: %s", check.name, detail)
        if changed:
            self._report()

    def _report(self) -> None:
        if any(state.up is None for state in self._states.values()):
            return
        healthy, delta = self.healthy, self.priority_delta
        if delta != self._reported_delta:
            self._reported_delta = delta
            if self._on_priority is not None:
                try:
                    self._on_priority(delta)
                except Exception:
                    logger.exception("health on_priority callback failed")
        if healthy == self._reported:
            return
        self._reported = healthy
        if self._on_change is None:
            return
        try:
            self._on_change(healthy, self.detail())
        except Exception:
            logger.exception("health on_change callback failed")
