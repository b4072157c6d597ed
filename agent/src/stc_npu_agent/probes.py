"""HTTP probes for the kubelet: /healthz (the loop is alive), /readyz (registered),
and /status (the agent's own view as JSON, read by `stc-npu-agent diagnose`).

Served from a thread of its own, so a stuck asyncio loop cannot also stall
the probe that reports it. Off unless an address is configured.

The port is open to every pod on the node, so no client may make the server
spend more than a bound: one thread serves every connection (a selector, no
thread per connection); at most ``max_connections`` are held, and the oldest
is dropped when another comes; each connection has ``request_timeout``
seconds, from its accept, to send its request and take the answer; a request
is one GET (or HEAD) of at most ``MAX_REQUEST_BYTES``, answered and closed.

An endpoint is a function returning a ``Reply``: add it to ``routes``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol
from urllib.parse import parse_qs

from stc_npu_agent.core.config import NPU_EXPORTER_PORT

log = logging.getLogger(__name__)

# The loop beats every second; this many seconds of silence means stuck.
STALE_AFTER = 10.0
# The kubelet holds one connection per probe, for milliseconds; room for it,
# diagnose and a scraper with plenty to spare, and few enough that held
# connections cost nothing that matters (about 1 kB each in the agent).
MAX_CONNECTIONS = 64
# For the whole request and answer: the kubelet's own probe timeout is 1 s.
REQUEST_TIMEOUT = 5.0
# A probe request is a line and a few headers.
MAX_REQUEST_BYTES = 8192
# Pending connections the kernel keeps while the thread is busy.
BACKLOG = 128
# Out of file descriptors with nothing of ours to drop: stop accepting a while.
ACCEPT_PAUSE = 1.0

_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")


class ProbeTarget(Protocol):
    heartbeat: float

    @property
    def ready(self) -> bool: ...

    def status(self) -> dict[str, object]: ...

    def allocation(self, ids: Sequence[str]) -> dict[str, object]: ...


@dataclass(frozen=True)
class Reply:
    status: int
    text: str
    content_type: str = "text/plain; charset=utf-8"


# An endpoint gets the request's query parameters (name -> values).
Query = dict[str, list[str]]
Route = Callable[[Query], Reply]


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT; an empty host means every address."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"probe address must be HOST:PORT, got {address!r}")
    if int(port) == NPU_EXPORTER_PORT:
        # Scrapers of the exporter would find our metrics, or none at all.
        raise ValueError(f"port {NPU_EXPORTER_PORT} is the vendor's npu-exporter's: choose another")
    return host.strip("[]"), int(port)


def _listen(host: str, port: int) -> socket.socket:
    # The kubelet probes the pod IP, which is IPv6 in an IPv6-only cluster:
    # an empty host listens on both families where the node has IPv6, and
    # on IPv4 alone where it does not.
    if not host:
        try:
            return socket.create_server(
                ("::", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=BACKLOG
            )
        except (OSError, ValueError):  # ValueError: no IPv6 on this node
            return socket.create_server(("0.0.0.0", port), backlog=BACKLOG)  # noqa: S104 (see above)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


class _Connection:
    __slots__ = ("deadline", "outgoing", "received", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.received = b""
        self.outgoing = b""


class ProbeServer:
    def __init__(
        self,
        address: str,
        target: ProbeTarget,
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.target = target
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.routes: dict[str, Route] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/status": self._status,
            "/allocate": self._allocate,
        }
        host, port = parse_address(address)
        self._listener = _listen(host, port)
        self._listener.setblocking(False)
        # Oldest first: accept order is also deadline order.
        self._connections: dict[socket.socket, _Connection] = {}
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._accept_paused_until: float | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="probes", daemon=True)

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    # --- the endpoints ---

    def _healthz(self, query: Query) -> Reply:
        age = time.monotonic() - self.target.heartbeat
        return Reply(200 if age < STALE_AFTER else 503, f"loop heartbeat {age:.1f} s ago")

    def _readyz(self, query: Query) -> Reply:
        if self.target.ready:
            return Reply(200, "registered and streaming")
        return Reply(503, "not registered with the kubelet")

    def _status(self, query: Query) -> Reply:
        return Reply(200, json.dumps(self.target.status(), sort_keys=True))

    def _allocate(self, query: Query) -> Reply:
        """What Allocate would answer now for ``?id=A&id=B`` (read-only)."""
        return Reply(200, json.dumps(self.target.allocation(query.get("id", [])), sort_keys=True))

    # --- lifecycle ---

    def start(self) -> None:
        self._thread.start()
        host = str(self._listener.getsockname()[0])
        shown = f"[{host}]" if ":" in host else host
        log.info("probes on http://%s:%d (%s)", shown, self.port, ", ".join(self.routes))

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for connection in list(self._connections.values()):
            self._close(connection)
        self._selector.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    # --- the serving thread ---

    def _serve(self) -> None:
        while not self._stopping:
            try:
                self._serve_once()
            except Exception:  # a bug here must not end the probes unseen
                log.exception("probe server: unexpected error (serving on)")
                time.sleep(0.1)

    def _serve_once(self) -> None:
        events = self._selector.select(self._select_timeout())
        for key, mask in events:
            if key.fileobj is self._listener:
                self._accept()
            elif key.fileobj is self._wake_r:
                return
            else:
                connection: _Connection = key.data
                if mask & selectors.EVENT_READ:
                    self._read(connection)
                elif mask & selectors.EVENT_WRITE:
                    self._write(connection)
        now = time.monotonic()
        while self._connections:
            oldest = next(iter(self._connections.values()))
            if oldest.deadline > now:
                break
            self._close(oldest)
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            self._selector.register(self._listener, selectors.EVENT_READ)

    def _select_timeout(self) -> float | None:
        oldest = next(iter(self._connections.values()), None)
        wake_at = [] if oldest is None else [oldest.deadline]
        if self._accept_paused_until is not None:
            wake_at.append(self._accept_paused_until)
        if not wake_at:
            return None
        return max(0.0, min(wake_at) - time.monotonic())

    def _accept(self) -> None:
        for _ in range(BACKLOG):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            except OSError as error:
                # Out of file descriptors or memory: make room if we hold any,
                # else stop accepting a while (the listener would stay readable).
                if self._connections:
                    self._close(next(iter(self._connections.values())))
                    continue
                log.warning("probe server cannot accept (%s): pausing", error.strerror)
                self._selector.unregister(self._listener)
                self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE
                return
            if len(self._connections) >= self.max_connections:
                self._close(next(iter(self._connections.values())))
            sock.setblocking(False)
            connection = _Connection(sock, time.monotonic() + self.request_timeout)
            self._connections[sock] = connection
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _read(self, connection: _Connection) -> None:
        try:
            chunk = connection.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self._close(connection)
            return
        if not chunk:
            self._close(connection)
            return
        connection.received += chunk
        end = _END_OF_HEAD.search(connection.received)
        if end is None:
            if len(connection.received) > MAX_REQUEST_BYTES:
                self._answer(connection, Reply(431, "request too large"), head_only=False)
            return
        if end.start() > MAX_REQUEST_BYTES:
            self._answer(connection, Reply(431, "request too large"), head_only=False)
            return
        self._respond(connection, connection.received[: end.start()])

    def _respond(self, connection: _Connection, head: bytes) -> None:
        request_line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._answer(connection, Reply(400, "bad request"), head_only=False)
            return
        method, target = parts[0], parts[1].decode("latin-1")
        if method not in (b"GET", b"HEAD"):
            self._answer(connection, Reply(405, "only GET and HEAD"), head_only=False)
            return
        path, _, query = target.partition("?")
        route = self.routes.get(path)
        if route is None:
            reply = Reply(404, "not found")
        else:
            try:
                reply = route(parse_qs(query))
            except Exception:
                log.exception("probe %s failed", target)
                reply = Reply(500, "internal error (see the agent's log)")
        self._answer(connection, reply, head_only=method == b"HEAD")

    def _answer(self, connection: _Connection, reply: Reply, *, head_only: bool) -> None:
        body = (reply.text + "\n").encode()
        head = (
            f"HTTP/1.0 {reply.status} {HTTPStatus(reply.status).phrase}\r\n"
            f"Content-Type: {reply.content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        connection.outgoing = head if head_only else head + body
        self._selector.modify(connection.sock, selectors.EVENT_WRITE, connection)
        self._write(connection)

    def _write(self, connection: _Connection) -> None:
        try:
            sent = connection.sock.send(connection.outgoing)
        except BlockingIOError:
            return
        except OSError:
            self._close(connection)
            return
        connection.outgoing = connection.outgoing[sent:]
        if not connection.outgoing:
            self._close(connection)

    def _close(self, connection: _Connection) -> None:
        if self._connections.pop(connection.sock, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(connection.sock)
        connection.sock.close()
