"""The scenarios by name. A scenario is a function ``(Context) -> Result`` registered with ``@scenario``;
one not built yet is registered with ``pending(...)`` and reports a placeholder row instead of a number.

To add one (the state-sync scenarios, say): write ``bench/<group>.py`` with a function decorated
``@scenario("sync-latency-mosquitto", "…", modes=("quick", "full"))`` and import the module in
``bench/scenarios.py``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .report import Result, Row

MODES = ("quick", "full")


@dataclass
class Context:
    """What a scenario gets: the mode, an optional override of the number of runs, a work directory."""

    mode: str
    workdir: Path
    runs_override: int | None = None
    started: float = field(default_factory=time.monotonic)
    soak_seconds: float = 3600.0  # how long a soak runs (soak-fast)

    @property
    def full(self) -> bool:
        return self.mode == "full"

    def runs(self, quick: int, full: int) -> int:
        """How many runs: ``--runs`` if given, else the mode's default."""
        if self.runs_override is not None:
            return self.runs_override
        return full if self.full else quick

    def log(self, text: str) -> None:
        print(f"[bench {time.monotonic() - self.started:7.1f} s] {text}", file=sys.stderr, flush=True)


Run = Callable[[Context], Result]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    run: Run
    modes: tuple[str, ...]


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, title: str, *, modes: tuple[str, ...] = MODES) -> Callable[[Run], Run]:
    def register(run: Run) -> Run:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} is registered twice")
        SCENARIOS[name] = Scenario(name, title, run, modes)
        return run

    return register


def pending(name: str, title: str, metrics: list[tuple[str, str]], why: str) -> None:
    """Register a scenario that is not built yet: its rows say ``why`` instead of a number."""

    def run(ctx: Context) -> Result:
        return Result(name, title, rows=[Row(metric, unit, pending=why) for metric, unit in metrics])

    scenario(name, title)(run)
