"""Small asyncio helpers shared by the broker and Home Assistant edges: reconnect backoff, waiting with a
deadline. No I/O of their own."""

from __future__ import annotations

import asyncio
import random


class Backoff:
    """Exponential backoff with full jitter and a cap; reset after a connection that worked."""

    def __init__(self, minimum: float, maximum: float, rng: random.Random | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self._attempt = 0
        self._rng = rng or random.Random()

    def reset(self) -> None:
        self._attempt = 0

    def next_delay(self, *, permanent: bool = False) -> float:
        if permanent:
            return self.maximum
        ceiling = min(self.maximum, self.minimum * 2.0**self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        return self.minimum + self._rng.random() * (ceiling - self.minimum)


async def wait_or(event: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` seconds or until ``event`` is set; True if the event was set."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(delay):
            await event.wait()
    except TimeoutError:
        return False
    return True
