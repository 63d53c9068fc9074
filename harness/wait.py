"""Ports and waiting, the one copy the tests and benchmarks share."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import TypeVar

HOST = "127.0.0.1"
T = TypeVar("T")


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (the OS picks it; another process could take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], T | None], timeout: float, what: str, step: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something true, and return that; AssertionError naming ``what``
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(step)


async def eventually(predicate: Callable[[], T | None], timeout: float, what: str, step: float = 0.01) -> T:
    """``wait_until`` for the event loop: polls without blocking it (on a virtual clock, at no cost)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        await asyncio.sleep(step)
