"""The guardian: a child of the agent that takes this node's fenced resources down when the agent cannot.

A process killed with ``kill -9`` (or by the OOM killer, or a crash in the interpreter) runs no code of its
own, and a frozen one (SIGSTOP, a stalled disk) runs none until it is thawed: its floating IPs would stay on
the interface and the services its promote hook started (dnsmasq: DHCP and DNS for the house) would go on
answering, while the broker publishes its Last Will (or a lease of silence passes) and another node is
elected and starts its own. This process does for the agent what the agent no longer can:

* **The agent died.** The kernel does one thing for every dead process: it closes its file descriptors. The
  agent starts this process (``hasync.fence.Guardian``: ``python -m hasync.guardian [--fence COMMAND
  --fence-timeout S] [INTERFACE ADDRESS/LEN ...]``) with the read end of a pipe as its standard input and
  keeps the only write end; when the agent's process ends, for whatever reason, the read returns end of
  file and the guardian removes the addresses (an ``RTM_DELADDR`` each, on a netlink socket opened at start:
  nothing is imported or opened on that path), then runs the fence command (``hooks.fence``) if the agent
  was primary, and exits.
* **The agent stalled.** While primary, the agent writes ``arm DEADLINE TERM`` on the pipe each time the
  election extends its acting deadline (``DEADLINE``: ``CLOCK_MONOTONIC`` seconds, which every process on
  the host shares); once its demote hook has run it writes ``disarm``. A deadline that passes while armed
  means the agent neither renewed nor stepped down in time: the guardian runs the fence command then, before
  another node may be elected, and tells the agent (``fenced stalled ...`` on its standard output): a
  thawed agent that is still primary runs its promote hook again. ``arm inf TERM``: only the agent's death
  fences (``hooks.on_broker_loss: kept``, whose services outlive a broker outage and so a stall).

The fence command runs like a hook (``/bin/sh -c``, its own process group, killed at its timeout) with
``HASYNC_EVENT=fence``, ``HASYNC_REASON`` (``agent died`` or ``agent stalled``), ``HASYNC_TERM``, at normal
scheduling priority, its output on the guardian's standard error (the agent's log). While the agent lives
and renews, the guardian only waits: it never removes anything then, and it ignores SIGINT, SIGTERM and
SIGHUP (a Ctrl-C or a service manager signals the whole group; the agent hands over itself, and the
guardian leaves when the agent has gone: disarmed, it runs nothing).

It is a race, not a guarantee, for a dead agent: the guardian wakes when the dying agent's descriptors are
closed, which is also when its connection to the broker is; the new primary needs the broker to publish the
will, a claim and a renewal to come back to it, and a netlink call or a hook of its own (measured: README,
"Floating IP" and "The dnsmasq recipe"). For a stalled agent it is a deadline with room to spare. If the
guardian is killed too (a whole process group, a cgroup), the addresses' lifetimes end them (hasync.vip,
"Lifetimes") and nothing stops the hooks' services; the systemd unit's ``ExecStopPost`` runs ``hasync
fence`` (the addresses off, the fence command run) once the whole unit is down.

This module imports only the standard library: it is the guardian's whole program, and its memory.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import os
import select
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
READY, DENIED = "ready", "denied"  # the first word the guardian writes: it may do its work, or not
ARM, DISARM, FENCED = "arm", "disarm", "fenced"  # the agent's words on the pipe; the guardian's after a fence
DIED, STALLED = "agent died", "agent stalled"  # HASYNC_REASON of a fence
MAX_LINE = 256  # bytes of one line on the pipe (``arm DEADLINE TERM`` is about 40); a longer one is dropped


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


class Options(NamedTuple):
    fence: str | None  # the command run when the agent dies or stalls while armed
    fence_timeout: float
    targets: list[Target]


def options(argv: Sequence[str]) -> Options:
    """``[--fence COMMAND --fence-timeout SECONDS] [INTERFACE ADDRESS/LEN ...]``"""
    fence, timeout, rest = None, 30.0, list(argv)
    if rest[:1] == ["--fence"]:
        if len(rest) < 4 or rest[2] != "--fence-timeout":
            raise ValueError("expected --fence COMMAND --fence-timeout SECONDS")
        fence, timeout, rest = rest[1], float(rest[3]), rest[4:]
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"the fence timeout must be a positive number of seconds, got {timeout}")
    return Options(fence, timeout, targets(rest))


class Armed(NamedTuple):
    deadline: float  # CLOCK_MONOTONIC; inf: only the agent's death fences
    term: str


def command(line: bytes) -> Armed | None:
    """One line from the agent: ``Armed`` for ``arm DEADLINE TERM``, None for ``disarm``; ValueError for anything
    else (ignored: a guardian must not be talked out of fencing by a line it cannot read)."""
    words = line.decode("ascii", errors="replace").split()
    if words == [DISARM]:
        return None
    if len(words) == 3 and words[0] == ARM and words[2].isdigit():
        deadline = float(words[1])  # (ValueError)
        if not math.isnan(deadline):
            return Armed(deadline, words[2])
    raise ValueError(f"not a guardian command: {line[:40]!r}")


class Commands:
    """The pipe's bytes into lines, bounded: a line longer than ``MAX_LINE`` is dropped whole."""

    def __init__(self) -> None:
        self._partial = b""
        self._dropping = False

    def feed(self, data: bytes) -> list[bytes]:
        *lines, rest = (self._partial + data).split(b"\n")
        if self._dropping and lines:
            lines, self._dropping = lines[1:], False
        self._partial = rest
        if len(rest) > MAX_LINE:
            self._partial, self._dropping = b"", True
        return [line for line in lines if len(line) <= MAX_LINE]


def fence(command: str, timeout: float, reason: str, term: str) -> str:
    """Run the fence command to its end (killed, with its process group, at ``timeout``); how it ended."""
    env = {**os.environ, "HASYNC_EVENT": "fence", "HASYNC_REASON": reason, "HASYNC_TERM": term,
           "HASYNC_ROLE": "standby"}
    try:
        pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", command], env, setpgroup=0,
                             file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                           (os.POSIX_SPAWN_DUP2, 2, 1)],
                             scheduler=(os.SCHED_OTHER, os.sched_param(0)))  # not the guardian's real-time class
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte
        return f"could not start: {exc}"
    status = _wait(pid, timeout)
    if status is None:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return f"timed out after {timeout:g} s; process group killed"
    code = os.waitstatus_to_exitcode(status)
    return "ok" if code == 0 else (f"exit status {code}" if code > 0 else f"killed by signal {-code}")


def _wait(pid: int, timeout: float) -> int | None:
    """The child's wait status once it has exited, None if it has not within ``timeout`` (still to be reaped)."""
    try:
        handle = os.pidfd_open(pid)
    except OSError:  # (a kernel before 5.3: poll for it)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return status
            time.sleep(0.005)
        return None
    try:
        if not select.select([handle], [], [], timeout)[0]:
            return None
    finally:
        os.close(handle)
    return os.waitpid(pid, 0)[1]


def say(line: str) -> None:
    """A line to the agent (its end may be gone: nothing to do then)."""
    with contextlib.suppress(OSError):
        print(line, flush=True)


def main(argv: Sequence[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    opts = options(argv)
    agent = os.getppid()
    sock = open_netlink() if opts.targets else None
    allowed = sock is not None and may_remove(sock)
    if not allowed and opts.fence is None:
        say(DENIED)
        return 1
    detail = "" if allowed or not opts.targets else "; may not remove addresses"
    say(f"{READY} ({prioritise()}{detail})")
    armed: Armed | None = None
    lines = Commands()
    poller = select.poll()
    poller.register(0, select.POLLIN)
    while True:
        if armed is not None and math.isfinite(armed.deadline) and time.monotonic() >= armed.deadline:
            assert opts.fence is not None
            started = time.monotonic()
            outcome = fence(opts.fence, opts.fence_timeout, STALLED, armed.term)
            print(f"hasync guardian: the agent (pid {agent}) stalled as primary of term {armed.term}: fence command "
                  f"{outcome} ({(time.monotonic() - started) * 1000:.1f} ms)", file=sys.stderr, flush=True)
            say(f"{FENCED} {armed.term} {outcome}")
            armed = None
        wait = None if armed is None or not math.isfinite(armed.deadline) else armed.deadline - time.monotonic()
        if not poller.poll(None if wait is None else max(0, math.ceil(wait * 1000))):
            continue
        data = os.read(0, 4096)
        if not data:
            break
        for received in lines.feed(data):
            with contextlib.suppress(ValueError):
                armed = command(received) if opts.fence is not None else None
    started = time.monotonic()
    done = [report(remove(sock, opts.targets))] if allowed and sock is not None else []
    if armed is not None and opts.fence is not None:
        done.append(f"fence command {fence(opts.fence, opts.fence_timeout, DIED, armed.term)}")
    summary = "; ".join(part for part in done if part)
    if summary:
        print(f"hasync guardian: the agent (pid {agent}) is gone: {summary} "
              f"({(time.monotonic() - started) * 1000:.1f} ms)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
