"""A stand-in for Home Assistant in a node's network namespace: ``python -m harness.standin_ha NODE``
answers every GET on port 8123, on all addresses (IPv4 and IPv6), with the node's name (so a client of the floating IP
knows which node answered). It prints ``READY`` once listening and runs until SIGTERM."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = 8123


class DualStackServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 clients too, as mapped addresses
        super().server_bind()


def serve(node: str, port: int) -> None:
    body = node.encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per request, 40 a second: nobody reads them

    server = DualStackServer(("::", port), Handler)  # all addresses: the floating IPs too
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("READY", flush=True)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("node")
    parser.add_argument("--port", type=int, default=PORT)
    args = parser.parse_args()
    serve(args.node, args.port)


if __name__ == "__main__":
    main()
