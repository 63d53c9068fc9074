"""The agent's side of the guardian (``hasync.guardian``): what takes this node's fenced resources down when the
agent dies or stalls, and so cannot itself.

``Guardian`` starts the guardian with one end of a pipe and keeps the other for as long as this process lives
(the kernel closes it however the process ends: that end of file is the guardian's signal), starts it again
should it exit, and lets it go on the way out (``close``). It is started when there is something to guard: the
floating IPs (with the real netlink) or a fence command (``hooks.fence``).

With a fence command the agent tells the guardian, on the pipe, until when it may act as primary: ``arm`` with
the election's acting deadline plus ``fence_after`` each time it is extended (the promotion, every renewal that
came back), ``disarm`` once the demote hook has stopped the services. A guardian whose deadline passes runs
the fence command (the agent stalled) and says so; one whose pipe closes while armed runs it too (the agent
died). ``fence_after`` lies between this node's renew deadline, when a live agent has demoted itself, and the
earliest moment another node may be primary (``AgentConfig.takeover_after``): half the gap, at most
``FENCE_MARGIN``, so a live agent always gets there first and the command has the rest to finish in.

Writes never block the agent: the pipe is non-blocking and a line that does not fit (a guardian that reads
nothing, which only a frozen guardian does) is dropped and counted; a new guardian is sent the current state.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import guardian
from .aio import Backoff
from .config import VipAddress
from .metrics import Metrics

logger = logging.getLogger(__name__)

START_TIMEOUT = 10.0  # s for the guardian to start and say whether it may do its work
STOP_TIMEOUT = 2.0  # s it has to exit once the agent lets it go
FENCE_MARGIN = 0.5  # s: the most the fence waits past the renew deadline (half the gap to a takeover, if less)


def fence_after(renew_deadline: float, takeover_after: float) -> float:
    """Seconds after the acting deadline at which a stalled primary is fenced: past the moment a live agent has
    demoted itself, before another node may be elected."""
    return min(FENCE_MARGIN, (takeover_after - renew_deadline) / 2)


class Guardian:
    """``addresses``: removed when the agent dies. ``fence``: the command run when it dies or stalls while armed
    (``fence_timeout``: its limit). ``on_fenced(term, outcome)``: the guardian ran it while this process lives
    (a stall: the agent was frozen or starved past its deadline), called from the event loop. ``env``: added to
    the guardian's environment, and so to the fence command's (HASYNC_NODE, HASYNC_CLUSTER)."""

    def __init__(self, addresses: Sequence[VipAddress], metrics: Metrics, *, fence: str | None = None,
                 fence_timeout: float = 30.0, env: Mapping[str, str] | None = None,
                 on_fenced: Callable[[int, str], None] = lambda term, outcome: None) -> None:
        self._argv = [sys.executable, "-m", "hasync.guardian",
                      *(["--fence", fence, "--fence-timeout", repr(fence_timeout)] if fence is not None else []),
                      *[arg for vip in addresses for arg in (vip.interface, vip.address)]]
        self._env = {**os.environ, **env} if env else None
        self.fences = fence is not None
        self._metrics = metrics
        self._on_fenced = on_fenced
        self._process: asyncio.subprocess.Process | None = None
        self._pipe: int | None = None  # our end: the kernel closes it when this process ends, however it ends
        self._denied = False  # it may do nothing (no CAP_NET_ADMIN, no fence command): starting it again is pointless
        self._state = guardian.DISARM  # the last line meant for it (sent again to a new guardian)
        self.starts = 0
        self.dropped = 0  # lines that did not fit in the pipe
        self.stall_fences = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def status(self) -> dict[str, Any]:
        return {"pid": self.pid, "starts": self.starts, "armed": self._state != guardian.DISARM,
                "stall_fences": self.stall_fences}

    # ---- what the agent tells it --------------------------------------------------------------------

    def arm(self, deadline: float, term: int) -> None:
        """Fence if this process dies, or if ``deadline`` (``time.monotonic``; inf: never) passes without a new
        ``arm`` or a ``disarm``."""
        self._send(f"{guardian.ARM} {deadline!r} {term}" if math.isfinite(deadline) else f"{guardian.ARM} inf {term}")

    def disarm(self) -> None:
        """The services are down (the demote hook ran): nothing to fence."""
        self._send(guardian.DISARM)

    def _send(self, line: str) -> None:
        if line == self._state or not self.fences:
            return
        self._state = line
        self._write()

    def _write(self) -> None:
        if self._pipe is None:
            return
        try:
            os.write(self._pipe, (self._state + "\n").encode())
        except BlockingIOError:
            self.dropped += 1
            logger.debug("guardian: its pipe is full; a line was dropped")
        except OSError as exc:  # (it exited: run() notices and starts another)
            logger.debug("guardian: cannot write to it: %s", exc)

    # ---- its life ---------------------------------------------------------------------------------

    async def start(self) -> bool:
        """Start it and wait until it is ready to act; False (logged) if it cannot."""
        read, write = os.pipe()  # (not inherited by anything else this process starts: O_CLOEXEC)
        try:
            process = await asyncio.create_subprocess_exec(*self._argv, stdin=read, stdout=asyncio.subprocess.PIPE,
                                                           env=self._env)
        except OSError as exc:
            os.close(write)
            logger.warning("guardian: cannot start it: %s", exc)
            return False
        finally:
            os.close(read)
        assert process.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                answer = (await process.stdout.readline()).decode(errors="replace").strip()
        except TimeoutError:
            answer = ""
        except asyncio.CancelledError:  # the agent is leaving before it was ready
            os.close(write)
            process.kill()
            raise
        word, _, detail = answer.partition(" ")
        if word != guardian.READY:
            os.close(write)
            if process.returncode is None:
                process.kill()
            await process.wait()
            self._denied = answer == guardian.DENIED
            logger.warning("floating IP: the guardian %s; after a kill -9 the addresses go with their lifetime only",
                           "may not change addresses (it needs CAP_NET_ADMIN, ambient for a service)"
                           if self._denied else "did not start")
            return False
        if "may not remove" in detail:
            logger.warning("floating IP: the guardian may not change addresses (it needs CAP_NET_ADMIN, ambient for a "
                           "service); after a kill -9 the addresses go with their lifetime only; it runs the fence "
                           "command")
        os.set_blocking(write, False)
        self._process, self._pipe = process, write
        self.starts += 1
        self._metrics.guardian.set(1)
        logger.debug("guardian started (pid %d, %s)", process.pid, detail.strip("()"))
        if self._state != guardian.DISARM:
            self._write()
        return True

    async def run(self) -> None:
        """The agent's ``guardian`` task: start it (the agent does not wait: a node observes for a lease before
        it can be elected), listen to it, and start it again whenever it exits (killed, it is harmless, but it
        must be back)."""
        backoff = Backoff(1.0, 60.0)
        while True:
            if await self.start():
                backoff.reset()
                assert self._process is not None and self._process.stdout is not None
                await self._listen(self._process.stdout)
                code = await self._process.wait()
                self._lost(f"the guardian exited ({code}); starting it again")
            if self._denied:
                return
            await asyncio.sleep(backoff.next_delay())

    async def _listen(self, stdout: asyncio.StreamReader) -> None:
        """Its reports, until it exits: ``fenced TERM OUTCOME`` after a stall."""
        while line := await stdout.readline():
            word, _, rest = line.decode(errors="replace").strip().partition(" ")
            term, _, outcome = rest.partition(" ")
            if word != guardian.FENCED or not term.isdigit():
                logger.debug("guardian: unexpected line %r", line[:80])
                continue
            self.stall_fences += 1
            if self._state.startswith(guardian.ARM) and self._state.split()[2] == term:
                self._state = guardian.DISARM  # (it disarmed itself; the next arm is sent)
            self._on_fenced(int(term), outcome)

    def _lost(self, why: str) -> None:
        self._process = None
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        self._metrics.guardian.set(0)
        logger.warning("guardian: %s", why)

    async def close(self) -> None:
        """The agent is leaving and has released what it held (disarmed): the guardian does nothing and exits."""
        process = self._process
        self._process = None
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        self._metrics.guardian.set(0)
        if process is None:
            return
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
