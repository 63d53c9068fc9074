"""Health checks that gate leadership, like keepalived's ``track_script``.

A node is *healthy* when every configured check is up; only a healthy node may claim or keep the lease.
Each check is a shell command (exit status 0 is success) or an HTTP GET (a 2xx status, or one of
``expect_status``), run every ``interval`` seconds and given ``timeout`` seconds to finish.

Flapping is damped per check by rise/fall hysteresis (:class:`CheckState`, pure and synchronous): an
up check goes down after ``fall`` consecutive failures, a down check comes up after ``rise``
consecutive successes. The very first result sets the state directly, so a node that starts healthy
does not wait ``rise`` intervals before it may take part in the election.

:class:`HealthMonitor` runs one named task per check in a TaskGroup and reports the aggregate through
``on_change(healthy, detail)``: once when every check has produced its first result, then on every
change. Until then ``healthy`` is False, so a starting node never claims on unknown health.

A check's command runs in its own session (process group); on timeout or shutdown the whole group is
killed. A check is finished when its shell has exited *and* its output is closed, so a command that
starts a background process must redirect that process's output, or it counts as still running.
Errors are results, not exceptions: a probe returns ``(ok, detail)``, and anything a probe raises
unexpectedly is logged and counted as a failure.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import aiohttp

from .config import CommandCheck, HealthCheckConfig, HttpCheck
from .process import describe_exit, kill_group

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


# ---- the monitor --------------------------------------------------------------------------------


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class HealthMonitor:
    """Runs health checks and reports the node's aggregate health.

    ``async with HealthMonitor(checks, on_change=cb) as monitor:`` starts one task per check;
    leaving the block cancels them and kills any command still running. ``on_change(healthy,
    detail)`` is called from the monitor's tasks (keep it quick): once with the initial aggregate when
    every check has produced a result (at once when there are no checks), then on every change.
    HTTP checks share ``session`` if one is given, else a session the monitor opens and closes.
    """

    def __init__(
        self,
        checks: Sequence[HealthCheckConfig],
        on_change: Callable[[bool, str], None] | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        names = [check.name for check in checks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"health check names must be unique, repeated: {', '.join(duplicates)}")
        self._checks = list(checks)
        self._on_change = on_change
        self._session = session
        self._owns_session = False
        self._states = {check.name: CheckState(rise=check.rise, fall=check.fall) for check in checks}
        self._raising: set[str] = set()
        self._reported: bool | None = None
        self._state = _State.NEW
        self._task_group: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ---- queries ------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """True iff every check is up (so True with no checks, False until every check has a result)."""
        return all(state.up for state in self._states.values())

    def states(self) -> dict[str, bool]:
        """Each check's state by name; a check without a result yet counts as down."""
        return {name: bool(state.up) for name, state in self._states.items()}

    def detail(self) -> str:
        """A short description of the checks that are not up; empty when healthy."""
        parts = []
        for name, state in self._states.items():
            if state.up is None:
                parts.append(f"{name}: no result yet")
            elif not state.up:
                parts.append(f"{name}: {state.last_detail}")
        return "; ".join(parts)

    # ---- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state is _State.RUNNING:
            raise RuntimeError("This HealthMonitor is already running.")
        if self._state is _State.CLOSED:
            raise RuntimeError("Cannot reopen a HealthMonitor once it has been closed.")
        self._state = _State.RUNNING
        if self._session is None and any(isinstance(check, HttpCheck) for check in self._checks):
            # A fresh connection per probe: a check should prove the server still accepts them.
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
        if not self._checks:
            self._report()
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
        if isinstance(check, CommandCheck):
            return await run_command_check(check)
        assert self._session is not None
        return await run_http_check(check, self._session)

    async def _loop(self, check: HealthCheckConfig) -> None:
        loop = asyncio.get_running_loop()
        while True:
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
        healthy = self.healthy
        if healthy == self._reported:
            return
        self._reported = healthy
        if self._on_change is None:
            return
        try:
            self._on_change(healthy, self.detail())
        except Exception:
            logger.exception("health on_change callback failed")
