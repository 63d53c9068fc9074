"""``python -m bench [--quick|--full] [--only SCENARIO...] [--runs N] [--out BENCHMARKS.md]``

Runs the selected scenarios one after another and writes the report. Exits 1 if any scenario failed
(two primaries at once, or a scenario that could not finish), 0 otherwise; a missed target is only
reported. The work directory (agents' logs and events, broker logs) is removed unless something failed.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import shutil
import sys
import tempfile
import time
from pathlib import Path

from harness.brokers import mosquitto_binary
from harness.ha import HA_VERSION, ha_installed

from . import scenarios
from .analysis import ANALYSIS
from .cluster import timings_text
from .registry import SCENARIOS, Context
from .report import Report, Result, load_average, machine

REPRODUCE = """\
```sh
./scripts/bench --full                      # everything, about 40 min (installs Mosquitto and HA first)
./scripts/bench --quick                     # a few runs of each, a few minutes
./scripts/bench --only failover-kill-mosquitto footprint --runs 10 --out /tmp/B.md
./scripts/bench --only home-keepalived --runs 5 --out /tmp/B.md   # the two-node home against keepalived, ~12 min
./scripts/bench --only soak-fast --soak-seconds 3600 --out /tmp/B.md  # the fast profile's hour: false failovers
.venv/bin/python -m bench --list            # the scenarios
```

`--only` takes scenario names or shell patterns (`'failover-*'`); `--runs` overrides every scenario's
number of runs. Each scenario starts its own broker on a free port and its own agents (real
processes, `harness/agents.py`), so nothing on the machine needs to be stopped first. `home-keepalived`
needs root (network namespaces, iptables) and keepalived, which `./scripts/bench` installs without
starting a system one; without them it reports a placeholder row."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="few runs, short windows, no Home Assistant (the default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="at least 30 runs per failover fault, the Home Assistant variant, longer windows")
    parser.set_defaults(mode="quick")
    parser.add_argument("--only", nargs="+", metavar="SCENARIO", help="names or shell patterns")
    parser.add_argument("--runs", type=int, help="runs per scenario, overriding the mode's default")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="the report (BENCHMARKS.md)")
    parser.add_argument("--workdir", type=Path, help="keep logs and events here (default: a temporary dir)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--soak-seconds", type=float, default=3600.0,
                        help="how long a soak scenario runs (soak-fast; default an hour)")
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.soak_seconds <= 0:
        parser.error("--soak-seconds must be positive")
    return args


def select(mode: str, only: list[str] | None) -> list[str]:
    """Scenario names to run, in registry order: those of the mode, or those ``only`` names."""
    if not only:
        return [name for name, s in SCENARIOS.items() if mode in s.modes]
    unknown = [p for p in only if not any(fnmatch.fnmatchcase(n, p) for n in SCENARIOS)]
    if unknown:
        raise SystemExit(f"no scenario matches {', '.join(unknown)}; try --list")
    return [n for n in SCENARIOS if any(fnmatch.fnmatchcase(n, p) for p in only)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    assert scenarios.__all__  # the import registers the scenarios
    if args.list:
        for name, s in SCENARIOS.items():
            print(f"{name:32} {'/'.join(s.modes):11} {s.title}")
        return 0
    names = select(args.mode, args.only)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hasync-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.mode, workdir, args.runs, soak_seconds=args.soak_seconds)
    command = "./scripts/bench " + " ".join(sys.argv[1:] if argv is None else argv)
    report = Report(
        mode=args.mode,
        command=command.strip(),
        machine=machine(mosquitto_binary(), HA_VERSION if ha_installed() else None),
        timings=timings_text(),
        started=datetime.datetime.now(datetime.UTC),
        load_start=load_average(),
        not_run=[] if args.only else [n for n, s in SCENARIOS.items() if args.mode not in s.modes],
        extra_sections=[("What bounds the figures", ANALYSIS), ("How to reproduce", REPRODUCE)],
    )
    started = time.monotonic()
    ctx.log(f"mode {args.mode}: {', '.join(names)}; work directory {workdir}")
    try:
        for name in names:
            ctx.log(f"--- {name}")
            t0 = time.monotonic()
            try:
                result = SCENARIOS[name].run(ctx)
            except Exception as exc:  # one broken scenario must not lose the others' figures
                result = Result(name, SCENARIOS[name].title, failures=[f"crashed: {exc!r}"])
                ctx.log(f"{name} crashed: {exc!r}")
            result.seconds = result.seconds or time.monotonic() - t0
            report.results.append(result)
            # Written after every scenario: an interrupted run still leaves the figures so far.
            report.seconds = time.monotonic() - started
            report.load_end = load_average()
            args.out.write_text(report.markdown())
    finally:
        failed = bool(report.failures())
        if failed or args.workdir is not None:
            ctx.log(f"logs and events kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    ctx.log(f"wrote {args.out} in {(time.monotonic() - started) / 60:.1f} min")
    for failure in report.failures():
        ctx.log(f"FAILURE {failure}")
    for result in report.results:
        for row in result.missed():
            ctx.log(f"missed target: {result.scenario}: {row.metric}")
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
