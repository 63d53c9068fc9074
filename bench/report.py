"""Benchmark results and the Markdown report: rows with their distribution, target and verdict.

A ``Row`` is one measured figure (a distribution of samples in its unit), or a placeholder for one not
measured yet (``pending``). A ``Result`` is what one scenario returns: its rows, how it was measured,
notes, and failures. A failure (two primaries at once, a scenario that crashed) is printed loudly at
the top of the report and makes ``python -m bench`` exit non-zero; a missed target is only reported.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .stats import Summary

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    """The project's goal for a figure: ``stat`` (median, p95, p99, max) at most (or ``at_least``) ``limit``."""

    stat: str
    limit: float
    at_least: bool = False

    def met(self, summary: Summary) -> bool:
        value = summary.stat(self.stat)
        return value >= self.limit if self.at_least else value <= self.limit

    def describe(self, unit: str) -> str:
        return f"{self.stat} {'≥' if self.at_least else '≤'} {fmt(self.limit)} {unit}"


@dataclass
class Row:
    metric: str
    unit: str
    samples: list[float] = field(default_factory=list)
    target: Target | None = None
    note: str = ""
    pending: str | None = None  # e.g. "pending: state sync": no number on purpose

    @property
    def summary(self) -> Summary | None:
        return Summary.of(self.samples) if self.samples and self.pending is None else None

    def verdict(self) -> str:
        summary = self.summary
        if self.pending is not None:
            return self.pending
        if summary is None:
            return "no data"
        if self.target is None:
            return "(no target)"
        return "met" if self.target.met(summary) else "**MISSED**"


@dataclass
class Result:
    scenario: str
    title: str
    method: str = ""
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    overlap: tuple[int, int, float] | None = None  # runs checked, runs with overlap, max overlap (s)
    seconds: float = 0.0
    extra: str = ""  # Markdown printed after the rows (e.g. a side-by-side comparison)

    def missed(self) -> list[Row]:
        return [r for r in self.rows if r.verdict() == "**MISSED**"]


def fmt(value: float) -> str:
    """A figure with about three significant digits."""
    magnitude = abs(value)
    if magnitude >= 100 or value == int(value):
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table: the distribution, then target and verdict beside it."""
    lines = [
        "| metric | unit | runs | min | median | p95 | p99 | max | target | verdict |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for row in rows:
        summary = row.summary
        target = row.target.describe(row.unit) if row.target else "—"
        metric = row.metric + (f" ({row.note})" if row.note else "")
        if summary is None:
            lines.append(f"| {metric} | {row.unit} | 0 | | | | | | {target} | {row.verdict()} |")
            continue
        figures = " | ".join(fmt(summary.stat(s)) for s in ("min", "median", "p95", "p99", "max"))
        lines.append(f"| {metric} | {row.unit} | {summary.n} | {figures} | {target} | {row.verdict()} |")
    return "\n".join(lines)


# ---- the machine ------------------------------------------------------------------------------------


def _first_line(command: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=10, check=False, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine(mosquitto: str | None, ha_version: str | None) -> dict[str, str]:
    """What the figures depend on, for the report's header."""
    commit = _first_line(["git", "rev-parse", "--short=12", "HEAD"])
    dirty = _first_line(["git", "status", "--porcelain", "--untracked-files=no", "--", "hasync"])
    return {
        "CPU": f"{_cpu_model()}, {os.cpu_count()} logical cores",
        "RAM": _ram(),
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": sys.version.split()[0],
        "Mosquitto": (_first_line([mosquitto, "-h"]).removeprefix("mosquitto version ")
                      if mosquitto else "not installed"),
        "amqtt": _version("amqtt"),
        "aiomqtt / paho-mqtt": f"{_version('aiomqtt')} / {_version('paho-mqtt')}",
        "Home Assistant (for the HA variant)": ha_version or "not installed",
        "git commit": commit + (" (hasync/ has uncommitted changes)" if dirty not in ("", "unknown") else ""),
    }


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


# ---- the report -------------------------------------------------------------------------------------


@dataclass
class Report:
    mode: str
    command: str
    machine: dict[str, str]
    timings: str
    started: datetime.datetime
    load_start: str
    load_end: str = ""
    seconds: float = 0.0
    results: list[Result] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)  # scenarios of the other mode
    extra_sections: list[tuple[str, str]] = field(default_factory=list)

    def failures(self) -> list[str]:
        return [f"{r.scenario}: {f}" for r in self.results for f in r.failures]

    def markdown(self) -> str:
        out: list[str] = ["# hasync benchmarks", ""]
        if self.mode == "quick":
            out += ["> **QUICK MODE**: few runs per scenario, short measurement windows, no Home Assistant.",
                    "> The figures show the shape, not a tight distribution; `./scripts/bench --full` is the",
                    "> run to publish.", ""]
        failures = self.failures()
        if failures:
            out += ["## ❌ FAILURES", ""] + [f"- **{f}**" for f in failures] + [""]
        if self.not_run:
            out += [f"Not run in this mode: {', '.join(self.not_run)}.", ""]
        out += [f"Generated by `{self.command}` on {self.started:%Y-%m-%d %H:%M} UTC, mode **{self.mode}**, "
                f"in {self.seconds / 60:.1f} min.", ""]
        out += ["## Machine", "", "| | |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in self.machine.items()]
        out += [f"| load average (1/5/15 min) at start | {self.load_start} |",
                f"| load average at end | {self.load_end} |", ""]
        out += ["The machine is shared: other jobs (test suites) may run at the same time, which shows in the",
                "tails (p95, max) more than in the medians. Times come from the agents' own event logs",
                "(`time.monotonic()`, one clock for every process on one Linux machine).", ""]
        out += ["## Timings", "", self.timings, ""]
        out += ["## Summary", "", "| scenario | metric | runs | median | p95 | target | verdict |",
                "|---|---|--:|--:|--:|---|---|"]
        for result in self.results:
            for row in result.rows:
                s = row.summary
                target = row.target.describe(row.unit) if row.target else "—"
                median = f"{fmt(s.median)} {row.unit}" if s else ""
                p95 = f"{fmt(s.p95)} {row.unit}" if s else ""
                out.append(f"| {result.scenario} | {row.metric} | {s.n if s else 0} | {median} | {p95} "
                           f"| {target} | {row.verdict()} |")
        out.append("")
        checked = [r for r in self.results if r.overlap is not None]
        if checked:
            out += ["## Two primaries at once?", "",
                    "For every run, the tenures of all agents (promotion → `acting_until` of the demotion, or the",
                    "instant of a `kill -9`) are computed with `hasync.audit` and intersected. Any overlap is a",
                    "failure.", "",
                    "| scenario | runs checked | runs with overlap | max overlap |", "|---|--:|--:|--:|"]
            for r in checked:
                assert r.overlap is not None
                runs, bad, worst = r.overlap
                flag = " ❌" if bad else ""
                out.append(f"| {r.scenario} | {runs} | {bad}{flag} | {worst * 1000:.1f} ms{flag} |")
            out.append("")
        for result in self.results:
            out += [f"## {result.scenario}: {result.title}", ""]
            if result.method:
                out += [result.method, ""]
            if result.rows:
                out += [table(result.rows), ""]
            if result.extra:
                out += [result.extra, ""]
            out += [f"- {n}" for n in result.notes]
            out += [f"- ❌ **{f}**" for f in result.failures]
            if result.seconds >= 0.5:
                out.append(f"- took {result.seconds:.0f} s")
            out.append("")
        for title, text in self.extra_sections:
            out += [f"## {title}", "", text, ""]
        return "\n".join(out)
