"""A host's interfaces in memory: the fake of ``hasync.vip``'s seams (``Netlink`` and ``Announcer``).

``FakeHost`` answers as the kernel does where hasync relies on it: adding an address that is there is
``EXISTS``, removing one that is not is ``False``, an unknown interface is ``NO_INTERFACE``, and without
``CAP_NET_ADMIN`` (``admin=False``) every change is ``PERMISSION``. ``hang`` makes netlink calls never
answer (the driver's timeout must end them), ``delay`` makes them slow. Every change and announcement is
logged with the loop's time, so a test can say when an address came and went.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hasync.config import VipAddress
from hasync.vip import VipError, VipErrorKind


@dataclass
class FakeHost:
    interfaces: dict[str, set[str]] = field(default_factory=lambda: {"eth0": set()})
    admin: bool = True  # CAP_NET_ADMIN
    raw: bool = True  # CAP_NET_RAW
    hang: bool = False
    delay: float = 0.0  # s each netlink request takes (a busy host)
    log: list[tuple[float, str, str]] = field(default_factory=list)  # (time, "add"/"remove"/"announce", address)

    def addresses(self, interface: str = "eth0") -> set[str]:
        return set(self.interfaces.get(interface, set()))

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def _kernel(self, vip: VipAddress) -> set[str]:
        await asyncio.sleep(0)  # a request's round trip
        if self.hang:
            await asyncio.Event().wait()
        if vip.interface not in self.interfaces:
            raise VipError(VipErrorKind.NO_INTERFACE, f"no interface {vip.interface}")
        if not self.admin:
            raise VipError(VipErrorKind.PERMISSION, "Operation not permitted")
        return self.interfaces[vip.interface]

    async def add(self, vip: VipAddress) -> None:
        addresses = await self._kernel(vip)
        if vip.address in addresses:
            raise VipError(VipErrorKind.EXISTS, f"{vip.address} is on {vip.interface} already")
        addresses.add(vip.address)
        self.log.append((self._now(), "add", vip.address))
        await asyncio.sleep(self.delay)  # (the worst case for an overlap: an add counts at once...)

    async def remove(self, vip: VipAddress) -> bool:
        await asyncio.sleep(self.delay)  # (... and a removal only at the end of its request)
        addresses = await self._kernel(vip)
        if vip.address not in addresses:
            return False
        addresses.remove(vip.address)
        self.log.append((self._now(), "remove", vip.address))
        return True

    def announce(self, vip: VipAddress) -> None:
        if vip.interface not in self.interfaces:
            raise VipError(VipErrorKind.NO_INTERFACE, f"no interface {vip.interface}")
        if not self.raw:
            raise VipError(VipErrorKind.PERMISSION, "Operation not permitted")
        self.log.append((self._now(), "announce", vip.address))

    def times(self, what: str) -> list[float]:
        return [t for t, op, _ in self.log if op == what]
