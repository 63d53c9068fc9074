"""The two-node home end to end (harness.home), one run of each fault: hasync's floating IPs (IPv4 and IPv6) and
the dnsmasq recipe, fenced (the default), and keepalived with the seed's configuration and dnsmasq in its notify
scripts beside it as the anchor (its known behaviour asserted, so the measurement itself is checked: a detector
that never sees two holders or two DHCP servers would pass hasync's checks for nothing). The client asks HTTP
(IPv4, IPv6), DNS and DHCP throughout. The figures, repeated and side by side, and hasync with its resources kept
through a broker loss, are the benchmark ``home-keepalived`` (bench/home.py); kept's behaviour is asserted in
tests/test_dnsmasq_netns.py. Root, iproute2, iptables, mosquitto, dnsmasq, busybox and keepalived needed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.home import (
    ADVERT_INT,
    PRODUCTION,
    Fault,
    HasyncPair,
    Home,
    KeepalivedPair,
    Sample,
    System,
    keepalived_binary,
    running,
    unavailable,
)

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

HOLD = 1.0
LEASE = PRODUCTION["lease_duration"]
MASTER_DOWN = 3 * ADVERT_INT + (256 - 100) / 256 * ADVERT_INT  # the backup's timer, its skew with priority 100
# s: the longest outage that counts as none: one attempt's timeout (harness.homeprobe's 0.5 s), for the attempts
# the shared machine's load loses (0.33 s seen at a load of 9 on 2 cores); a failover's gap is seconds.
NO_FAILURE = 0.5
# The faults under which fenced resources are never held twice: no instant with the floating IPs on both nodes
# (ADDRESSES), no DHCP exchange that two servers answer (DHCP). A killed agent's addresses are removed by its
# guardian, a frozen one's lapse (their kernel lifetime); its dnsmasq, a process the hook started, is stopped by the
# guardian's fence command (hooks.fence): at once when the agent dies, at its deadline when it is frozen.
FENCED_NEVER_TWICE_ADDRESSES = frozenset(Fault)
FENCED_NEVER_TWICE_DHCP = frozenset(Fault)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    why = unavailable() or (None if keepalived_binary() else "keepalived is not installed")
    if why is not None:
        pytest.skip(why)
    with Home(Path(tmp_path_factory.mktemp("home")), hold=HOLD) as built:
        yield built


@pytest.fixture(scope="module", params=["hasync", "keepalived"])
def pair(request: pytest.FixtureRequest, home: Home) -> Iterator[System]:
    system: System = HasyncPair(home) if request.param == "hasync" else KeepalivedPair(home)
    with running(system, home):
        yield system


def measured(home: Home, pair: System, fault: Fault) -> Sample:
    if not pair.supports(fault):
        pytest.skip(f"{pair.name} has no {fault} fault")
    started = time.monotonic()
    sample = home.measure(pair, fault)
    print(sample)
    failed = [f"{a.probe} {a.start - started:.3f}+{a.end - a.start:.3f} {a.error}" for a in home.client.attempts
              if not a.ok and a.start >= started and a.probe in pair.probes]
    print(f"{len(failed)} failed attempts (s since the measurement began):", *failed[:40], sep="\n  ")
    assert sample.new != sample.old or fault == Fault.BROKER
    if isinstance(pair, HasyncPair) and fault in FENCED_NEVER_TWICE_ADDRESSES:
        assert sample.two_holders == {"ipv4": 0, "ipv6": 0}, sample
    if isinstance(pair, HasyncPair) and fault in FENCED_NEVER_TWICE_DHCP:
        assert sample.two_dhcp.count == 0, sample
    return sample


def switched(sample: Sample, within: float = 0.5) -> None:
    """The client's neighbour entries (ARP; IPv6 where the system moves an IPv6 address) moved to the new holder's
    MAC, from its announcement, not by asking after a timeout: at most ``within`` after it first answered."""
    for family, moved in sample.moved.items():
        assert moved is not None, f"the client's {family} neighbour entry never pointed at the new holder"
        assert moved <= sample.failover + within, sample


def held_twice(sample: Sample) -> None:
    """keepalived, which fences nothing: the address on both nodes and both DHCP servers answering while the fault
    stands (the detectors see what hasync's checks count on them to see)."""
    assert sample.two_holders["ipv4"] >= HOLD * 0.9, sample
    assert sample.two_dhcp.count > 0, sample


@pytest.mark.timeout(90)
def test_kill(home: Home, pair: System) -> None:
    sample = measured(home, pair, Fault.KILL)
    switched(sample)
    # The old node's HA keeps answering (hasync: on the new holder as soon as it has the address, the guardian
    # having removed it from the old one first): no request fails either way, but DNS on the new holder answers
    # only once its promote hook (notify_master) has started dnsmasq. DHCP: keepalived's old dnsmasq answers on;
    # hasync's is fenced at once, the new one answers a moment later.
    assert sample.outage["http"] <= NO_FAILURE and sample.outage["dhcp"] <= NO_FAILURE
    assert sample.outage["dns"] <= 1.0
    if isinstance(pair, HasyncPair):
        assert sample.failover <= 1.0  # the Last Will, not the lease
        assert sample.outage["http6"] <= NO_FAILURE
    else:
        # The old node's kernel keeps the address and its HA keeps answering: no request fails.
        assert MASTER_DOWN - ADVERT_INT - 0.1 <= sample.failover <= MASTER_DOWN + 1.0  # from the last advert
        held_twice(sample)


@pytest.mark.timeout(90)
def test_sigstop(home: Home, pair: System) -> None:
    sample = measured(home, pair, Fault.STOP)
    switched(sample)
    if isinstance(pair, HasyncPair):
        # The frozen node's dnsmasq is fenced at its deadline (renew deadline + 0.5 s), the other's starts a lease
        # after the last renewal: DHCP is down for about half a second in between.
        assert 0 < sample.outage["dhcp"] <= LEASE - 2.0 + 1.0, sample
        assert LEASE - 0.6 <= sample.failover <= LEASE + 1.0
        # The kernel ends the frozen node's addresses a lifetime (1 s) after its last renewal came back, before
        # a lease of silence lets the other claim: nobody answers on them in between.
        for probe in ("http", "http6"):
            assert 0 < sample.outage[probe] <= LEASE - 1.0 + 0.5, (probe, sample)
        assert 0 < sample.outage["dns"] <= LEASE - 1.0 + 1.0  # and the new holder's dnsmasq starting
    else:
        # Nothing fences a frozen keepalived: the address stays until SIGCONT, then goes at once; its dnsmasq answers
        # on (broadcast, no address needed).
        assert sample.outage["dhcp"] <= NO_FAILURE
        assert sample.outage["http"] <= NO_FAILURE and sample.outage["dns"] <= 1.0
        assert MASTER_DOWN - ADVERT_INT - 0.1 <= sample.failover <= MASTER_DOWN + 1.0  # from the last advert
        held_twice(sample)


@pytest.mark.timeout(90)
def test_link_down(home: Home, pair: System) -> None:
    sample = measured(home, pair, Fault.LINK)
    switched(sample)
    if isinstance(pair, HasyncPair):  # removed at the renew deadline, before the other may claim
        assert max(sample.outage.values()) <= LEASE + 1.0
    else:
        assert MASTER_DOWN - ADVERT_INT - 0.1 <= sample.outage["http"] <= MASTER_DOWN + 1.0


@pytest.mark.timeout(120)
def test_cut(home: Home, pair: System) -> None:
    """hasync: the primary cut off from the broker only; keepalived: the two nodes from each other."""
    sample = measured(home, pair, Fault.CUT)
    switched(sample)
    if isinstance(pair, HasyncPair):
        # Removed renew_deadline after its last echoed renewal, claimed a lease after it: about 1 s without.
        assert max(sample.outage.values()) <= LEASE - PRODUCTION["renew_deadline"] + 1.0
    else:
        held_twice(sample)  # both masters while cut
        assert sample.outage["http"] <= NO_FAILURE


@pytest.mark.timeout(90)
def test_broker_killed(home: Home, pair: System) -> None:
    sample = measured(home, pair, Fault.BROKER)
    # Fenced (the default): the addresses and dnsmasq go with the broker and come back a lease after reconnecting.
    assert all(0 < sample.outage[p] <= LEASE + 5.0 for p in ("http", "http6", "dns", "dhcp")), sample


@pytest.mark.timeout(90)
def test_step_down(home: Home, pair: System) -> None:
    sample = measured(home, pair, Fault.STEP_DOWN)
    switched(sample)
    if isinstance(pair, HasyncPair):
        # Released only once the addresses are gone and the demote hook has stopped dnsmasq; the outage is that
        # handover (demotion → the successor's promotion, the demote hook's time in it), little more.
        handover = pair.handover(sample.old, sample.new)
        assert handover is not None
        print(f"demotion to promotion: {handover:.3f} s")
        assert sample.outage["http"] <= handover + 0.5 and sample.outage["http6"] <= handover + 0.5
        assert sample.outage["dns"] <= handover + 1.0 and sample.outage["dhcp"] <= handover + 1.0
    else:
        assert sample.outage["http"] <= 1.5  # priority 0: the backup takes over after its skew time
