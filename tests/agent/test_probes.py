"""The HTTP probe server on its own: what each endpoint answers and when."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence

import pytest

from stc_npu_agent.probes import STALE_AFTER, ProbeServer, Reply, parse_address


class Target:
    def __init__(self) -> None:
        self.heartbeat = time.monotonic()
        self.ready = False

    def status(self) -> dict[str, object]:
        return {"registered": self.ready, "npus": []}

    def allocation(self, ids: Sequence[str]) -> dict[str, object]:
        return {"envs": {"STC_NPU_DEVICES": ",".join(ids)}}


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def served() -> Iterator[tuple[Target, int]]:
    target = Target()
    server = ProbeServer("127.0.0.1:0", target)
    server.start()
    yield target, server.port
    server.stop()


def test_healthz_follows_the_heartbeat(served: tuple[Target, int]) -> None:
    target, port = served
    assert get(port, "/healthz")[0] == 200
    target.heartbeat = time.monotonic() - STALE_AFTER - 1  # a loop that stopped beating
    status, body = get(port, "/healthz")
    assert status == 503
    assert "heartbeat" in body


def test_readyz_follows_registration(served: tuple[Target, int]) -> None:
    target, port = served
    assert get(port, "/readyz") == (503, "not registered with the kubelet\n")
    target.ready = True
    assert get(port, "/readyz") == (200, "registered and streaming\n")


def test_status_is_the_targets_json(served: tuple[Target, int]) -> None:
    target, port = served
    target.ready = True
    status, body = get(port, "/status")
    assert status == 200
    assert json.loads(body) == {"registered": True, "npus": []}


def test_unknown_path_is_404(served: tuple[Target, int]) -> None:
    assert get(served[1], "/metrics")[0] == 404


@pytest.mark.parametrize(
    ("address", "expected"),
    [("0.0.0.0:8081", ("0.0.0.0", 8081)), (":9000", ("", 9000)), ("[::1]:80", ("::1", 80))],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["8081", "host:", "host:65536", "host:http"])
def test_parse_address_refuses(address: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address(address)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_empty_host_listens_on_ipv4_and_ipv6(host: str) -> None:
    target = Target()
    server = ProbeServer(":0", target)
    server.start()
    try:
        with socket.create_connection((host, server.port), timeout=5) as connection:
            connection.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert connection.recv(64).startswith(b"HTTP/1.0 200")
    finally:
        server.stop()


WAIT = 20.0


def open_idle(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that never send a byte (a pod holding them open)."""
    return [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(count)]


def closed_by_server(connection: socket.socket) -> bool:
    """True once the server closed it without an answer (waits up to WAIT)."""
    connection.settimeout(WAIT)
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_take_no_thread_and_healthz_still_answers(
    served: tuple[Target, int],
) -> None:
    target, port = served
    threads_before = threading.active_count()
    idle = open_idle(port, 300)
    try:
        target.heartbeat = time.monotonic()  # opening them may take a while
        # Answered after all 300 were accepted (in order): each got its
        # thread by now, if the server makes one per connection.
        assert get(port, "/healthz")[0] == 200
        assert threading.active_count() - threads_before <= 10
    finally:
        for connection in idle:
            connection.close()


def test_idle_and_slow_clients_are_cut_off() -> None:
    server = ProbeServer("127.0.0.1:0", Target(), request_timeout=0.5)
    server.start()
    try:
        idle = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
        # A client trickling its request a byte at a time, each well within
        # the timeout: the timeout is for the whole request, not per byte.
        request = b"GET /healthz HTTP/1.0\r\n" + b"X-Padding: " + b"a" * 400 + b"\r\n\r\n"
        cut_off = False
        for byte in request:
            try:
                slow.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                cut_off = True
                break
            time.sleep(0.05)
        assert cut_off or closed_by_server(slow)
        assert closed_by_server(idle)
        idle.close()
        slow.close()
        assert get(server.port, "/healthz")[0] == 200
    finally:
        server.stop()


def test_over_the_connection_cap_the_oldest_are_closed() -> None:
    server = ProbeServer("127.0.0.1:0", Target(), max_connections=8)
    server.start()
    try:
        idle = open_idle(server.port, 20)
        assert get(server.port, "/healthz")[0] == 200
        assert all(closed_by_server(connection) for connection in idle[:12])
        for connection in idle:
            connection.close()
    finally:
        server.stop()


@pytest.mark.parametrize(
    "request_bytes",
    [b"NONSENSE\r\n\r\n", b"GET /healthz\r\n\r\n", b"GET /" + b"x" * 20_000 + b" HTTP/1.0\r\n\r\n"],
)
def test_bad_requests_get_400_and_the_server_goes_on(
    served: tuple[Target, int], request_bytes: bytes
) -> None:
    _, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as connection:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.sendall(request_bytes)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := connection.recv(4096):
                answer += chunk
    assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.0 431"), answer
    assert get(port, "/healthz")[0] == 200


def test_head_answers_without_a_body(served: tuple[Target, int]) -> None:
    _, port = served
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as connection:
        connection.sendall(b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := connection.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 503")
    assert b"Content-Length: 32" in head
    assert body == b""


def test_an_endpoint_is_one_more_route() -> None:
    server = ProbeServer("127.0.0.1:0", Target())
    server.routes["/metrics"] = lambda query: Reply(200, "npus 4", "text/plain; version=0.0.4")
    server.start()
    try:
        assert get(server.port, "/metrics") == (200, "npus 4\n")
    finally:
        server.stop()


def test_allocate_answers_for_the_ids_asked(served: tuple[Target, int]) -> None:
    _, port = served
    code, body = get(port, "/allocate?id=stc0&id=stc2")
    assert code == 200
    assert json.loads(body) == {"envs": {"STC_NPU_DEVICES": "stc0,stc2"}}
