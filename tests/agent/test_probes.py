"""The HTTP probe server on its own: what each endpoint answers and when."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence

import pytest

from stc_npu_agent.probes import STALE_AFTER, ProbeServer, parse_address


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


def test_allocate_answers_for_the_ids_asked(served: tuple[Target, int]) -> None:
    _, port = served
    code, body = get(port, "/allocate?id=stc0&id=stc2")
    assert code == 200
    assert json.loads(body) == {"envs": {"STC_NPU_DEVICES": "stc0,stc2"}}
