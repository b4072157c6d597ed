"""The scripts of the two `helm test` pods, run for real against what they
would meet in a cluster.

test-agents (Python, in the agent's image): the DaemonSet's status comes from
a fake API server over HTTPS, with its own CA as the service account's
ca.crt, at the address the pod would get (KUBERNETES_SERVICE_HOST/PORT).
test-allocate (busybox, the test image's shell and tools): the allocated NPU
is played by /dev/null (a real character device) and the HPE mount by a
temporary directory.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.chart.chartkit import Render, render

BUSYBOX = shutil.which("busybox")
needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="needs busybox (the test image's tools)")
APPLETS = ("sh", "sed", "cat", "tail", "printf", "ls", "tr", "echo")


@pytest.fixture(scope="module")
def busybox_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PATH of busybox applets only, as in the test image."""
    assert BUSYBOX is not None
    directory = tmp_path_factory.mktemp("busybox-bin")
    for applet in APPLETS:
        (directory / applet).symlink_to(BUSYBOX)
    return directory


def _container(rendered: Render, identity: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = rendered.object(identity)["spec"]["containers"]
    (container,) = containers
    return container


def _run(
    container: dict[str, Any], program: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    pod_env = {item["name"]: item["value"] for item in container["env"]}
    return subprocess.run(
        [*program, container["args"][0]],
        env={**pod_env, **env},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


class FakeApi:
    """Answers GET of one DaemonSet with a status, or with an HTTP error, over HTTPS."""

    def __init__(self, tls: ssl.SSLContext) -> None:
        self.status: dict[str, int] = {}
        self.generation = 1
        self.code = 200
        self.requests: list[tuple[str, str]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.requests.append((self.path, self.headers.get("Authorization", "")))
                body = json.dumps(
                    {
                        "kind": "DaemonSet",
                        "metadata": {"name": "stc-npu", "generation": api.generation},
                        "status": api.status,
                    }
                ).encode()
                self.send_response(api.code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)


@pytest.fixture
def account(tmp_path: Path) -> Path:
    """A service account directory: a token and the fake API server's CA."""
    directory = tmp_path / "serviceaccount"
    directory.mkdir()
    (directory / "token").write_text("secret-token\n", encoding="utf-8")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=kubernetes", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(directory / "ca.crt")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return directory


@pytest.fixture
def api(account: Path) -> Iterator[FakeApi]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(account / "ca.crt", account.parent / "key.pem")
    fake = FakeApi(context)
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def _agents(api: FakeApi, account: Path, wait: int = 2) -> subprocess.CompletedProcess[str]:
    container = _container(render(), "Pod-test-agents")
    assert container["command"] == ["python3", "-c"]
    env = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(api.server.server_address[1]),
        "SERVICEACCOUNT_DIR": str(account),
        "WAIT_SECONDS": str(wait),
    }
    return _run(container, [sys.executable, "-I", "-c"], env)


needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs openssl for the fake API server's certificate"
)


@needs_openssl
def test_agents_check_fails_at_once_without_agent_nodes(api: FakeApi, account: Path) -> None:
    api.status = {
        "observedGeneration": 1,
        "desiredNumberScheduled": 0,
        "currentNumberScheduled": 0,
        "numberReady": 0,
    }
    result = _agents(api, account, wait=600)  # fails before any wait
    assert result.returncode == 1, result.stdout + result.stderr
    assert "runs on 0 nodes" in result.stdout
    assert "kubectl label node <node> streamcomputing.com/npu.present=true" in result.stdout
    (path, authorization), *_ = api.requests
    assert path == "/apis/apps/v1/namespaces/kube-system/daemonsets/stc-npu"
    assert authorization == "Bearer secret-token"


@needs_openssl
def test_agents_check_passes_with_a_ready_agent(api: FakeApi, account: Path) -> None:
    api.status = {"observedGeneration": 1, "desiredNumberScheduled": 3, "numberReady": 2}
    result = _agents(api, account)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: 2 of 3 agents Ready" in result.stdout


@needs_openssl
def test_agents_check_gives_up_when_none_becomes_ready(api: FakeApi, account: Path) -> None:
    api.status = {"observedGeneration": 1, "desiredNumberScheduled": 2, "numberReady": 0}
    result = _agents(api, account, wait=1)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL: after 1s: 0 of 2 agents are Ready" in result.stdout
    assert "app.kubernetes.io/name=stc-npu,app.kubernetes.io/instance=stc-npu" in result.stdout


@needs_openssl
def test_agents_check_waits_for_the_controller_to_count(api: FakeApi, account: Path) -> None:
    # Right after install the status is empty: 0 desired means nothing yet.
    api.status = {}
    result = _agents(api, account, wait=1)
    assert result.returncode == 1
    assert "has not yet counted the agents" in result.stdout
    assert "runs on 0 nodes" not in result.stdout


@needs_openssl
def test_agents_check_names_an_api_error(api: FakeApi, account: Path) -> None:
    api.code = 403
    result = _agents(api, account, wait=1)
    assert result.returncode == 1
    assert "cannot read DaemonSet kube-system/stc-npu" in result.stdout
    assert "403" in result.stdout


@needs_openssl
def test_agents_check_refuses_a_server_its_ca_did_not_sign(
    api: FakeApi, account: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "token").write_text("secret-token", encoding="utf-8")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=other", "-keyout", str(other / "key.pem"), "-out", str(other / "ca.crt")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    api.status = {"observedGeneration": 1, "desiredNumberScheduled": 1, "numberReady": 1}
    result = _agents(api, other, wait=1)
    assert result.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in result.stdout
    assert api.requests == []  # the token never left


@needs_openssl
def test_agents_check_steps_aside_when_the_api_is_unreachable(api: FakeApi, account: Path) -> None:
    # Clusters whose pods have no route to the API server (no kube-proxy):
    # the check cannot judge, so the NPU test runs as it did without it.
    container = _container(render(), "Pod-test-agents")
    port = api.server.server_address[1]
    api.server.shutdown()
    api.server.server_close()
    env = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(port),
        "SERVICEACCOUNT_DIR": str(account),
        "WAIT_SECONDS": "600",
    }
    result = _run(container, [sys.executable, "-I", "-c"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SKIP: cannot reach the API server" in result.stdout


def _allocate(
    busybox_bin: Path, hpe: Path, devices: str = "null"
) -> subprocess.CompletedProcess[str]:
    container = _container(render(), "Pod-test")
    assert container["command"] == ["sh", "-c"]
    env = {"PATH": str(busybox_bin), "STC_NPU_DEVICES": devices, "HPE_PATH": str(hpe)}
    return _run(container, [str(busybox_bin / "sh"), "-c"], env)


@needs_busybox
def test_allocate_check_passes_with_a_device_and_hpe(busybox_bin: Path, tmp_path: Path) -> None:
    hpe = tmp_path / "hpe"
    (hpe / "lib").mkdir(parents=True)
    result = _allocate(busybox_bin, hpe)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: NPU null allocated" in result.stdout


@needs_busybox
def test_allocate_check_fails_on_an_empty_hpe_dir(busybox_bin: Path, tmp_path: Path) -> None:
    # A hostPath missing on the node is mounted as a new, empty directory.
    hpe = tmp_path / "hpe"
    hpe.mkdir()
    result = _allocate(busybox_bin, hpe)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{hpe} is empty" in result.stdout


@needs_busybox
def test_allocate_check_fails_without_a_device(busybox_bin: Path, tmp_path: Path) -> None:
    result = _allocate(busybox_bin, tmp_path, devices="")
    assert result.returncode == 1
    assert "no NPU was allocated" in result.stdout
