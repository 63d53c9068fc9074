"""A host's interfaces in memory: the fake of ``hasync.vip``'s seams (``Netlink`` and ``Announcer``).

``FakeHost`` answers as the kernel does where hasync relies on it: adding an address that is there is
``EXISTS``, removing one that is not is ``False``, an unknown interface is ``NO_INTERFACE``, and without
``CAP_NET_ADMIN`` (``admin=False``) every change is ``PERMISSION``. ``hang`` makes netlink calls never
answer (the driver's timeout must end them), ``delay`` makes them slow. An address added or refreshed
with a ``Lifetime`` gets its whole seconds, computed when the request is taken, and the fake kernel removes
it ``lag`` seconds after they end (the real one: up to ``ADDRESS_LIFETIME_LAG``); a refresh of an address
that has lapsed adds it again. Every change (``expire`` included, at the time the kernel removed it) and
announcement is logged with the loop's time, so a test can say when an address came and went.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hasync.config import VipAddress
from hasync.vip import Lifetime, VipError, VipErrorKind


@dataclass
class FakeHost:
    interfaces: dict[str, set[str]] = field(default_factory=lambda: {"eth0": set()})
    admin: bool = True  # CAP_NET_ADMIN
    raw: bool = True  # CAP_NET_RAW
    hang: bool = False
    delay: float = 0.0  # s each netlink request takes (a busy host)
    lag: float = 0.0  # s after its lifetime ends that the kernel removes an address
    # (time, "add"/"refresh"/"remove"/"expire"/"announce", address)
    log: list[tuple[float, str, str]] = field(default_factory=list)
    lifetimes: dict[tuple[str, str], float] = field(default_factory=dict)  # (interface, address) -> its removal
    seconds: list[int] = field(default_factory=list)  # every lifetime given, in order

    def addresses(self, interface: str = "eth0") -> set[str]:
        self._expire()
        return set(self.interfaces.get(interface, set()))

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _expire(self) -> None:
        now = self._now()
        for (interface, address), at in sorted(self.lifetimes.items(), key=lambda item: item[1]):
            if at <= now:
                del self.lifetimes[(interface, address)]
                self.interfaces.get(interface, set()).discard(address)
                self.log.append((at, "expire", address))

    async def _kernel(self, vip: VipAddress) -> set[str]:
        await asyncio.sleep(0)  # a request's round trip
        if self.hang:
            await asyncio.Event().wait()
        if vip.interface not in self.interfaces:
            raise VipError(VipErrorKind.NO_INTERFACE, f"no interface {vip.interface}")
        if not self.admin:
            raise VipError(VipErrorKind.PERMISSION, "Operation not permitted")
        self._expire()
        return self.interfaces[vip.interface]

    def _start(self, vip: VipAddress, lifetime: Lifetime | None) -> int | None:
        key = (vip.interface, vip.address)
        if lifetime is None:
            self.lifetimes.pop(key, None)
            return None
        seconds = lifetime.seconds(self._now())
        self.seconds.append(seconds)
        self.lifetimes[key] = self._now() + seconds + self.lag
        return seconds

    async def add(self, vip: VipAddress, lifetime: Lifetime | None = None) -> int | None:
        addresses = await self._kernel(vip)
        if vip.address in addresses:
            raise VipError(VipErrorKind.EXISTS, f"{vip.address} is on {vip.interface} already")
        seconds = self._start(vip, lifetime)
        addresses.add(vip.address)
        self.log.append((self._now(), "add", vip.address))
        await asyncio.sleep(self.delay)  # (the worst case for an overlap: an add counts at once...)
        return seconds

    async def refresh(self, vip: VipAddress, lifetime: Lifetime) -> int:
        addresses = await self._kernel(vip)
        seconds = self._start(vip, lifetime)
        assert seconds is not None
        if vip.address not in addresses:  # lapsed: the kernel adds it again
            addresses.add(vip.address)
            self.log.append((self._now(), "add", vip.address))
        self.log.append((self._now(), "refresh", vip.address))
        await asyncio.sleep(self.delay)
        return seconds

    async def remove(self, vip: VipAddress) -> bool:
        await asyncio.sleep(self.delay)  # (... and a removal only at the end of its request)
        addresses = await self._kernel(vip)
        if vip.address not in addresses:
            return False
        addresses.remove(vip.address)
        self.lifetimes.pop((vip.interface, vip.address), None)
        self.log.append((self._now(), "remove", vip.address))
        return True

    def announce(self, vip: VipAddress) -> None:
        if vip.interface not in self.interfaces:
            raise VipError(VipErrorKind.NO_INTERFACE, f"no interface {vip.interface}")
        if not self.raw:
            raise VipError(VipErrorKind.PERMISSION, "Operation not permitted")
        self.log.append((self._now(), "announce", vip.address))

    def times(self, what: str) -> list[float]:
        self._expire()
        return sorted(t for t, op, _ in self.log if op == what)
