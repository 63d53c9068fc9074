"""Selection and throttling of mirrored entities (hasync.sync.selection): pure, fast."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hasync.config import AgentConfig, ConfigError, load_config
from hasync.sync.selection import DEFAULT_DOMAINS, Selector, Throttle, ThrottleRule


def test_the_default_selects_helpers_only() -> None:
    s = Selector()
    for domain in DEFAULT_DOMAINS:
        assert s(f"{domain}.x")
    for entity in ("light.kitchen", "sensor.temperature", "automation.water", "binary_sensor.hasync_x_primary"):
        assert not s(entity)


@pytest.mark.parametrize(
    ("entity", "selected"),
    [
        ("input_boolean.secret", False),  # exclude.entities beats everything
        ("sensor.kitchen_power", True),  # include.entities beats exclude.entity_globs
        ("sensor.garage_power", False),  # exclude.entity_globs beats include.entity_globs
        ("sensor.hall_power", True),  # include.entity_globs beats exclude.domains
        ("sensor.hall_humidity", False),  # exclude.domains
        ("light.any", True),  # include.domains
        ("input_boolean.guests", True),
        ("switch.any", False),  # nothing matches
    ],
)
def test_the_more_specific_rule_wins(entity: str, selected: bool) -> None:
    s = Selector(
        include_domains=frozenset({"light", "input_boolean"}),
        include_entities=frozenset({"sensor.kitchen_power"}),
        include_globs=("sensor.*_power",),
        exclude_domains=frozenset({"sensor"}),
        exclude_entities=frozenset({"input_boolean.secret"}),
        exclude_globs=("sensor.garage_*", "sensor.kitchen_*"),
    )
    assert s(entity) is selected


def test_selection_from_the_config() -> None:
    cfg = AgentConfig.model_validate({"sync": {
        "include": {"domains": ["light"], "entity_globs": ["sensor.*_temperature"]},
        "exclude": {"entities": ["light.porch"]},
    }})
    s = cfg.sync.selector()
    assert s("light.kitchen") and s("sensor.hall_temperature")
    assert not s("light.porch") and not s("input_boolean.x")  # a configured include replaces the defaults


@pytest.mark.parametrize(
    ("sync", "message"),
    [
        ({"include": {"domains": ["Input_Boolean"]}}, "sync.include.domains: not domains"),
        ({"exclude": {"entities": ["light"]}}, "sync.exclude.entities: not entity ids"),
        ({"include": {"entity_globs": ["sensor/*"]}}, "sync.include.entity_globs: not entity globs"),
        ({"throttle": [{"entity_globs": ["sensor.*"]}]}, "needs min_interval or deadband"),
        ({"throttle": [{"entity_globs": [], "deadband": 1}]}, "sync.throttle.0.entity_globs"),
        ({"throttle": [{"entity_globs": ["sensor.*"], "deadband": -1}]}, "sync.throttle.0.deadband"),
        ({"backend": "redis"}, "sync.backend"),
        ({"max_entities": 0}, "sync.max_entities"),
        ({"includes": {}}, "sync.includes: Extra inputs are not permitted"),
    ],
)
def test_bad_sync_config_names_the_key(tmp_path: Path, sync: dict[str, object], message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"node_id": "a", "sync": sync}))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(path, env={})


# ---- throttle -----------------------------------------------------------------------------------


def test_no_rules_passes_everything() -> None:
    t = Throttle()
    assert all(t.offer("sensor.x", (str(i), {}), 0.0) for i in range(5))


def test_min_interval_holds_back_and_releases_the_newest_value() -> None:
    t = Throttle([ThrottleRule(("sensor.*",), min_interval=10)])
    assert t.offer("sensor.power", ("1", {}), 0.0)
    assert not t.offer("sensor.power", ("2", {}), 1.0)
    assert not t.offer("sensor.power", ("3", {}), 2.0)
    assert t.next_due() == 10.0
    assert t.due(9.9) == []
    assert t.due(10.0) == [("sensor.power", ("3", {}))]
    assert t.due(30.0) == []  # released once
    assert t.offer("sensor.power", ("4", {}), 30.0)  # the interval since the last release has passed
    assert t.offer("light.x", ("on", {}), 30.0)  # no rule matches


def test_deadband_drops_small_numeric_changes_from_the_value_passed_on() -> None:
    t = Throttle([ThrottleRule(("sensor.*",), deadband=0.5)])
    assert t.offer("sensor.t", ("20.0", {}), 0.0)
    assert not t.offer("sensor.t", ("20.3", {}), 1.0)
    assert not t.offer("sensor.t", ("19.6", {}), 2.0)  # measured from 20.0, not from 20.3
    assert t.offer("sensor.t", ("20.5", {}), 3.0)
    assert t.offer("sensor.t", ("20.6", {"unit": "C"}), 4.0)  # attributes changed: passed on
    assert t.offer("sensor.t", ("unavailable", {"unit": "C"}), 5.0)  # not a number
    assert t.due(math.inf) == []


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.tuples(st.floats(0, 5), st.integers(0, 30)), min_size=1, max_size=40),
    interval=st.sampled_from([0.0, 1.0, 3.0]),
    deadband=st.sampled_from([0.0, 2.0]),
)
def test_the_bus_ends_near_the_newest_value(steps: list[tuple[float, int]], interval: float, deadband: float) -> None:
    """Whatever the timing, once the last held value falls due, what was passed on last is the newest value,
    or within the deadband of it."""
    if interval == 0 and deadband == 0:
        interval = 1.0
    t = Throttle([ThrottleRule(("sensor.*",), min_interval=interval, deadband=deadband)])
    now = 0.0
    last_passed: float | None = None
    for gap, value in steps:
        now += gap
        for _, (state, _) in t.due(now):
            last_passed = float(state)
        if t.offer("sensor.x", (str(value), {}), now):
            last_passed = float(value)
    for _, (state, _) in t.due(now + interval):
        last_passed = float(state)
    newest = float(steps[-1][1])
    assert last_passed is not None
    assert abs(last_passed - newest) < max(deadband, 1e-9) or last_passed == newest
