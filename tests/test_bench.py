"""The benchmark harness (``bench/``): its statistics and tables, and a tiny quick run end to end so the
benchmarks cannot rot unnoticed."""

from __future__ import annotations

import datetime
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.brokers import mosquitto_binary

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) leaves the repository root out
    sys.path.insert(0, str(ROOT))

from bench.home import holders_table, outage_table, verdicts  # noqa: E402
from bench.merge import merge as merge_reports  # noqa: E402
from bench.merge import parse as parse_report  # noqa: E402
from bench.registry import SCENARIOS, Context  # noqa: E402
from bench.report import Report, Result, Row, Target, fmt, table  # noqa: E402
from bench.stats import Summary, percentile  # noqa: E402
from harness.home import Fault, Sample  # noqa: E402
from harness.timeline import Doubles  # noqa: E402


def test_percentile_interpolates_linearly_between_ranks() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, 1, 3, 2], 0) == 1
    assert percentile([4, 1, 3, 2], 100) == 4
    assert percentile(list(range(1, 101)), 95) == pytest.approx(95.05)
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([7.0], 95) == 7.0


def test_percentile_rejects_nothing_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="within 0-100"):
        percentile([1], 101)


def test_summary_and_targets() -> None:
    s = Summary.of([10, 20, 30, 40, 50])
    assert (s.n, s.min, s.median, s.max) == (5, 10, 30, 50)
    assert s.p95 == pytest.approx(48)
    assert Target("median", 30).met(s)
    assert not Target("p95", 40).met(s)
    assert Target("median", 25, at_least=True).met(s)
    assert Target("max", 60).describe("ms") == "max ≤ 60 ms"


def test_table_shows_distribution_target_and_verdict() -> None:
    rows = [
        Row("failover", "ms", [100, 200, 300], Target("median", 300)),
        Row("handover", "ms", [60, 70, 80], Target("median", 50)),
        Row("plain", "msg/s", [5000.0]),
        Row("sync", "ms", pending="pending: state sync"),
    ]
    lines = table(rows).splitlines()
    assert lines[0].startswith("| metric | unit | runs | min | median | p95 | p99 | max | target | verdict |")
    assert lines[2] == "| failover | ms | 3 | 100 | 200 | 290 | 298 | 300 | median ≤ 300 ms | met |"
    assert lines[3].endswith("| median ≤ 50 ms | **MISSED** |")
    assert lines[4].endswith("| — | (no target) |")
    assert lines[5].endswith("| pending: state sync |")
    assert [fmt(v) for v in (0.0123, 1.5, 12.34, 1234.5, 3.0)] == ["0.012", "1.50", "12.3", "1,234", "3"]


def test_runs_override_and_registry(tmp_path: Path) -> None:
    assert Context("quick", tmp_path).runs(5, 30) == 5
    assert Context("full", tmp_path).runs(5, 30) == 30
    assert Context("full", tmp_path, runs_override=2).runs(5, 30) == 2
    import bench.scenarios  # registers them

    assert bench.scenarios.__all__
    for name in ("failover-kill-mosquitto", "failover-stop-amqtt", "handover-command-mosquitto",
                 "broker-restart-amqtt", "footprint", "mqtt-baseline-mosquitto", "failover-kill-ha", "sync-mosquitto",
                 "sync-amqtt", "sync-ha", "footprint-load", "federation-ha"):
        assert name in SCENARIOS
    assert SCENARIOS["failover-kill-ha"].modes == SCENARIOS["federation-ha"].modes == ("full",)
    assert not [name for name in SCENARIOS if "pending" in name]


def test_federation_without_home_assistant_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import federation

    monkeypatch.setattr(federation, "ha_installed", lambda: False)
    result = federation.federation_ha(Context("full", tmp_path))
    assert result.rows and not result.failures
    assert all("Home Assistant not installed" in (row.pending or "") for row in result.rows)


def test_federation_reads_mains_state_events_as_they_come() -> None:
    from bench.federation import Arrivals

    def changed(entity_id: str, old: str | None, new: str, at: str) -> dict[str, object]:
        return {"time_fired": f"2026-12-03T04:00:0{at}+00:00",
                "data": {"entity_id": entity_id, "old_state": None if old is None else {"state": old},
                         "new_state": {"state": new, "last_changed": f"2026-12-03T04:00:0{at}+00:00"}}}

    subscription = SimpleNamespace(events=[changed("switch.a", None, "unavailable", "1"),
                                           changed("switch.other", None, "off", "2"),
                                           changed("switch.a", "unavailable", "off", "3")])
    arrivals = Arrivals(frozenset({"switch.a", "switch.b"}), "off")
    assert not arrivals.read(subscription)  # type: ignore[arg-type]
    assert arrivals.created == {"switch.a": 1796270401.0} and arrivals.held == {"switch.a": 1796270403.0}
    subscription.events.append(changed("switch.b", None, "off", "4"))
    assert arrivals.read(subscription)  # type: ignore[arg-type]
    assert arrivals.held["switch.b"] == 1796270404.0 and arrivals.start == 4


@pytest.mark.integration
@pytest.mark.mosquitto
@pytest.mark.timeout(300)
def test_quick_benchmark_end_to_end(tmp_path: Path) -> None:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    out = tmp_path / "B.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--runs", "2", "--only", "failover-kill-mosquitto", "footprint",
         "sync-mosquitto", "--out", str(out), "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=280, check=False,
    )
    assert done.returncode == 0, done.stderr[-6000:]
    report = out.read_text()
    assert "QUICK MODE" in report
    assert "FAILURES" not in report
    for heading in ("## Machine", "## Timings", "## Summary", "## Two primaries at once?", "## How to reproduce"):
        assert heading in report
    assert re.search(r"\| CPU \| .+ logical cores \|", report)
    number = r"[\d,.]+"
    assert re.search(rf"\| kill -9 → new primary confirmed \| ms \| 2 \| {number} \| {number} \|", report)
    for metric in ("RSS, primary", "RSS, standby", "CPU, primary", "CPU, standby"):
        assert re.search(rf"\| {metric} \| (MiB|%) \| \d+ \| {number} \| {number} \|", report), metric
    assert "| failover-kill-mosquitto | 2 | 0 | 0.0 ms |" in report  # zero overlap in both runs
    for metric in ("latency at 1,000 updates/s", "max sustained updates/s", "snapshot of 10,000 entities"):
        assert re.search(rf"\| {metric}[^|]* \| [a-z/]+ \| \d+ \| {number} \| {number} \|", report), metric
    assert "pending: state sync" not in report


def test_the_fast_profile_scenarios_and_the_soak_are_registered_and_the_soak_runs_only_when_named() -> None:
    import bench.scenarios  # registers them
    from bench.__main__ import select

    assert bench.scenarios.__all__
    for name in ("failover-stop-mosquitto-fast", "failover-cut-mosquitto-fast", "failover-cut-mosquitto",
                 "footprint-fast"):
        assert SCENARIOS[name].modes == ("quick", "full"), name
    for soak in ("soak-fast", "soak-default"):
        assert soak not in select("full", None) and soak not in select("quick", None)
    assert select("quick", ["soak-fast"]) == ["soak-fast"]


def test_histogram_quantiles_interpolate_within_buckets() -> None:
    from bench.soak import histogram_quantile

    cumulative = {0.0: 0.0, 0.1: 10.0, 0.2: 30.0, 0.4: 100.0, math.inf: 100.0}
    assert histogram_quantile(cumulative, 0.05) == pytest.approx(0.05)
    assert histogram_quantile(cumulative, 0.2) == pytest.approx(0.15)
    assert histogram_quantile(cumulative, 0.65) == pytest.approx(0.3)
    assert histogram_quantile({0.0: 3.0, 0.1: 3.0, math.inf: 3.0}, 0.01) == 0.0  # all at or below the first bound
    with pytest.raises(ValueError):
        histogram_quantile({0.1: 0.0, math.inf: 0.0}, 0.5)


def test_footprint_counts_each_message_for_the_node_that_published_it() -> None:
    from bench.footprint import publisher
    from hasync.topics import Topics

    t = Topics("bench1", "test")
    assert [publisher(t, topic, "n1") for topic in (
        t.lease, t.leader, t.heartbeat("n2"), t.primary_state("n3"), t.sync_marker("n2"), t.entity("light.a"),
        "elsewhere/x")] == ["n1", "n1", "n2", "n3", "n2", "n1", None]


def home_sample(system: str, fault: str, *, http: float = 0.0, dns: float = 0.0, holders: float = 0.0,
                dhcp_twice: int = 0) -> Sample:
    six = system != "keepalived"
    probes = {"http": http, "dns": dns, "dhcp": 0.0, **({"http6": http} if six else {})}
    families = ("ipv4", "ipv6") if six else ("ipv4",)
    return Sample(system=system, fault=Fault(fault), at=0.0, old="n1", new="n2", failover=0.05, lifted=1.2,
                  outage=probes, restore_outage=dict.fromkeys(probes, 0.0),
                  two_holders=dict.fromkeys(families, holders), two_dhcp=Doubles(dhcp_twice, 0.2 * dhcp_twice),
                  both_answered=0.0,
                  moved=dict.fromkeys(families, 0.03), final="n2")


def test_the_home_verdicts_hold_every_probe_and_double_holder_to_the_issues_targets() -> None:
    keepalived = [home_sample("keepalived", "kill", dns=0.1, holders=1.0, dhcp_twice=10)]
    ours = [home_sample("hasync-fenced", "kill", dns=0.1, holders=1.8, dhcp_twice=15)]
    target, verdict = verdicts(Fault.KILL, ours, keepalived)
    assert "HTTP IPv4 met" in verdict and "DNS **MISSED**" in verdict  # 0 / 0 is met, 0.1 / 0.1 is not ≤ 0.1
    assert "HTTP IPv6" not in target  # keepalived moves no IPv6 address: nothing to compare
    assert "two holders" not in target  # a target of STOP and LINK only

    stopped = [home_sample("keepalived", "stop", holders=1.0, dhcp_twice=10)]
    frozen = [home_sample("hasync-fenced", "stop", holders=1.0, dhcp_twice=0)]
    _, verdict = verdicts(Fault.STOP, frozen, stopped)
    assert "two holders **MISSED**" in verdict and "two DHCP servers met" in verdict

    samples = {("hasync-fenced", Fault.KILL): ours, ("keepalived", Fault.KILL): keepalived}
    outages, holders = outage_table(samples), holders_table(samples)
    assert outages.count("| kill:") == 2 and "| keepalived | 1 | 0 / 0 / 0 | n/a | 100 / 100 / 100 |" in outages
    assert "| kill | hasync, fenced | 1,800 / 1,800 / 1,800 | 1,800 / 1,800 / 1,800 | 1/1 runs, 15 exchanges" in holders


def _report(command: str, results: list[Result]) -> str:
    report = Report(mode="full", command=command, machine={"CPU": "test"}, timings="the timings",
                    started=datetime.datetime(2026, 12, 3, 9, 0, tzinfo=datetime.UTC), load_start="0.1 / 0.2 / 0.3",
                    extra_sections=[("How to reproduce", "run it")])
    report.results = results
    report.load_end = "1.0 / 1.0 / 1.0"
    report.seconds = 120
    return report.markdown()


def test_merged_reports_keep_every_run_s_scenarios_and_the_last_of_a_repeated_one(tmp_path: Path) -> None:
    one, two = tmp_path / "one.md", tmp_path / "two.md"
    one.write_text(_report("./scripts/bench --full --only a b", [
        Result("a", "scenario a", rows=[Row("latency", "ms", [1.0, 2.0], Target("median", 5))], overlap=(3, 0, 0.0)),
        Result("b", "scenario b (old)", rows=[Row("rate", "/s", [10.0])])]))
    two.write_text(_report("./scripts/bench --full --only b", [
        Result("b", "scenario b (new)", rows=[Row("rate", "/s", [20.0], Target("median", 15, at_least=True))])]))
    hand = tmp_path / "BENCHMARKS.md"
    hand.write_text("# hasync benchmarks\n\n## Signing cost (by hand)\n\nmeasured on 2026-12-02\n")
    merged = merge_reports([parse_report(p) for p in (one, hand, two)])
    assert "`./scripts/bench --full --only a b`: 2026-12-03 09:00 UTC, mode **full**, 2.0 min" in merged
    assert "`./scripts/bench --full --only b`" in merged and "`BENCHMARKS.md`: sections carried over" in merged
    headings = [line for line in merged.splitlines() if line.startswith("## ")]
    assert headings == ["## Machine", "## Timings", "## Summary", "## Two primaries at once?", "## a: scenario a",
                        "## b: scenario b (new)", "## Signing cost (by hand)", "## How to reproduce"]
    summary = merged.split("## Summary")[1].split("##")[0]
    assert "| a | latency | 2 | 1.50 ms" in summary and "| b | rate | 1 | 20 /s" in summary and "| 10 /s" not in summary
    assert "| a | 3 | 0 | 0.0 ms |" in merged and "measured on 2026-12-02" in merged
