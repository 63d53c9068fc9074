"""The guardian: a child of the agent that takes the floating IPs off this host the moment the agent dies.

A process killed with ``kill -9`` (or by the OOM killer, or a crash in the interpreter) runs no code of its
own: its addresses would stay on the interface while the broker publishes its Last Will and another node
is elected at once (hasync.election, "Last Will") and adds them too. The kernel does one thing for every
dead process: it closes its file descriptors. The agent starts this process (``hasync.vip.Guardian``,
``python -m hasync.guardian INTERFACE ADDRESS/LEN ...``) with the read end of a pipe as its standard
input and keeps the only write end; when the agent's process ends, for whatever reason, the read below
returns end of file and the guardian removes the addresses (an ``RTM_DELADDR`` each, on a netlink socket
opened at start: nothing is started, imported or opened on that path) and exits. While the agent lives,
it only waits: it never removes anything then, and it ignores SIGINT, SIGTERM and SIGHUP (a Ctrl-C or a
service manager signals the whole group; the agent hands over and removes the addresses itself, and the
guardian leaves when the agent has gone).

It is a race, not a guarantee: the guardian wakes when the dying agent's descriptors are closed, which
is also when its connection to the broker is; the new primary needs the broker to publish the will, a
claim and a renewal to come back to it, and a netlink call of its own (measured: README, "Floating IP").
If the guardian is killed too (a whole process group, a cgroup), the addresses' lifetimes end them
(hasync.vip, "Lifetimes"); the systemd unit's ``ExecStopPost`` runs ``hasync vip-release`` besides.

This module imports only the standard library: it is the guardian's whole program, and its memory.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import NamedTuple

# linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h
NETLINK_ROUTE = 0
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x01, 0x04
RTM_DELADDR = 21
IFA_ADDRESS, IFA_LOCAL = 1, 2
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port (host byte order)
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, interface index
_ATTR = struct.Struct("=HH")  # rtattr: length, type
ACK_TIMEOUT = 2.0  # s the kernel has to answer (it answers in the send call itself)
READY, DENIED = "ready", "denied"  # the first word the guardian writes: it may remove addresses, or not


class Target(NamedTuple):
    interface: str
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface

    def __str__(self) -> str:
        return f"{self.address} on {self.interface}"


def targets(argv: Sequence[str]) -> list[Target]:
    """``INTERFACE ADDRESS/LEN`` pairs (an interface name may contain ``@``, so no separator inside one)."""
    if len(argv) % 2:
        raise ValueError("expected INTERFACE ADDRESS/LEN pairs")
    return [Target(argv[i], ipaddress.ip_interface(argv[i + 1])) for i in range(0, len(argv), 2)]


def _attr(kind: int, data: bytes) -> bytes:
    return (_ATTR.pack(_ATTR.size + len(data), kind) + data).ljust((_ATTR.size + len(data) + 3) & ~3, b"\0")


def deladdr(address: ipaddress.IPv4Interface | ipaddress.IPv6Interface, index: int, seq: int) -> bytes:
    """``RTM_DELADDR`` of ``address`` on the interface ``index``, asking for an acknowledgement: what
    ``ip addr del ADDRESS/LEN dev IFACE`` sends (local and address both the address itself)."""
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    body = (_IFADDRMSG.pack(family, address.network.prefixlen, 0, 0, index)
            + _attr(IFA_LOCAL, address.ip.packed) + _attr(IFA_ADDRESS, address.ip.packed))
    return _HEADER.pack(_HEADER.size + len(body), RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def acknowledgements(data: bytes) -> dict[int, int]:
    """``{sequence: errno}`` of the ``NLMSG_ERROR`` messages in one datagram (0: done)."""
    acks: dict[int, int] = {}
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _, seq, _ = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            break
        if kind == NLMSG_ERROR and length >= _HEADER.size + 4:
            acks[seq] = -struct.unpack_from("=i", data, offset + _HEADER.size)[0]
        offset += (length + 3) & ~3
    return acks


def open_netlink() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    sock.bind((0, 0))
    sock.settimeout(ACK_TIMEOUT)
    return sock


def may_remove(sock: socket.socket) -> bool:
    """Whether this process may change addresses: a removal on interface index 0, which never exists, is
    refused with EPERM without ``CAP_NET_ADMIN`` and with ENODEV with it."""
    sock.send(deladdr(ipaddress.ip_interface("192.0.2.1/32"), 0, 1))
    return acknowledgements(sock.recv(65536)).get(1) not in (errno.EPERM, errno.EACCES)


def remove(sock: socket.socket, what: Sequence[Target]) -> dict[Target, int]:
    """Remove the addresses; ``{target: errno}``, 0 where one was removed (EADDRNOTAVAIL: it was not there,
    ENODEV: no such interface, ETIMEDOUT: no answer)."""
    outcome: dict[Target, int] = {}
    sent: dict[int, Target] = {}
    for seq, target in enumerate(what, start=2):
        try:
            index = socket.if_nametoindex(target.interface)
        except OSError:
            outcome[target] = errno.ENODEV
            continue
        try:
            sock.send(deladdr(target.address, index, seq))
        except OSError as exc:
            outcome[target] = exc.errno or errno.EIO
            continue
        sent[seq] = target
    try:
        while sent:
            for seq, code in acknowledgements(sock.recv(65536)).items():
                if seq in sent:
                    outcome[sent.pop(seq)] = code
    except OSError:  # (TimeoutError included)
        outcome.update((target, errno.ETIMEDOUT) for target in sent.values())
    return outcome


def report(outcome: dict[Target, int]) -> str:
    """One line: what was removed, and what could not be (what was not there is not news)."""
    removed = [str(t) for t, code in outcome.items() if code == 0]
    failed = [f"{t}: {os.strerror(code)}" for t, code in outcome.items() if code not in (0, errno.EADDRNOTAVAIL)]
    parts = ([f"removed {', '.join(removed)}"] if removed else []) + (
        [f"could not remove {'; '.join(failed)}"] if failed else [])
    return "; ".join(parts)


def prioritise() -> str:
    """Be scheduled first when the agent dies, ahead of the broker and the other node's agent racing to elect
    and add the addresses (it runs a few system calls, then exits): the real-time class if this process may
    (CAP_SYS_NICE, root), else a lower nice value, else as it is."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError:
        pass
    else:
        return "real-time"
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except OSError:
        return "normal priority"
    return "nice -10"


def main(argv: Sequence[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    what = targets(argv)
    agent = os.getppid()
    sock = open_netlink()
    allowed = may_remove(sock)
    print(f"{READY} ({prioritise()})" if allowed else DENIED, flush=True)
    sys.stdout.close()
    if not allowed:
        return 1
    while os.read(0, 4096):  # the agent writes nothing: only its end of the pipe closing matters
        pass
    started = time.monotonic()
    line = report(remove(sock, what))
    if line:
        print(f"hasync guardian: the agent (pid {agent}) is gone: {line} "
              f"({(time.monotonic() - started) * 1000:.1f} ms)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
