"""Role hooks, like keepalived's notify_master / notify_backup / notify_fault.

A hook is a shell command (``/bin/sh -c``) run when this node's role changes: ``promote`` when it
becomes primary, ``demote`` when it stops being primary, ``fault`` when it becomes unfit to lead.
Hooks run strictly one at a time, in the order they were submitted, by a single task consuming a
queue: a demote submitted after a promote never overtakes it. ``drain()`` waits for everything
submitted so far, which is how the agent makes a graceful release wait for the demote hook.

The hook's environment is the agent's own, plus ``base_env`` given at construction (HASYNC_NODE,
HASYNC_CLUSTER), plus the variables passed to ``submit`` (HASYNC_ROLE, HASYNC_TERM, HASYNC_LEADER,
HASYNC_REASON), plus HASYNC_EVENT. Its stdout and stderr are logged line by line at INFO.

Each run ends in a :class:`HookResult` handed to ``on_result``: a hook that exits non-zero, runs past
``timeout`` (its whole process group is then killed) or cannot be started is a failure, logged at
ERROR with its output's tail. Hooks never raise into the agent. A hook is finished when its shell has
exited *and* its output is closed: a hook that starts a long-running process must redirect that
process's output (``daemon >/dev/null 2>&1 &``), or it is taken for still running and killed at the
timeout.

Leaving ``async with HookRunner(...)`` waits up to ``timeout`` for the queue to finish, then kills the
running hook; hooks that did not get to run are reported as failed results.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from .config import HookEvent, HooksConfig
from .process import describe_exit, kill_group

logger = logging.getLogger(__name__)


MAX_LOGGED_OUTPUT = 64 * 1024  # bytes of a run's output logged; the rest is counted, not logged
_TAIL_BYTES = 4096  # of a run's output kept for its result
_MAX_LINE = 4096  # a longer line is logged in pieces


@dataclass(frozen=True)
class HookResult:
    """How one hook run ended. ``error`` is None exactly when ``ok``."""

    event: HookEvent
    ok: bool
    returncode: int | None  # None when the process never started or never got to run
    duration: float  # seconds, 0.0 when it never started
    output_tail: str  # the last few KiB of stdout and stderr
    error: str | None = None


@dataclass
class _Job:
    event: HookEvent
    command: str
    env: dict[str, str]
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    interrupted: HookResult | None = None  # how it ended when the runner was closed during the run


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"


class _Output:
    """Logs a hook's output line by line (up to MAX_LOGGED_OUTPUT) and keeps its tail."""

    def __init__(self, event: str) -> None:
        self._event = event
        self._partial = bytearray()
        self._logged = 0
        self._dropped = 0
        self.tail = bytearray()

    async def pump(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            self.tail += chunk
            del self.tail[:-_TAIL_BYTES]
            self._partial += chunk
            *lines, rest = self._partial.split(b"\n")
            for line in lines:
                self._log(line)
            while len(rest) > _MAX_LINE:
                self._log(rest[:_MAX_LINE])
                rest = rest[_MAX_LINE:]
            self._partial = bytearray(rest)

    def close(self) -> None:
        if self._partial:
            self._log(self._partial)
            self._partial = bytearray()
        if self._dropped:
            logger.info("hook %s: %d more bytes of output not logged", self._event, self._dropped)

    def text(self) -> str:
        return self.tail.decode(errors="replace")

    def _log(self, line: bytes | bytearray) -> None:
        if self._dropped or self._logged + len(line) + 1 > MAX_LOGGED_OUTPUT:
            self._dropped += len(line) + 1
            return
        self._logged += len(line) + 1
        logger.info("hook %s: %s", self._event, line.decode(errors="replace").rstrip("\r"))


class HookRunner:
    """Runs role hooks one at a time, in submission order.

    ``async with HookRunner(config, base_env, on_result=cb) as runner:`` starts the consumer task;
    ``runner.submit(event, env)`` queues a hook (a no-op when that hook is not configured) and
    ``await runner.drain()`` waits until every hook submitted before the call has finished.
    ``on_result`` is called, from the runner's task, with the result of every hook that was queued.
    """

    def __init__(
        self,
        config: HooksConfig,
        base_env: Mapping[str, str] | None = None,
        *,
        on_result: Callable[[HookResult], None] | None = None,
    ) -> None:
        self._config = config
        self._base_env = dict(base_env or {})
        self._on_result = on_result
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._last: _Job | None = None
        self._pending = 0
        self._state = _State.NEW
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Hooks submitted and not yet finished (queued or running)."""
        return self._pending

    def submit(self, event: HookEvent, env: Mapping[str, str] | None = None) -> None:
        """Queue the hook for ``event`` with extra environment ``env``; never blocks, never raises."""
        command = self._config.command(event)
        if command is None:
            return
        job = _Job(event, command, {**os.environ, **self._base_env, **(env or {}), "HASYNC_EVENT": event.value})
        if self._state is not _State.RUNNING:
            why = "has not started" if self._state is _State.NEW else f"is {self._state.value}"
            self._pending += 1
            self._finish(job, self._not_run(job, f"not run: the hook runner {why}"))
            return
        self._pending += 1
        self._last = job
        self._queue.put_nowait(job)

    def drain(self) -> Coroutine[Any, Any, None]:
        """Wait until every hook submitted before this call has finished (at once if none)."""
        # Hooks finish in submission order, so waiting for the newest one waits for all of them. It is
        # chosen now, not when the coroutine first runs, so later submissions are not waited for.
        return self._wait_for(self._last)

    @staticmethod
    async def _wait_for(job: _Job | None) -> None:
        if job is not None:
            await job.finished.wait()

    # ---- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state is not _State.NEW:
            raise RuntimeError(f"Cannot start a HookRunner that is {self._state.value}; create a new one.")
        self._state = _State.RUNNING
        self._task = asyncio.get_running_loop().create_task(self._consume(), name="hasync.hooks")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Runs on errors and cancellation too: a demote hook queued on the way out should still run.
        self._state = _State.CLOSING
        try:
            async with asyncio.timeout(self._config.timeout):
                await self.drain()
        except TimeoutError:
            logger.warning(
                "%d hook(s) still pending %.0fs after shutdown began; stopping them",
                self._pending,
                self._config.timeout,
            )
        finally:
            self._state = _State.CLOSED
            if self._task is not None:
                self._task.cancel()
                # asyncio.wait, not await: the task's own cancellation must not look like ours.
                await asyncio.wait([self._task])
                if not self._task.cancelled() and self._task.exception() is not None:
                    logger.error("hook runner task failed", exc_info=self._task.exception())
            while not self._queue.empty():
                job = self._queue.get_nowait()
                self._finish(job, self._not_run(job, "not run: the hook runner was closed"))

    # ---- internals ----------------------------------------------------------------------------

    async def _consume(self) -> None:
        while True:
            job = await self._queue.get()
            started = time.monotonic()
            try:
                result = await self._execute(job)
            except asyncio.CancelledError:
                self._finish(
                    job, job.interrupted or self._not_run(job, "not run: the hook runner was closed")
                )
                raise
            except Exception as exc:
                logger.exception("hook %s could not be run", job.event)
                result = HookResult(
                    job.event, False, None, time.monotonic() - started, "", f"internal error: {exc!r}"
                )
            self._finish(job, result)

    async def _execute(self, job: _Job) -> HookResult:
        timeout = self._config.timeout
        started = time.monotonic()
        logger.info("running %s hook", job.event)
        try:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                job.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=job.env,
                start_new_session=True,  # its own process group, so a timeout can kill all of it
            )
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the command or environment
            return HookResult(
                job.event, False, None, time.monotonic() - started, "", f"could not start: {exc}"
            )
        stdout = proc.stdout
        assert stdout is not None
        output = _Output(job.event)
        try:
            async with asyncio.timeout(timeout):
                await output.pump(stdout)
                returncode = await proc.wait()
        except TimeoutError:
            await kill_group(proc, lambda: output.pump(stdout), f"{job.event} hook")
            output.close()
            return HookResult(
                job.event,
                False,
                proc.returncode,
                time.monotonic() - started,
                output.text(),
                f"timed out after {timeout:g}s; process group killed",
            )
        except asyncio.CancelledError:
            await kill_group(proc, lambda: output.pump(stdout), f"{job.event} hook")
            output.close()
            job.interrupted = HookResult(
                job.event,
                False,
                proc.returncode,
                time.monotonic() - started,
                output.text(),
                "killed: the hook runner was closed",
            )
            raise
        output.close()
        ok = returncode == 0
        return HookResult(
            job.event,
            ok,
            returncode,
            time.monotonic() - started,
            output.text(),
            None if ok else describe_exit(returncode),
        )

    @staticmethod
    def _not_run(job: _Job, error: str) -> HookResult:
        return HookResult(job.event, False, None, 0.0, "", error)

    def _finish(self, job: _Job, result: HookResult) -> None:
        self._pending -= 1
        job.finished.set()
        if result.ok:
            logger.info("%s hook finished in %.1fs", result.event, result.duration)
        else:
            tail = result.output_tail.strip()
            logger.error(
                "%s hook failed after %.1fs (%s)%s",
                result.event,
                result.duration,
                result.error,
                f"; output ends:\n{tail}" if tail else "",
            )
        if self._on_result is not None:
            try:
                self._on_result(result)
            except Exception:
                logger.exception("hook on_result callback failed")
