"""Federation's lifecycle (hasync.federation.lifecycle): the debounce of registry reads and the removal grace.
Pure, the clock passed in; and the hub's parsing of configs it finds under its node id (hostile input)."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hasync.federation.export import Entry, Hub
from hasync.federation.lifecycle import Debounce, Retirements

HUB = Hub("hasync", "radios")


def test_a_burst_is_one_action_after_its_quiet_time() -> None:
    d = Debounce(0.5, 5.0)
    assert d.deadline is None and not d.due(100.0)
    for i in range(500):
        d.poke(100.0 + i * 0.004)  # 500 events in 2 s
        assert not d.due(100.0 + i * 0.004)
    assert d.deadline == pytest.approx(100.0 + 499 * 0.004 + 0.5)
    assert d.due(d.deadline)
    assert d.deadline is None and not d.due(200.0)  # one action for the burst


def test_a_steady_stream_is_still_acted_on_every_longest_seconds() -> None:
    d = Debounce(0.5, 5.0)
    actions = []
    for i in range(2000):  # an event every 0.1 s for 200 s
        now = i * 0.1
        d.poke(now)
        if d.due(now):
            actions.append(now)
    assert 35 <= len(actions) <= 41  # every 5 s (and the due instant is inside the stream)
    assert all(b - a <= 5.0 + 0.1 + 1e-9 for a, b in itertools.pairwise(actions))


def test_a_retry_is_due_without_a_poke() -> None:
    d = Debounce(0.5, 5.0)
    d.retry(10.0)
    assert d.deadline == 10.0 and not d.due(9.9) and d.due(10.0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0, 3.0), min_size=1, max_size=50))
def test_the_deadline_is_never_later_than_longest_after_the_first_poke(gaps: list[float]) -> None:
    d = Debounce(0.5, 5.0)
    now = first = 0.0
    for gap in gaps:
        now += gap
        if d.due(now):
            first = now
        if d.deadline is None:
            first = now
        d.poke(now)
        deadline = d.deadline
        assert deadline is not None and now < deadline <= first + 5.0 + 1e-9
        assert deadline <= now + 0.5 + 1e-9


def test_retiring_waits_the_grace_and_coming_back_cancels_it() -> None:
    r = Retirements(900.0)
    assert r.leave("a/config", "a/state", 0.0) and not r.leave("a/config", "a/state", 100.0)  # not postponed
    assert r.leave("b/config", "b/state", 10.0)
    assert r.due(899.0) == [] and r.deadline == 900.0 and len(r) == 2
    assert r.back("b/config") and not r.back("b/config") and "b/config" not in r
    [due] = r.due(900.0)
    assert (due.config_topic, due.state_topic) == ("a/config", "a/state")
    assert len(r) == 0 and r.deadline is None
    with pytest.raises(ValueError):
        Retirements(-1)


def test_config_topics_under_the_hub_s_node_id_and_nobody_else_s() -> None:
    topic = HUB.config_topic("light", "u" + "a" * 24)
    assert topic == "homeassistant/light/hasync_fed_radios/u" + "a" * 24 + "/config"
    assert HUB.parse_config_topic(topic) == ("light", "u" + "a" * 24)
    for other in ("homeassistant/light/hasync_fed_radio/uaaa/config", "homeassistant/light/hasync_fed_radios/uaaa",
                  "homeassistant/light/hasync_fed_radios/uaaa/config/x", "hass/light/hasync_fed_radios/uaaa/config",
                  "homeassistant/light/hasync_fed_radios/UAAA/config", "homeassistant/light/hasync_fed_radios//config",
                  "homeassistant/li-ght/hasync_fed_radios/u/config"):
        assert HUB.parse_config_topic(other) is None, other
    assert HUB.configs_filter == "homeassistant/+/hasync_fed_radios/+/config"


def test_only_a_config_whose_unique_id_is_the_hub_s_own_is_its_own() -> None:
    assert HUB.owns_config("uaaa", json.dumps({"unique_id": "hasync_fed_radios_uaaa"}).encode())
    for payload in (b"", b"null", b"[]", b"{", json.dumps({"unique_id": "hasync_fed_radios_ubbb"}).encode(),
                    json.dumps({"unique_id": "hasync_fed_other_uaaa"}).encode(),
                    b'{"unique_id": "hasync_fed_radios_uaaa", "x": "' + b"y" * 70_000 + b'"}'):
        assert not HUB.owns_config("uaaa", payload), payload[:60]


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=120), st.binary(max_size=300))
def test_whatever_arrives_under_the_prefix_never_raises(topic: str, payload: bytes) -> None:
    parsed = HUB.parse_config_topic(topic)
    if parsed is not None:
        assert HUB.config_topic(*parsed) == topic
        HUB.owns_config(parsed[1], payload)


def test_the_self_check_counts_mqtt_copies_of_the_hub_s_own_exports_only() -> None:
    entries = {e.entity_id: e for e in (
        Entry("switch.radios_ac", platform="mqtt", unique_id="hasync_fed_radios_uaaa"),
        Entry("switch.cams_door", platform="mqtt", unique_id="hasync_fed_cams_ubbb"),  # another hub's: fine
        Entry("switch.zigbee", platform="mqtt", unique_id="0x00158d"),
        Entry("switch.ac", platform="demo", unique_id="hasync_fed_radios_uccc"))}
    assert HUB.self_imported(entries) == ["switch.radios_ac"]
