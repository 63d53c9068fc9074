"""Role hooks in memory: the fake of ``hasync.effects.Hooks`` (the in-process tier cannot run subprocesses on
virtual time). ``FakeHooks`` records every hook submitted with the loop's time and its environment; the events
in ``failing`` end as failed runs, reported like ``hasync.hooks.HookRunner`` reports them (``on_result``, the
agent's ``_on_hook_result``), on the next loop iteration."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from hasync.config import HookEvent
from hasync.hooks import HookResult


@dataclass
class FakeHooks:
    on_result: Callable[[HookResult], None] | None = None
    failing: set[HookEvent] = field(default_factory=set)
    log: list[tuple[float, HookEvent, dict[str, str]]] = field(default_factory=list)

    @property
    def events(self) -> list[HookEvent]:
        return [event for _, event, _ in self.log]

    def submit(self, event: HookEvent, env: dict[str, str]) -> None:
        loop = asyncio.get_running_loop()
        self.log.append((loop.time(), event, dict(env)))
        ok = event not in self.failing
        result = HookResult(event, ok, 0 if ok else 1, 0.0, "", None if ok else "exit status 1")
        if self.on_result is not None:
            loop.call_soon(self.on_result, result)

    async def drain(self) -> None:
        await asyncio.sleep(0)
