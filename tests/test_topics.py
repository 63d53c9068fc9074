"""The topic layout: built strings, parse() of every kind, rejection of everything else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hasync.topics import ParsedTopic, TopicKind, Topics, validate_prefix, validate_segment

SEGMENT = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
PREFIX = st.lists(SEGMENT, min_size=1, max_size=4).map("/".join)

HOME = Topics("hasync", "home")



# ---- layout -------------------------------------------------------------------------------------


def test_layout_strings() -> None:
    assert HOME.base == "hasync/home"
    assert HOME.lease == "hasync/home/lease"
    assert HOME.leader == "hasync/home/leader"
    assert HOME.all_heartbeats == "hasync/home/nodes/+"
    assert HOME.heartbeat("ha-1") == "hasync/home/nodes/ha-1"
    assert HOME.command("ha-1") == "hasync/home/nodes/ha-1/command"


def test_layout_with_a_multi_segment_prefix() -> None:
    topics = Topics("site/a/b/c", "c_2")
    assert topics.lease == "site/a/b/c/c_2/lease"
    assert topics.command("N") == "site/a/b/c/c_2/nodes/N/command"


@pytest.mark.parametrize("node", ["", "a b", "a/b", "+", "#", "a.b", "x" * 65])
def test_building_a_topic_for_an_invalid_node_raises(node: str) -> None:
    with pytest.raises(ValueError, match="node id"):
        HOME.heartbeat(node)
    with pytest.raises(ValueError, match="node id"):
        HOME.command(node)


@pytest.mark.parametrize(
    ("prefix", "cluster", "message"),
    [
        ("", "home", "topic prefix ''"),
        ("a/", "home", "topic prefix 'a/'"),
        ("hasync", "a/b", "cluster name 'a/b'"),
        ("hasync", "", "cluster name ''"),
    ],
)
def test_topics_validate_prefix_and_cluster(prefix: str, cluster: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Topics(prefix, cluster)


# ---- parse --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("hasync/home/lease", ParsedTopic(TopicKind.LEASE)),
        ("hasync/home/leader", ParsedTopic(TopicKind.LEADER)),
        ("hasync/home/nodes/ha-1", ParsedTopic(TopicKind.HEARTBEAT, "ha-1")),
        ("hasync/home/nodes/ha-1/command", ParsedTopic(TopicKind.COMMAND, "ha-1")),
        # node ids that look like the fixed words are still node ids
        ("hasync/home/nodes/command", ParsedTopic(TopicKind.HEARTBEAT, "command")),
        ("hasync/home/nodes/lease/command", ParsedTopic(TopicKind.COMMAND, "lease")),
    ],
)
def test_parse_each_kind(topic: str, expected: ParsedTopic) -> None:
    assert HOME.parse(topic) == expected


@pytest.mark.parametrize(
    "topic",
    [
        # foreign topics, other clusters and prefixes
        "homeassistant/status",
        "other/home/lease",
        "hasync/office/lease",
        "hasync/homes/lease",
        "hasync/hom/lease",
        "x/hasync/home/lease",
        "hasync/home",
        "hasync/home/",
        "HASYNC/home/lease",
        # wrong segment counts
        "hasync/home/lease/extra",
        "hasync/home/leader/",
        "hasync/home/nodes",
        "hasync/home/nodes/",
        "hasync/home/nodes/ha-1/",
        "hasync/home/nodes/ha-1/command/extra",
        "hasync/home/nodes/ha-1/other",
        "hasync/home/nodes//command",
        "hasync/home/unknown",
        # invalid node segments
        "hasync/home/nodes/a.b",
        "hasync/home/nodes/a b",
        "hasync/home/nodes/" + "x" * 65,
        "hasync/home/nodes/\u00e4",
        # wildcards are filters, never topics of a message
        "hasync/home/nodes/+",
        "hasync/home/nodes/+/command",
        "hasync/home/#",
        "hasync/home/+",
        "hasync/+/lease",
        "#",
    ],
)
def test_parse_returns_none_for_anything_else(topic: str) -> None:
    assert HOME.parse(topic) is None


def test_parse_with_a_multi_segment_prefix() -> None:
    topics = Topics("site/ha", "home")
    assert topics.parse("site/ha/home/lease") == ParsedTopic(TopicKind.LEASE)
    assert topics.parse("hasync/home/lease") is None
    assert topics.parse("ha/home/lease") is None


def test_parse_rejects_a_node_segment_with_a_trailing_newline() -> None:
    assert HOME.parse("hasync/home/nodes/ha-1\n") is None


# ---- validate_segment / validate_prefix ---------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "A-z_09", "x" * 64, "-", "_"])
def test_validate_segment_accepts(value: str) -> None:
    assert validate_segment(value, "node id") == value


@pytest.mark.parametrize("value", ["", "x" * 65, "a b", "a/b", "a.b", "+", "#", "\u00e4", " a", "a\tb"])
def test_validate_segment_rejects_with_the_name_of_the_thing(value: str) -> None:
    with pytest.raises(ValueError, match=r"^cluster name .* must be 1-64 characters of A-Z") as info:
        validate_segment(value, "cluster name")
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", ["hasync", "a/b", "a/b/c/d", "site-1/ha_2", "/".join(["x" * 64] * 4)])
def test_validate_prefix_accepts(value: str) -> None:
    assert validate_prefix(value) == value


@pytest.mark.parametrize("value", ["", "/", "/a", "a/", "a//b", "a/b/c/d/e", "a/+", "#", "a b", "x" * 65, "a/b.c"])
def test_validate_prefix_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="must be 1-4 '/'-separated segments") as info:
        validate_prefix(value)
    assert repr(value) in str(info.value)


def test_validate_segment_rejects_a_trailing_newline() -> None:
    with pytest.raises(ValueError, match="node id"):
        validate_segment("ha-1\n", "node id")


def test_validate_prefix_rejects_a_trailing_newline() -> None:
    with pytest.raises(ValueError, match="topic prefix"):
        validate_prefix("hasync\n")


# ---- properties ---------------------------------------------------------------------------------


@given(prefix=PREFIX, cluster=SEGMENT, node=SEGMENT)
def test_built_topics_parse_back_to_their_kind_and_node(prefix: str, cluster: str, node: str) -> None:
    topics = Topics(prefix, cluster)
    assert topics.parse(topics.lease) == ParsedTopic(TopicKind.LEASE)
    assert topics.parse(topics.leader) == ParsedTopic(TopicKind.LEADER)
    assert topics.parse(topics.heartbeat(node)) == ParsedTopic(TopicKind.HEARTBEAT, node)
    assert topics.parse(topics.command(node)) == ParsedTopic(TopicKind.COMMAND, node)
    assert topics.parse(topics.all_heartbeats) is None


@given(prefix=PREFIX, cluster=SEGMENT, other=SEGMENT, node=SEGMENT)
def test_topics_of_another_cluster_never_parse(prefix: str, cluster: str, other: str, node: str) -> None:
    mine, theirs = Topics(prefix, cluster), Topics(prefix, other)
    for topic in (theirs.lease, theirs.leader, theirs.heartbeat(node), theirs.command(node)):
        assert (mine.parse(topic) is None) == (cluster != other)


def test_is_election_is_the_lease_and_the_heartbeats_only() -> None:
    t = Topics("hasync", "home")
    assert t.is_election(t.lease) and t.is_election(t.heartbeat("n1"))
    others = [t.leader, t.command("n1"), t.primary_state("n1"), t.sync_marker("n1"), t.ha_probe("n1"),
              t.entity("light.kitchen"), "hasync/other/lease", "hasync/home/nodes/", "hasync/home/leases"]
    assert not [topic for topic in others if t.is_election(topic)]
