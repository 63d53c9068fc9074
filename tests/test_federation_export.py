"""Federation's export (hasync.federation.export): selection, identity, loops and main's discovery message.
Pure; registries shaped as Home Assistant's WebSocket API lists them."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from hasync.federation.export import (
    Area,
    Device,
    Entry,
    Exported,
    Hub,
    Rules,
    Selection,
    discovery_message,
    exportable,
    parse_registries,
    select,
    uid,
)

HUB = Hub("hasync", "radios", agent_version="0.1.0")
KITCHEN, HALL = Area("kitchen", "Kitchen"), Area("hall", "Hall")
STICK = Device("d1e5", "Kitchen lights", manufacturer="Signify", model="LCT015", sw_version="1.50", area_id="kitchen",
               key="dhue00178801")
ENTITIES = {
    "light.kitchen": Entry("light.kitchen", "a1b2", "hue", "00:17:88:01-0b", device_id="d1e5"),
    "light.hall": Entry("light.hall", "c3d4", "hue", area_id="hall"),
    "sensor.kitchen_temperature": Entry("sensor.kitchen_temperature", "e5f6", "zha", device_id="d1e5"),
    "switch.copy_of_main": Entry("switch.copy_of_main", "0a0b", "mqtt"),
    "lock.front_door": Entry("lock.front_door", "0c0d", "zwave_js", area_id="hall"),
    "lock.shed": Entry("lock.shed", "0e0f", "zwave_js", disabled=True),
    "media_player.tv": Entry("media_player.tv", "1a1b", "cast"),
}
DEVICES = {"d1e5": STICK}
AREAS = {"kitchen": KITCHEN, "hall": HALL}


def exported(selection: Selection) -> set[str]:
    return set(select(ENTITIES, DEVICES, AREAS, selection))


def test_nothing_is_exported_unless_included() -> None:
    assert exported(Selection()) == set()


def test_the_more_specific_rule_wins() -> None:
    everything = Rules(domains=frozenset({"light", "sensor", "switch", "lock", "media_player"}))
    assert exported(Selection(include=everything)) == {"light.kitchen", "light.hall", "sensor.kitchen_temperature",
                                                       "lock.front_door"}
    by_area = Selection(include=Rules(areas=frozenset({"Kitchen"})))  # the device's area counts for its entities
    assert exported(by_area) == {"light.kitchen", "sensor.kitchen_temperature"}
    by_device = Selection(include=Rules(devices=frozenset({"d1e5"})), exclude=Rules(entity_globs=("sensor.*",)))
    assert exported(by_device) == {"light.kitchen"}
    back = Selection(include=Rules(entities=frozenset({"sensor.kitchen_temperature"})),
                     exclude=Rules(devices=frozenset({"Kitchen lights"})))
    assert exported(back) == {"sensor.kitchen_temperature"}  # an entity beats its device
    area_vs_domain = Selection(include=Rules(domains=frozenset({"light", "lock"})),
                               exclude=Rules(areas=frozenset({"hall"})))
    assert exported(area_vs_domain) == {"light.kitchen"}


def test_mqtt_entities_disabled_ones_and_uncarried_domains_are_never_exported() -> None:
    assert exportable(ENTITIES["switch.copy_of_main"]) == "it came from MQTT (mqtt): exporting it would loop"
    assert exportable(ENTITIES["lock.shed"]) == "it is disabled on the hub"
    assert "cannot be carried" in (exportable(ENTITIES["media_player.tv"]) or "")
    named = Selection(include=Rules(entities=frozenset(ENTITIES)))
    assert exported(named) == {"light.kitchen", "light.hall", "sensor.kitchen_temperature", "lock.front_door"}


def test_identity_survives_a_rename_on_the_hub_and_is_never_the_source_identifier() -> None:
    before = Exported(ENTITIES["light.kitchen"], STICK, KITCHEN, KITCHEN)
    after = Exported(Entry("light.kitchen_ceiling", "a1b2", "hue", "00:17:88:01-0b", device_id="d1e5"), STICK,
                     KITCHEN, KITCHEN)
    # The other node of a pair: its own registry ids, the same integration's unique id.
    pair = Exported(Entry("light.kitchen", "ffff", "hue", "00:17:88:01-0b", device_id="d9"), STICK, KITCHEN,
                    KITCHEN)
    assert uid(before.entry) == uid(after.entry) == uid(pair.entry) != uid(Entry("light.x", "a1b2", "hue", "other"))
    topic1, config1 = discovery_message(HUB, before, "on", {"supported_color_modes": ["brightness"]})  # type: ignore[misc]
    topic2, config2 = discovery_message(HUB, after, "on", {"supported_color_modes": ["brightness"]})  # type: ignore[misc]
    assert topic1 == topic2 == f"homeassistant/light/hasync_fed_radios/{uid(before.entry)}/config"
    assert config1["unique_id"] == config2["unique_id"] and config1["command_topic"] == config2["command_topic"]
    assert config1["device"]["identifiers"] == ["hasync_fed_radios_dhue00178801"]
    assert uid(Entry("sensor.no_registry")) == uid(Entry("sensor.no_registry")) != uid(Entry("sensor.other"))


def test_the_discovery_message_carries_the_device_area_availability_and_origin() -> None:
    entity = Exported(ENTITIES["sensor.kitchen_temperature"], STICK, KITCHEN, KITCHEN)
    message = discovery_message(HUB, entity, "21.5", {"unit_of_measurement": "°C", "device_class": "temperature",
                                                     "friendly_name": "Kitchen lights Temperature"})
    assert message is not None
    topic, config = message
    assert topic == f"homeassistant/sensor/hasync_fed_radios/{uid(entity.entry)}/config"
    assert config["device"] == {"identifiers": ["hasync_fed_radios_dhue00178801"], "name": "Kitchen lights",
                                "via_device": "hasync_fed_radios", "manufacturer": "Signify", "model": "LCT015",
                                "sw_version": "1.50", "suggested_area": "Kitchen"}
    assert config["availability_mode"] == "all"
    assert [a["topic"] for a in config["availability"]] == ["hasync/radios/fed/status",
                                                             "hasync/radios/fed/e5f6/state"]
    assert config["origin"]["name"] == "hasync" and config["unit_of_measurement"] == "°C"
    assert config["object_id"] == "radios_kitchen_temperature"
    assert config["name"] is None  # an entity of its device: main shows the device's name (no double naming)
    hall = discovery_message(HUB, Exported(ENTITIES["light.hall"], None, HALL), "off",
                             {"friendly_name": "Hall light", "supported_color_modes": ["onoff"]})
    assert hall is not None and hall[1]["name"] == "Hall light"
    assert hall[1]["device"]["identifiers"] == ["hasync_fed_radios"]  # no device on the hub: the hub's


def test_registries_are_read_leniently() -> None:
    entries, devices, areas = parse_registries(
        [{"entity_id": "light.kitchen", "id": "A1B2", "platform": "hue", "device_id": "d1e5", "name": None,
          "unique_id": "00:17:88:01-0b",
          "original_name": "Ceiling", "disabled_by": None, "new_field_from_a_newer_ha": 1},
         {"entity_id": "switch.x", "disabled_by": "user"}, {"entity_id": 5}, "junk", {"no": "id"}],
        [{"id": "d1e5", "name": "Kitchen lights", "name_by_user": "Ceiling lamp", "area_id": "kitchen",
          "identifiers": [["hue", "00:17:88:01"]]}, {"id": "d2", "name": "Other", "identifiers": []}, 3],
        [{"area_id": "kitchen", "name": "Kitchen"}, {"name": "no id"}],
    )
    assert set(entries) == {"light.kitchen", "switch.x"}
    assert entries["light.kitchen"].original_name == "Ceiling" and entries["switch.x"].disabled
    assert uid(entries["light.kitchen"]) == uid(Entry("light.renamed", "other-id", "hue", "00:17:88:01-0b"))
    assert devices["d1e5"].name == "Ceiling lamp" and areas == {"kitchen": KITCHEN}
    assert devices["d1e5"].identity.startswith("d") and devices["d1e5"].identity != devices["d2"].identity
    assert parse_registries(None, {"not": "a list"}, "x") == ({}, {}, {})


_ANY = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["entity_id", "id", "platform", "device_id", "area_id", "name",
                                         "disabled_by", "name_by_user", "x"]), inner, max_size=6), max_leaves=20)


@settings(max_examples=500, deadline=None)
@given(entities=_ANY, devices=_ANY, areas=_ANY)
def test_no_registry_listing_makes_the_hub_raise(entities: Any, devices: Any, areas: Any) -> None:
    entries, device_map, area_map = parse_registries(entities, devices, areas)
    everything = Rules(domains=frozenset({"light", "switch", "sensor"}), areas=frozenset(area_map))
    for item in select(entries, device_map, area_map, Selection(include=everything)).values():
        discovery_message(HUB, item, "on", {})


def test_entities_without_a_registry_entry_are_exported_only_when_named() -> None:
    states = ["lock.front_door", "lock.shed", "light.kitchen", "media_player.tv"]
    by_domain = select(ENTITIES, DEVICES, AREAS, Selection(include=Rules(domains=frozenset({"lock"}))), states)
    assert "lock.front_door" in by_domain and "lock.shed" not in by_domain  # registered (shed: disabled)
    plain = {"lock.garage": Entry("lock.garage")}
    assert select({}, {}, {}, Selection(include=Rules(domains=frozenset({"lock"}))), plain) == {}
    named = select({}, {}, {}, Selection(include=Rules(entity_globs=("lock.*",)),
                                         exclude=Rules(entities=frozenset({"lock.back"}))),
                   ["lock.garage", "lock.back", "media_player.tv"])
    assert set(named) == {"lock.garage"} and uid(named["lock.garage"].entry).startswith("e")
