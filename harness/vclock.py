"""An event loop on virtual time, for the in-process tier.

``run(main())`` runs a coroutine on a loop whose clock jumps straight to the next timer whenever nothing
is ready to run: a test that waits out a lease, a reconnect backoff or a minute of heartbeats takes
milliseconds, and its timing is exact and repeatable whatever the machine is doing. Timeouts and
sleeps (``asyncio.timeout``, ``asyncio.sleep``, ``call_later``) all run on it; give the code under test
``loop.time`` as its clock (``clock()`` below) and ``wall()`` as its wall clock.

Only for code whose I/O is in memory (``harness.fakebroker``, ``harness.fakeha``): a real socket or child
process would see the clock jump past its deadlines while it waits. The loop still polls real file
descriptors without blocking, so ``call_soon_threadsafe`` and signals work; with no timer at all it
blocks for real, and the test's own timeout ends a deadlock.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

START = 1_000.0  # the loop's clock at start (monotonic seconds)
WALL_START = 1_800_000_000.0  # wall() at START: 2027-01-15, fixed so runs repeat exactly


SPIN_LIMIT = 200_000  # loop iterations at one virtual instant before the loop calls it a busy loop


class BusyLoopError(RuntimeError):
    """Code under test keeps the loop busy without ever waiting: on a real loop, a core spinning at 100 %."""


class _JumpingSelector(selectors.DefaultSelector):
    loop: VirtualClockLoop
    spins = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready: list[tuple[selectors.SelectorKey, int]] = super().select(0)
        if ready or timeout is None or timeout <= 0:
            self.spins += 1
            if self.spins > SPIN_LIMIT:
                raise BusyLoopError(f"{SPIN_LIMIT} loop iterations at virtual time {self.loop.time():.6f}: "
                                    "something is busy without ever waiting")
            return ready if ready or timeout is not None else super().select(None)
        self.spins = 0
        self.loop.advance(timeout)
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self
        self._now = START

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


def clock() -> float:
    """The running loop's time (virtual on a VirtualClockLoop)."""
    return asyncio.get_running_loop().time()


def wall() -> float:
    """A wall clock that moves with the loop's: fixed start, no steps."""
    return WALL_START + (asyncio.get_running_loop().time() - START)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on a fresh virtual-time loop, as ``asyncio.run`` would."""
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        return runner.run(main)
