"""A small netem for kernels without ``sch_netem``: delay, jitter and loss of the packets iptables sends to
an NFQUEUE, over raw netlink (no library, no compiler).

Run it inside the network namespace whose packets it should shape (NFQUEUE is per namespace), after
``iptables -A OUTPUT -j NFQUEUE --queue-num N`` (and INPUT, for both directions)::

    python -m harness.netem --queue 0 --delay 0.2 --jitter 0.15 --loss 0.1 --seconds 60

Every queued packet is dropped with chance ``loss`` (TCP retransmits it, as on a lossy link), or
accepted ``delay`` +- ``jitter`` seconds later (uniform; like netem with jitter, packets may overtake
each other). It prints ``READY`` once bound, and at exit one line of counts. After ``--seconds`` it
accepts everything at once (a verdict no longer waits) until it is stopped or the rule is removed;
packets still queued when it exits are dropped by the kernel, which TCP recovers from.
"""

from __future__ import annotations

import argparse
import heapq
import random
import selectors
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS = 1, 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_DROP, NF_ACCEPT = 0, 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR, NLMSG_DONE = 2, 3


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(msg_type: int, queue: int, attrs: bytes, seq: int, flags: int = NLM_F_REQUEST) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs  # nfgenmsg
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0) + body


def _attrs(data: bytes) -> dict[int, bytes]:
    found = {}
    while len(data) >= 4:
        length, kind = struct.unpack_from("=HH", data)
        if length < 4:
            break
        found[kind & 0x7FFF] = data[4:length]
        data = data[(length + 3) & ~3:]
    return found


class Queue:
    def __init__(self, number: int) -> None:
        self.number = number
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._seq = 0
        self._config(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)))
        self._config(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0xFFFF, NFQNL_COPY_META)))

    def _config(self, attrs: bytes) -> None:
        self._seq += 1
        self.sock.send(_message(NFQNL_MSG_CONFIG, self.number, attrs, self._seq, NLM_F_REQUEST | NLM_F_ACK))
        reply = self.sock.recv(65536)
        _, msg_type, _, _, _ = struct.unpack_from("=IHHII", reply)
        if msg_type == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", reply, 16)
            if error:
                raise OSError(-error, f"NFQUEUE config refused: {error}")

    def packets(self) -> list[int]:
        """The ids of the packets in one read from the socket."""
        data = self.sock.recv(1 << 20)
        ids = []
        while len(data) >= 16:
            length, msg_type, _, _, _ = struct.unpack_from("=IHHII", data)
            if length < 16:
                break
            if msg_type == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                header = _attrs(data[20:length]).get(NFQA_PACKET_HDR)
                if header is not None:
                    ids.append(struct.unpack_from("!I", header)[0])
            data = data[(length + 3) & ~3:]
        return ids

    def verdict(self, packet_id: int, verdict: int) -> None:
        self._seq += 1
        attrs = _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))
        self.sock.send(_message(NFQNL_MSG_VERDICT, self.number, attrs, self._seq))


def run(queue: Queue, counts: dict[str, int], *, delay: float, jitter: float, loss: float, seconds: float,
        seed: int | None) -> None:
    rng = random.Random(seed)
    due: list[tuple[float, int]] = []
    end = time.monotonic() + seconds
    selector = selectors.DefaultSelector()
    selector.register(queue.sock, selectors.EVENT_READ)
    while True:
        now = time.monotonic()
        while due and due[0][0] <= now:
            queue.verdict(heapq.heappop(due)[1], NF_ACCEPT)
        timeout = max(0.0, due[0][0] - now) if due else 0.5
        if not selector.select(timeout):
            continue
        shaping = time.monotonic() < end
        for packet_id in queue.packets():
            counts["packets"] += 1
            if not shaping:
                queue.verdict(packet_id, NF_ACCEPT)
            elif rng.random() < loss:
                counts["dropped"] += 1
                queue.verdict(packet_id, NF_DROP)
            else:
                counts["delayed"] += 1
                heapq.heappush(due, (time.monotonic() + max(0.0, delay + rng.uniform(-jitter, jitter)), packet_id))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--jitter", type=float, default=0.15)
    parser.add_argument("--loss", type=float, default=0.1)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    queue = Queue(args.queue)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("READY", flush=True)
    counts = {"packets": 0, "dropped": 0, "delayed": 0}
    try:
        run(queue, counts, delay=args.delay, jitter=args.jitter, loss=args.loss, seconds=args.seconds,
            seed=args.seed)
    except KeyboardInterrupt:
        pass
    finally:
        print(" ".join(f"{k}={v}" for k, v in counts.items()), flush=True)


if __name__ == "__main__":
    main()
