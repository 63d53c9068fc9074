"""Child processes of the agent (health check commands, role hooks): killing their group, naming exits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

REAP_GRACE = 2.0  # seconds to collect a killed group's remaining output


async def kill_group(proc: asyncio.subprocess.Process, drain: Callable[[], Awaitable[None]], what: str) -> None:
    """SIGKILL the process group led by ``proc`` (started with ``start_new_session``), then let
    ``drain`` read what is left of its output and reap it, for at most REAP_GRACE seconds."""
    # The group outlives its leader while any member runs, and Linux never hands out a pid that is
    # still in use as a process group id, so this cannot hit an unrelated group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        async with asyncio.timeout(REAP_GRACE):
            await drain()
            await proc.wait()
    except TimeoutError:
        logger.warning("%s (pid %d): output still open after its group was killed (a child escaped it?)",
                       what, proc.pid)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exit {returncode}"
