"""The hybrid logical clock (hasync.sync.hlc), pure: its wire form, monotony, causality and bounds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness.records import STAMPS, T0
from hasync.sync.hlc import HLC, MAX_COUNTER, ClockDriftError, Stamp, StampFormatError

# ---- the clock ----------------------------------------------------------------------------------


@given(STAMPS)
def test_wire_round_trip(stamp: Stamp) -> None:
    assert Stamp.from_wire(stamp.to_wire()) == stamp


@given(STAMPS, STAMPS)
def test_wire_strings_sort_like_stamps(a: Stamp, b: Stamp) -> None:
    assert (a < b) == (a.to_wire() < b.to_wire())
    assert (a == b) == (a.to_wire() == b.to_wire())


def test_wire_example_and_node_tiebreak() -> None:
    assert Stamp(1795300000000, 3, "ha-1").to_wire() == "1795300000000-0003-ha-1"
    assert Stamp.from_wire("0000000000042-0000-a-b-c") == Stamp(42, 0, "a-b-c")
    assert Stamp(5, 1, "a") < Stamp(5, 1, "b") < Stamp(5, 2, "a") < Stamp(6, 0, "a")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1795300000000-3-ha-1",  # counter not 4 digits
        "179530000000-0003-ha-1",  # wall not 13 digits
        "1795300000000-0003-",  # no node
        "1795300000000-0003-ha 1",
        " 1795300000000-0003-ha-1",
        "+795300000000-0003-ha-1",
        "1795300000000_0003_ha-1",
        "1795300000000-0003-" + "x" * 65,
        "١٧٩٥٣٠٠٠٠٠٠٠٠-0003-ha-1",  # non-ASCII digits
    ],
)
def test_from_wire_is_strict(text: str) -> None:
    with pytest.raises(StampFormatError, match="is not '<13-digit wall_ms>-<4-digit counter>-<node id>'"):
        Stamp.from_wire(text)


def test_stamp_fields_are_checked() -> None:
    with pytest.raises(StampFormatError, match="counter must be"):
        Stamp(1, MAX_COUNTER + 1, "a")
    with pytest.raises(StampFormatError, match="wall_ms must be"):
        Stamp(-1, 0, "a")
    with pytest.raises(StampFormatError, match="wall_ms must be"):
        Stamp(True, 0, "a")
    with pytest.raises(StampFormatError, match="node must be"):
        Stamp(1, 0, "a/b")
    with pytest.raises(StampFormatError, match="a stamp on the wire is a string"):
        Stamp.from_wire(123)  # type: ignore[arg-type]


CLOCK_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("now"), st.integers(0, 3000), st.just(None)),
        st.tuples(
            st.just("update"),
            st.integers(0, 3000),
            st.builds(Stamp, st.integers(0, 3000), st.integers(0, MAX_COUNTER), st.sampled_from(["a", "b", "z"])),
        ),
    ),
    max_size=60,
)


@given(CLOCK_OPS)
def test_clock_is_monotonic_and_receive_follows_the_message(ops: list[tuple[str, int, Stamp | None]]) -> None:
    clock = HLC("b", max_drift_ms=10_000)
    previous: Stamp | None = None
    for op, wall, remote in ops:
        stamp = clock.now(wall) if remote is None else clock.update(remote, wall)
        assert stamp.counter <= MAX_COUNTER
        assert stamp.wall_ms >= wall  # never behind the wall clock
        if remote is not None:
            assert stamp > remote, op
        if previous is not None:
            assert stamp > previous
        assert clock.last == stamp
        previous = stamp


@given(
    offsets=st.lists(st.integers(-5000, 5000), min_size=3, max_size=3),
    stuck=st.lists(st.booleans(), min_size=3, max_size=3),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["local", "send", "recv"]), st.integers(0, 2), st.integers(0, 50), st.integers(0, 600)
        ),
        max_size=50,
    ),
)
def test_clock_preserves_happened_before(
    offsets: list[int], stuck: list[bool], steps: list[tuple[str, int, int, int]]
) -> None:
    """Whenever event e happened before event f (vector clocks), stamp(e) < stamp(f); all stamps differ."""
    clocks = [HLC(n) for n in "abc"]
    vectors = [[0, 0, 0] for _ in range(3)]
    events: list[tuple[Stamp, tuple[int, ...]]] = []
    messages: list[tuple[Stamp, tuple[int, ...]]] = []
    now = T0
    for kind, i, pick, dt in steps:
        now += dt
        wall = (T0 if stuck[i] else now) + offsets[i]
        vectors[i][i] += 1
        if kind == "recv" and messages:
            stamp_in, vector_in = messages[pick % len(messages)]
            vectors[i] = [max(x, y) for x, y in zip(vectors[i], vector_in, strict=True)]
            stamp = clocks[i].update(stamp_in, wall)
        else:
            stamp = clocks[i].now(wall)
        events.append((stamp, tuple(vectors[i])))
        if kind == "send":
            messages.append(events[-1])
    assert len({s for s, _ in events}) == len(events)
    for s1, v1 in events:
        for s2, v2 in events:
            if v1 != v2 and all(x <= y for x, y in zip(v1, v2, strict=True)):
                assert s1 < s2


def test_counter_is_bounded_under_a_stuck_wall_clock() -> None:
    clock = HLC("a")
    n = 3 * (MAX_COUNTER + 1) + 5
    stamps = [clock.now(T0) for _ in range(n)]
    assert all(s.counter <= MAX_COUNTER for s in stamps)
    assert stamps == sorted(stamps) and len(set(stamps)) == n
    assert stamps[-1].wall_ms - T0 <= n // (MAX_COUNTER + 1)
    assert clock.now(T0 + 10).counter == 0  # the wall clock moved past: the counter restarts
    # A received stamp at the counter's limit also moves on to the next millisecond.
    assert clock.update(Stamp(T0 + 20, MAX_COUNTER, "b"), T0) == Stamp(T0 + 21, 0, "a")


@given(walls=st.lists(st.integers(0, 5), min_size=1, max_size=300), start=st.integers(0, MAX_COUNTER))
def test_counter_bounded_when_the_clock_stands_still_or_goes_back(walls: list[int], start: int) -> None:
    clock = HLC("a", last=Stamp(T0, start, "a"))
    for i, w in enumerate(walls, 1):
        stamp = clock.now(T0 - w)  # stuck or behind the clock's own past
        assert stamp.counter <= MAX_COUNTER
        assert stamp.wall_ms - T0 <= (start + i) // (MAX_COUNTER + 1)


def test_a_stamp_from_the_future_is_refused_and_leaves_the_clock_alone() -> None:
    clock = HLC("a", max_drift_ms=60_000)
    mine = clock.now(T0)
    with pytest.raises(ClockDriftError, match="60001 ms ahead") as info:
        clock.update(Stamp(T0 + 60_001, 0, "b"), T0)
    assert info.value.remote == Stamp(T0 + 60_001, 0, "b")
    assert clock.last == mine
    assert clock.now(T0) == Stamp(T0, 1, "a")
    assert clock.update(Stamp(T0 + 60_000, 0, "b"), T0) == Stamp(T0 + 60_000, 1, "a")  # the limit is allowed
