"""The floating IP (hasync.vip): its configuration, the announcement frames, and real agents on the fake
of the netlink seam (harness.fakenetlink) on virtual time. The real kernel, with real ARP, is in
tests/test_vip_netns.py."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

from harness import inprocess, vclock
from harness.fakenetlink import FakeHost
from harness.inprocess import metric
from harness.wait import eventually
from hasync import guardian
from hasync.agent import Agent
from hasync.config import ADDRESS_LIFETIME_LAG, ConfigError, HookEvent, VipAddress, load_config
from hasync.messages import Command
from hasync.metrics import Metrics
from hasync.topics import Topics
from hasync.vip import (
    ANNOUNCE_COUNT,
    ANNOUNCE_INTERVAL,
    NETLINK_TIMEOUT,
    RECHECK_INTERVAL,
    FloatingIps,
    Lifetime,
    VipError,
    VipErrorKind,
    garp_frame,
    unsolicited_na_frame,
)

VIP = "10.0.0.50/24"
VIP6 = "fd00::50/64"
LEASE, DEADLINE, PREEMPT = 3.0, 2.0, 10.0
T = Topics(inprocess.PREFIX, inprocess.CLUSTER)


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    vclock.run(scenario())


# ---- configuration ---------------------------------------------------------------------------------------


def test_vip_entries_are_normalised() -> None:
    cfg = load_config(overrides={("vip",): [
        {"address": " 192.168.1.50/24", "interface": "eth0", "label": "eth0:ha"},
        {"address": "FD00:0::50/64", "interface": "br-lan"},
    ]})
    v4, v6 = cfg.vip
    assert (v4.address, v4.interface, v4.label, v4.prefixlen, str(v4.ip)) == (
        "192.168.1.50/24", "eth0", "eth0:ha", 24, "192.168.1.50")
    assert (v6.address, v6.prefixlen, v6.ip.version) == ("fd00::50/64", 64, 6)
    assert load_config().vip == []


@pytest.mark.parametrize(("entries", "line"), [
    ([{"address": "192.168.1.50", "interface": "eth0"}], "vip.0.address: '192.168.1.50' has no prefix length"),
    ([{"address": "fd00::50", "interface": "eth0"}], "vip.0.address: 'fd00::50' has no prefix length"),
    ([{"address": "kitchen/24", "interface": "eth0"}], "vip.0.address: 'kitchen/24' is not an IPv4 or IPv6"),
    ([{"address": "192.168.1.50/33", "interface": "eth0"}], "vip.0.address: '192.168.1.50/33' is not an IPv4"),
    ([{"address": "192.168.1/24", "interface": "eth0"}], "vip.0.address: '192.168.1/24' is not an IPv4 or IPv6"),
    ([{"address": "192.168.1.255/24", "interface": "eth0"}], "vip.0.address: '192.168.1.255/24' is the network's "
                                                             "broadcast address"),
    ([{"address": "224.0.0.1/4", "interface": "eth0"}], "vip.0.address: '224.0.0.1/4' is a multicast"),
    ([{"address": "fe80::5/64", "interface": "eth0"}], "vip.0.address: 'fe80::5/64' is a multicast, loopback, link"),
    ([{"address": "10.0.0.5/24", "interface": "eth 0"}], "vip.0.interface: 'eth 0' is not a network interface"),
    ([{"address": "10.0.0.5/24", "interface": "a-very-long-name0"}], "vip.0.interface: 'a-very-long-name0' is not"),
    ([{"address": "10.0.0.5/24"}], "vip.0.interface: Field required"),
    ([{"address": "10.0.0.5/24", "interface": "eth0", "label": "wlan0:x"}], "vip.0: label 'wlan0:x' must be"),
    ([{"address": "fd00::5/64", "interface": "eth0", "label": "eth0"}], "vip.0: fd00::5/64: labels are for IPv4"),
    ([{"address": "10.0.0.5/24", "interface": "eth0", "mac": "x"}], "vip.0.mac: Extra inputs are not permitted"),
    ([{"address": "10.0.0.5/24", "interface": "eth0"}, {"address": "10.0.0.5/32", "interface": "eth1"}],
     "vip: 10.0.0.5 is listed twice (entries 0 and 1)"),
    ([{"address": "fd00::5/64", "interface": "eth0"}, {"address": "FD00:0::5/64", "interface": "eth0"}],
     "vip: fd00::5 is listed twice"),
])
def test_a_bad_vip_entry_is_one_line_naming_it(entries: list[dict[str, str]], line: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides={("vip",): entries})
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 1, lines
    assert lines[0].strip().startswith(line), lines[0]


FAST = {"lease_duration": 1.5, "renew_deadline": 1.2, "renew_interval": 0.25, "heartbeat_interval": 0.5}


def test_a_fenced_address_refuses_timings_without_room_for_a_lifetime() -> None:
    fenced = [{"address": VIP, "interface": "eth0"}]
    with pytest.raises(ConfigError) as info:
        load_config(overrides={("vip",): fenced, ("election",): FAST})
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].strip().startswith(
        "vip: a fenced floating IP needs election.lease_duration (1.5 s) and 1.5 x broker.keepalive (7.5 s) of at "
        "least 2.5 s (1 s + renew_interval + 1.25 s)"), lines
    # The will counts too: a short keepalive elects a successor before the lease would.
    with pytest.raises(ConfigError, match=r"1\.5 x broker.keepalive \(3 s\)"):
        load_config(overrides={("vip",): fenced, ("election", "lease_duration"): 6.0, ("broker", "keepalive"): 2,
                               ("election", "renew_interval"): 1.0})
    # Kept addresses are permanent: any timings; so are the defaults, with the will or without.
    load_config(overrides={("vip",): [{**fenced[0], "on_broker_loss": "kept"}], ("election",): FAST})
    assert load_config(overrides={("vip",): fenced}).takeover_after == 3.0
    assert load_config(overrides={("broker", "keepalive"): 2}).takeover_after == 3.0
    assert load_config(overrides={("election", "lease_duration"): 6.0, ("broker", "keepalive"): 2}).takeover_after == 3
    assert load_config(overrides={("election", "lease_duration"): 6.0, ("broker", "keepalive"): 2,
                                  ("election", "will_fast_path"): False}).takeover_after == 6.0


@given(st.floats(-1e6, 1e6), st.floats(0, 100))
def test_a_lifetime_is_the_longest_whole_seconds_the_kernel_ends_in_time(now: float, left: float) -> None:
    lifetime = Lifetime(now + left)
    if left - ADDRESS_LIFETIME_LAG < 1 + 1e-6:  # (float rounding at the boundary: either answer is safe)
        with pytest.raises(VipError) as info:
            seconds = lifetime.seconds(now)
            assert now + seconds + ADDRESS_LIFETIME_LAG <= lifetime.gone_by
        assert info.value.kind is VipErrorKind.LATE or left - ADDRESS_LIFETIME_LAG >= 1 - 1e-6
        return
    seconds = lifetime.seconds(now)
    assert seconds >= 1 and isinstance(seconds, int)
    assert now + seconds + ADDRESS_LIFETIME_LAG <= lifetime.gone_by + 1e-6  # ended by the kernel in time
    assert now + seconds + 1 + ADDRESS_LIFETIME_LAG > lifetime.gone_by - 1e-6  # and not a second shorter


def test_the_config_models_import_no_netlink() -> None:
    import subprocess
    import sys

    code = ("import sys, hasync.config, hasync.vip; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyroute2', 'socket_') ))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


# ---- the frames ----------------------------------------------------------------------------------------

MAC = bytes.fromhex("020000000001")


def test_a_gratuitous_arp_is_a_broadcast_request_for_the_address_itself() -> None:
    frame = garp_frame(MAC, ipaddress.IPv4Address("192.168.1.50"))
    assert frame == bytes.fromhex(
        "ffffffffffff" "020000000001" "0806"  # Ethernet: broadcast, from us, ARP
        "0001" "0800" "06" "04" "0001"  # Ethernet/IPv4, request
        "020000000001" "c0a80132"  # sender: us, the address
        "000000000000" "c0a80132"  # target: the same address
    ).ljust(60, b"\0")


def _ones_complement_sum(data: bytes) -> int:
    total = 0
    for i in range(0, len(data), 2):
        total += int.from_bytes(data[i:i + 2].ljust(2, b"\0"), "big")
    while total > 0xFFFF:
        total = (total >> 16) + (total & 0xFFFF)
    return total


def test_an_unsolicited_neighbour_advertisement_overrides_and_checks_out() -> None:
    ip = ipaddress.IPv6Address("fd00::50")
    frame = unsolicited_na_frame(MAC, ip)
    assert frame[:14] == bytes.fromhex("333300000001" "020000000001" "86dd")
    version, length, next_header, hops = struct.unpack("!IHBB", frame[14:22])
    src, dst, icmp = frame[22:38], frame[38:54], frame[54:]
    assert (version >> 28, length, next_header, hops) == (6, len(icmp), 58, 255)
    assert (src, dst) == (ip.packed, ipaddress.IPv6Address("ff02::1").packed)
    assert icmp[0:2] == bytes([136, 0])  # neighbour advertisement, code 0
    assert icmp[4] == 0x20 and icmp[5:8] == b"\0\0\0"  # override only: not solicited, not a router
    assert icmp[8:24] == ip.packed  # the target
    assert icmp[24:32] == bytes([2, 1]) + MAC  # target link-layer address option
    pseudo = src + dst + struct.pack("!I3xB", len(icmp), 58)
    assert _ones_complement_sum(pseudo + icmp) == 0xFFFF  # the checksum verifies


# ---- agents on the fake of the seam ----------------------------------------------------------------------


def vip_settings(*addresses: str, interface: str = "eth0") -> dict[str, Any]:
    return {"vip": [{"address": a, "interface": interface} for a in addresses]}


class HangingHooks:
    """A hook runner whose hooks never finish (a promote hook stuck on a dead NFS mount)."""

    def __init__(self) -> None:
        self.submitted: list[HookEvent] = []

    def submit(self, event: HookEvent, env: dict[str, str]) -> None:
        self.submitted.append(event)

    async def drain(self) -> None:
        await asyncio.Event().wait()


def first(host: FakeHost, what: str, after: float = 0.0) -> float:
    return min(t for t in host.times(what) if t >= after)


def test_only_the_primary_holds_the_addresses_and_announces_them() -> None:
    async def scenario() -> None:
        h1, h2 = FakeHost(), FakeHost()
        async with inprocess.cluster() as c:
            n1 = await c.add("n1", priority=100, host=h1, **vip_settings(VIP, VIP6))
            n2 = await c.add("n2", priority=90, host=h2, **vip_settings(VIP, VIP6))
            assert await c.wait_for_leader() == "n1"
            await asyncio.sleep(ANNOUNCE_COUNT * ANNOUNCE_INTERVAL + 1)
            assert h1.addresses() == {VIP, VIP6} and h2.addresses() == set()
            [promoted] = c.promotions()
            assert 0 <= first(h1, "add") - promoted["t"] < 0.01
            announced = h1.times("announce")
            assert len(announced) == 2 * ANNOUNCE_COUNT  # both addresses, three times each
            assert announced[0] - first(h1, "add") < 0.01  # the first at once
            assert announced[-1] - announced[0] == pytest.approx((ANNOUNCE_COUNT - 1) * ANNOUNCE_INTERVAL)
            assert h2.log == []
            assert n1.status()["vip"]["held"] == sorted([VIP, VIP6]) and n2.status()["vip"]["held"] == []
            assert metric(n1, "hasync_vip_held", address=VIP) == 1 and metric(n2, "hasync_vip_held", address=VIP) == 0
            assert metric(n1, "hasync_vip_announcements_total") == 2 * ANNOUNCE_COUNT
            assert b'hasync_vip_held{address="10.0.0.50/24"} 1.0' in n1._render_metrics()

    run(scenario)


def test_at_the_renew_deadline_the_addresses_go_even_while_the_promote_hook_hangs() -> None:
    async def scenario() -> None:
        host = FakeHost()
        async with inprocess.cluster() as c:
            # A lease long enough for lifetimes beyond the renew deadline (4 s): the demotion removes the address.
            agent = await c.add("n1", host=host, election={"lease_duration": 6.0}, **vip_settings(VIP))
            hooks = agent.effects.hooks = HangingHooks()  # before it is elected: the promote hook never ends
            await c.wait_for_leader()
            await asyncio.sleep(1)
            assert host.addresses() == {VIP} and hooks.submitted == [HookEvent.PROMOTE]
            t0 = vclock.clock()
            c.fake.pause()  # the broker hangs: no renewal comes back
            await eventually(lambda: not host.addresses(), DEADLINE + 1, "the address to go")
            [demotion] = [e for e in c.events if e["event"] == "demote"]
            assert demotion["cause"] == "renew_deadline"
            removed = first(host, "remove")
            assert demotion["acting_until"] <= removed < demotion["acting_until"] + 0.01
            assert removed <= t0 + DEADLINE + 0.01
            assert agent.status()["vip"]["held"] == []
            assert metric(agent, "hasync_vip_held", address=VIP) == 0
            c.fake.resume()

    run(scenario)


def test_handovers_remove_the_addresses_before_the_successor_adds_them() -> None:
    """SIGTERM (shutdown) and preemption (a step-down): the release that lets the successor claim goes out
    only once the addresses are off the old primary."""

    async def scenario() -> None:
        h1, h2 = FakeHost(delay=0.2), FakeHost(delay=0.2)  # slow netlink: a release sent early would show
        async with inprocess.cluster() as c:
            await c.add("n1", priority=100, host=h1, **vip_settings(VIP))
            await c.add("n2", priority=90, host=h2, **vip_settings(VIP))
            assert await c.wait_for_leader() == "n1"
            await asyncio.sleep(LEASE)
            t0 = vclock.clock()
            await c.stop("n1")
            assert await c.wait_for_leader(other_than="n1") == "n2"
            await eventually(lambda: h2.addresses() == {VIP}, 1, "n2 to hold the address")
            assert h1.addresses() == set()
            assert first(h1, "remove", t0) <= first(h2, "add", t0)
            # n1 back: it preempts n2 after preempt_delay; n2 steps down and releases only once it let go.
            t1 = vclock.clock()
            await c.add("n1", priority=100, host=h1, **vip_settings(VIP))
            await eventually(lambda: c.leader() == "n1" and h1.addresses() == {VIP}, LEASE + PREEMPT + 5,
                             "n1 to take over again with the address")
            assert h2.addresses() == set()
            assert first(h2, "remove", t1) <= first(h1, "add", t1)
            [preempted] = [e for e in c.events if e["event"] == "demote" and e["node"] == "n2"]
            assert preempted["cause"] == "preempted"

    run(scenario)


def test_an_address_left_by_an_earlier_run_is_removed_before_the_agent_can_be_elected() -> None:
    async def scenario() -> None:
        host = FakeHost(interfaces={"eth0": {VIP, "10.0.0.7/24"}})  # a previous run was killed as primary
        async with inprocess.cluster() as c:
            t0 = vclock.clock()
            agent = await c.add("n1", host=host, **vip_settings(VIP))
            assert host.addresses() == {"10.0.0.7/24"}  # removed during start-up; the host's own address stays
            assert host.log[0][1:] == ("remove", VIP) and host.log[0][0] == t0
            assert metric(agent, "hasync_vip_stale_removed_total") == 1
            assert agent.status()["vip"]["stale_removed"] == 1
            await c.wait_for_leader()
            assert c.promotions()[0]["t"] > t0
            await eventually(lambda: host.addresses() == {VIP, "10.0.0.7/24"}, 1, "the address back")

    run(scenario)


def test_a_missing_interface_keeps_the_node_ineligible_until_it_appears(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        host = FakeHost(interfaces={"eth0": set()})
        async with inprocess.cluster() as c:
            agent = await c.add("n1", host=host, **vip_settings(VIP, interface="eth9"))
            await asyncio.sleep(LEASE + 3 * RECHECK_INTERVAL)
            assert not c.promotions() and agent.status()["eligible"] is False
            assert agent.status()["vip"]["fault"] == "no interface eth9"
            assert "floating IP: no interface eth9" in agent.status()["health_detail"]
            assert metric(agent, "hasync_vip_errors_total", operation="check", error="no_interface") >= 3
            assert metric(agent, "hasync_vip_fault") == 1
            host.interfaces["eth9"] = set()  # plugged in
            await c.wait_for_leader(RECHECK_INTERVAL + LEASE + 1)
            await eventually(lambda: host.addresses("eth9") == {VIP}, 1, "the address on eth9")
            assert agent.status()["vip"]["fault"] is None and metric(agent, "hasync_vip_fault") == 0
        lines = [r for r in caplog.records if "no interface eth9" in r.getMessage()]
        assert [r.levelno for r in lines][:1] == [logging.WARNING]
        assert all(r.levelno == logging.DEBUG for r in lines[1:])

    run(scenario)


def test_a_primary_that_cannot_add_its_address_runs_its_fault_hook_and_hands_over() -> None:
    async def scenario() -> None:
        h1, h2 = FakeHost(), FakeHost()
        async with inprocess.cluster() as c:
            n1 = await c.add("n1", priority=100, host=h1, **vip_settings(VIP, VIP6))
            await c.add("n2", priority=90, host=h2, **vip_settings(VIP, VIP6))
            hooks = n1.effects.hooks = HangingHooks()
            h1.admin = False  # CAP_NET_ADMIN lost after the start-up check (or an EPERM from a security module)
            assert await c.wait_for_leader() == "n2"  # n1 won the first term, could not add, handed over
            await eventually(lambda: h2.addresses() == {VIP, VIP6}, 1, "n2 to hold the addresses")
            assert h1.addresses() == set()
            assert [(e["node"], e["term"]) for e in c.promotions()] == [("n1", 1), ("n2", 2)]
            [fault] = [e for e in c.events if e["event"] == "fault"]
            assert fault["node"] == "n1" and "Operation not permitted" in fault["reason"]
            [demotion] = [e for e in c.events if e["event"] == "demote"]
            assert demotion["cause"] == "unhealthy"
            assert HookEvent.FAULT in hooks.submitted
            assert metric(n1, "hasync_vip_errors_total", operation="add", error="permission") == 1
            # The agent carries on; once it may manage its interfaces again, it is eligible again.
            h1.admin = True
            await eventually(lambda: n1.status()["eligible"], RECHECK_INTERVAL + 1, "n1 eligible again")

    run(scenario)


def test_announcements_that_fail_are_counted_and_the_node_stays_primary() -> None:
    async def scenario() -> None:
        host = FakeHost(raw=False)  # no CAP_NET_RAW
        async with inprocess.cluster() as c:
            agent = await c.add("n1", host=host, **vip_settings(VIP))
            await c.wait_for_leader()
            await asyncio.sleep(ANNOUNCE_COUNT * ANNOUNCE_INTERVAL + 1)
            assert c.leader() == "n1" and host.addresses() == {VIP}
            assert metric(agent, "hasync_vip_errors_total", operation="announce", error="permission") == ANNOUNCE_COUNT
            assert metric(agent, "hasync_vip_announcements_total") == 0

    run(scenario)


def test_a_netlink_that_never_answers_is_timed_out_and_the_node_hands_over() -> None:
    async def scenario() -> None:
        h1, h2 = FakeHost(), FakeHost()
        async with inprocess.cluster() as c:
            n1 = await c.add("n1", priority=100, host=h1, **vip_settings(VIP))
            await c.add("n2", priority=90, host=h2, **vip_settings(VIP))
            h1.hang = True
            assert await c.wait_for_leader(other_than="n1") == "n2"
            assert metric(n1, "hasync_vip_errors_total", operation="add", error="timeout") == 1
            # The add may have happened after all: n1 keeps trying to remove it until netlink answers.
            assert n1.status()["vip"]["held"] == [VIP]
            await asyncio.sleep(5)
            assert metric(n1, "hasync_vip_errors_total", operation="remove", error="timeout") >= 2
            h1.hang = False
            await eventually(lambda: n1.status()["vip"]["held"] == [], 2 * NETLINK_TIMEOUT, "n1 to let go")

    run(scenario)


def test_a_step_down_command_moves_the_addresses_without_overlap() -> None:
    async def scenario() -> None:
        h1, h2 = FakeHost(delay=0.2), FakeHost(delay=0.2)  # slow netlink: a release sent early would show
        async with inprocess.cluster() as c:
            await c.add("n1", priority=100, host=h1, **vip_settings(VIP))
            await c.add("n2", priority=90, host=h2, **vip_settings(VIP))
            assert await c.wait_for_leader() == "n1"
            await asyncio.sleep(LEASE)
            t0 = vclock.clock()
            c.fake.inject(T.command("n1"), Command(command="step_down").to_payload())
            assert await c.wait_for_leader(other_than="n1") == "n2"
            await eventually(lambda: h2.addresses() == {VIP}, 1, "n2 to hold the address")
            assert first(h1, "remove", t0) <= first(h2, "add", t0)

    run(scenario)


# ---- lifetimes -------------------------------------------------------------------------------------------


@dataclass
class WatchedHost(FakeHost):
    """A host that checks every lifetime it is given against the election: the kernel, however late
    (``lag``), must have removed the address by the time another node may hold it, a ``takeover_after``
    after the sending of this node's newest renewal that came back (its deadline minus the renew deadline)."""

    agent: Agent | None = None
    bounds: list[tuple[float, float]] = field(default_factory=list)  # (the kernel's removal, the takeover)

    def _start(self, vip: VipAddress, lifetime: Lifetime | None) -> int | None:
        seconds = super()._start(vip, lifetime)
        if seconds is not None:
            assert self.agent is not None and self.agent.election.deadline is not None
            config = self.agent.config
            sent = self.agent.election.deadline - config.election.renew_deadline
            self.bounds.append((self.lifetimes[(vip.interface, vip.address)], sent + config.takeover_after))
        return seconds


@pytest.mark.parametrize(("settings", "seconds"), [
    ({}, 1),  # the defaults: lease 3 s, a lifetime of floor(3 - 1.25 - echo)
    ({"election": {"lease_duration": 6.0}}, 4),
    ({"election": {"lease_duration": 6.0}, "broker": {"keepalive": 2}}, 1),  # the will comes at 3 s
])
def test_fenced_addresses_live_from_renewal_to_renewal_kept_ones_for_ever(settings: dict[str, Any],
                                                                           seconds: int) -> None:
    """Every renewal that comes back gives each fenced address a new lifetime, chosen from the timings, that
    the kernel ends before another node may be elected even when it is ADDRESS_LIFETIME_LAG late; a kept
    address is added without one and never refreshed."""

    async def scenario() -> None:
        host = WatchedHost(lag=ADDRESS_LIFETIME_LAG)
        async with inprocess.cluster() as c:
            agent = await c.add("n1", host=host, vip=[{"address": VIP, "interface": "eth0"},
                                                      {"address": VIP6, "interface": "eth0", "on_broker_loss": "kept"}],
                                **settings)
            host.agent = agent  # (before its promotion: it observes a lease first)
            await c.wait_for_leader()
            await eventually(lambda: host.addresses() == {VIP, VIP6}, 1, "both addresses")
            t0, claims = vclock.clock(), metric(agent, "hasync_claims_total")
            before = metric(agent, "hasync_renew_echo_seconds_count")
            await asyncio.sleep(10)
            after = metric(agent, "hasync_renew_echo_seconds_count")
            refreshes = [t for t, op, a in host.log if op == "refresh" and t > t0]
            assert refreshes and all(a == VIP for t, op, a in host.log if op == "refresh")  # never the kept one
            assert len(refreshes) == after - before  # one per renewal that came back (none is a claim here)
            assert metric(agent, "hasync_claims_total") == claims
            assert set(host.seconds) == {seconds}
            assert host.bounds and all(removal <= takeover + 1e-9 for removal, takeover in host.bounds)
            assert (host.interfaces["eth0"], [k for k in host.lifetimes]) == ({VIP, VIP6}, [("eth0", VIP)])
            assert host.times("expire") == [] and agent.status()["vip"]["lapses"] == 0
            assert metric(agent, "hasync_vip_refreshes_total") == len(host.times("refresh"))
            assert agent.guardian is None and agent.status()["guardian"] is None  # (a fake netlink)

    run(scenario)


def test_renewals_that_come_back_late_let_the_address_lapse_and_the_next_one_adds_it_again() -> None:
    """The broker stalls for 1.85 s: no renewal comes back. 0.7 s after the last one was sent the address gets
    the longest lifetime that one allows (a top-up: to 1.7 s after it, rather than the 1 s it got when it came
    back); that ends while the node is still primary (its renew deadline is 2 s after it); the first renewal
    back after that adds the address again."""

    async def scenario() -> None:
        host = FakeHost()
        async with inprocess.cluster() as c:
            agent = await c.add("n1", host=host, **vip_settings(VIP))
            await c.wait_for_leader()
            await asyncio.sleep(1)  # (just after a renewal came back)
            t0 = vclock.clock()
            c.fake.pause()
            await asyncio.sleep(1.85)
            [topup] = [t for t in host.times("refresh") if t > t0]
            [expired] = host.times("expire")
            assert topup == pytest.approx(t0 + 0.7, abs=0.02) and expired == pytest.approx(t0 + 1.7, abs=0.02)
            assert host.addresses() == set() and agent.is_primary()
            c.fake.resume()
            await eventually(lambda: host.addresses() == {VIP}, 1, "the address back")
            assert c.leader() == "n1" and len(c.promotions()) == 1
            assert agent.status()["vip"]["lapses"] == 1 and metric(agent, "hasync_vip_lapses_total") == 1
            assert agent.status()["vip"]["fault"] is None and agent.status()["healthy"]

    run(scenario)


def test_without_renewals_a_top_up_then_a_lapse_a_late_one_refreshes_nothing_and_no_fault() -> None:
    async def scenario() -> None:
        host, metrics = FakeHost(), Metrics()
        faults: list[str | None] = []
        ips = FloatingIps([VipAddress(address=VIP, interface="eth0")], metrics, netlink=host, announcer=host,
                          clock=vclock.clock, takeover_gap=1.0, on_fault=lambda: faults.append(ips.fault))
        task = asyncio.create_task(ips.run())
        t0 = vclock.clock()
        ips.promoted()
        ips.extend(t0 + 2.0)  # sent at t0: another node may hold it from t0 + 3
        await eventually(lambda: host.addresses() == {VIP}, 1, "the address")
        assert host.seconds == [1] and host.lifetimes[("eth0", VIP)] == t0 + 1  # floor(3 - 1.25)
        await eventually(lambda: host.times("refresh"), 1, "the top-up")
        assert host.times("refresh") == [pytest.approx(t0 + 0.7)] and host.seconds == [1, 1]  # until t0 + 1.7
        await eventually(lambda: host.times("expire"), 2, "the lifetime's end")
        assert host.times("expire") == [pytest.approx(t0 + 1.7)]
        await asyncio.sleep(0.1)
        ips.extend(t0 + 2.1)  # a renewal sent at t0 + 0.1, back only now: 3.1 - 1.25 - 1.8 < 1 s left
        await eventually(lambda: ips.status()["lapses"] == 1, 1, "the refresh")
        assert len(host.times("refresh")) == 1 and host.addresses() == set() and host.seconds == [1, 1]
        assert ips.fault is None and faults == [] and ips.held == [VIP]  # still its to hold and remove
        assert metrics.vip_errors.labels("refresh", "late")._value.get() == 1
        ips.extend(t0 + 3.8)  # one in time: sent at t0 + 1.8
        await eventually(lambda: host.addresses() == {VIP}, 1, "the address again")
        assert host.seconds == [1, 1, 1]
        task.cancel()

    run(scenario)


def test_a_refresh_never_ends_a_lifetime_sooner() -> None:
    """A renewal a little newer than the last, back late: its lifetime would be a whole second shorter than the
    top-up's (lease 6 s: the renew deadline plus 4 s); nothing is sent."""

    async def scenario() -> None:
        host = FakeHost()
        ips = FloatingIps([VipAddress(address=VIP, interface="eth0")], Metrics(), netlink=host, announcer=host,
                          clock=vclock.clock, takeover_gap=4.0)
        task = asyncio.create_task(ips.run())
        t0 = vclock.clock()
        ips.promoted()
        ips.extend(t0 + 2.0)
        await eventually(lambda: host.times("refresh"), 1, "the top-up")
        assert host.seconds == [4, 4] and host.lifetimes[("eth0", VIP)] == pytest.approx(t0 + 4.7)
        await asyncio.sleep(0.15)
        ips.extend(t0 + 2.05)  # floor(6.05 - 1.25 - 0.85) = 3: until t0 + 3.85
        await asyncio.sleep(0.1)
        assert host.seconds == [4, 4] and len(host.times("refresh")) == 1
        task.cancel()

    run(scenario)


def test_a_refresh_that_fails_is_a_fault_and_the_node_hands_over() -> None:
    async def scenario() -> None:
        h1, h2 = FakeHost(), FakeHost()
        async with inprocess.cluster() as c:
            n1 = await c.add("n1", priority=100, host=h1, **vip_settings(VIP))
            await c.add("n2", priority=90, host=h2, **vip_settings(VIP))
            assert await c.wait_for_leader() == "n1"
            await eventually(lambda: h1.addresses() == {VIP} and h1.times("refresh"), 2, "a refresh on n1")
            h1.admin = False  # CAP_NET_ADMIN lost while primary
            assert await c.wait_for_leader(other_than="n1") == "n2"
            await eventually(lambda: h2.addresses() == {VIP}, 1, "n2 to hold the address")
            assert metric(n1, "hasync_vip_errors_total", operation="refresh", error="permission") == 1
            [fault] = [e for e in c.events if e["event"] == "fault"]
            assert fault["node"] == "n1" and "Operation not permitted" in fault["reason"]
            [demotion] = [e for e in c.events if e["event"] == "demote"]
            assert demotion["cause"] == "unhealthy"

    run(scenario)


# ---- the guardian's netlink messages -------------------------------------------------------------------


@pytest.mark.parametrize("address", ["192.168.1.50/24", "fd00::50/64"])
def test_the_guardian_asks_for_the_removal_ip_would_send(address: str) -> None:
    iface = ipaddress.ip_interface(address)
    data = guardian.deladdr(iface, 7, 42)
    msg = ifaddrmsg(data)
    msg.decode()
    assert msg["header"]["type"] == 21 and msg["header"]["flags"] == 0x05  # RTM_DELADDR, request + ack
    assert (msg["header"]["length"], msg["header"]["sequence_number"]) == (len(data), 42)
    family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
    assert (msg["family"], msg["prefixlen"], msg["index"]) == (family, iface.network.prefixlen, 7)
    assert msg.get_attr("IFA_LOCAL") == msg.get_attr("IFA_ADDRESS") == str(iface.ip)


def test_the_guardian_reads_acknowledgements_and_ignores_the_rest() -> None:
    def error(seq: int, code: int) -> bytes:
        return struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", -code) + bytes(16)

    data = error(2, 0) + error(3, errno.EADDRNOTAVAIL) + struct.pack("=IHHII", 20, 20, 0, 4, 0) + bytes(4)
    assert guardian.acknowledgements(data) == {2: 0, 3: errno.EADDRNOTAVAIL}
    assert guardian.acknowledgements(b"\x01\x00") == {} and guardian.acknowledgements(bytes(16)) == {}
    eth0 = guardian.targets(["eth0", "10.0.0.5/24", "br@lan", "fd00::5/64"])
    assert [str(t) for t in eth0] == ["10.0.0.5/24 on eth0", "fd00::5/64 on br@lan"]
    with pytest.raises(ValueError):
        guardian.targets(["eth0"])
    assert guardian.report({eth0[0]: 0, eth0[1]: errno.EADDRNOTAVAIL}) == "removed 10.0.0.5/24 on eth0"
    assert guardian.report({eth0[0]: errno.EPERM}) == (
        "could not remove 10.0.0.5/24 on eth0: Operation not permitted")
    assert guardian.report({eth0[1]: errno.EADDRNOTAVAIL}) == ""


def test_the_guardian_is_a_small_program() -> None:
    """Its whole memory is the interpreter's and the standard library's few modules it imports."""
    code = ("import sys, hasync.guardian; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyroute2', 'asyncio', 'pydantic', 'yaml')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
