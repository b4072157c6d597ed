"""HTTP probes for the kubelet: /healthz (the loop is alive), /readyz (registered),
and for `stc-npu-agent diagnose`: /status (the agent's own view as JSON) and
/allocate?id=ID[&id=ID...] (what Allocate would answer now, as JSON).

Served from a thread of its own, so a stuck asyncio loop cannot also stall
the probe that reports it. Off unless an address is configured.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

# The loop beats every second; this many seconds of silence means stuck.
STALE_AFTER = 10.0


class ProbeTarget(Protocol):
    heartbeat: float

    @property
    def ready(self) -> bool: ...

    def status(self) -> dict[str, object]: ...

    def allocation(self, ids: Sequence[str]) -> dict[str, object]: ...


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT; an empty host means every address."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"probe address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _DualStackServer(_IPv6Server):
    """Listens on :: for IPv6 and, through mapped addresses, IPv4 too."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def _listen(host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    # The kubelet probes the pod IP, which is IPv6 in an IPv6-only cluster:
    # an empty host listens on both families where the node has IPv6, and
    # on IPv4 alone where it does not.
    if not host:
        try:
            return _DualStackServer(("::", port), handler)
        except OSError:
            return ThreadingHTTPServer(("0.0.0.0", port), handler)  # noqa: S104 (see above)
    if ":" in host:
        return _IPv6Server((host, port), handler)
    return ThreadingHTTPServer((host, port), handler)


class ProbeServer:
    def __init__(self, address: str, target: ProbeTarget) -> None:
        self.target = target
        host, port = parse_address(address)
        self._server = _listen(host, port, self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="probes", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        target = self.target

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    age = time.monotonic() - target.heartbeat
                    ok, text = age < STALE_AFTER, f"loop heartbeat {age:.1f} s ago"
                elif self.path == "/readyz":
                    ok = target.ready
                    text = "registered and streaming" if ok else "not registered with the kubelet"
                elif self.path == "/status":
                    ok, text = True, json.dumps(target.status(), sort_keys=True)
                elif urlsplit(self.path).path == "/allocate":
                    ids = parse_qs(urlsplit(self.path).query).get("id", [])
                    ok, text = True, json.dumps(target.allocation(ids), sort_keys=True)
                else:
                    self.send_error(404)
                    return
                body = (text + "\n").encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes every few seconds would drown the log

        return Handler

    def start(self) -> None:
        self._thread.start()
        host, port = str(self._server.server_address[0]), self.port
        shown = f"[{host}]" if ":" in host else host
        log.info("probes on http://%s:%d (/healthz, /readyz, /status)", shown, port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
