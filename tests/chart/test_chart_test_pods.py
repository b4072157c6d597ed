"""The scripts of the two `helm test` pods, run for real with busybox (the
test image's shell and tools) against what they would meet in a cluster.

test-agents: the DaemonSet's status comes from a fake API server (plain
HTTP through the script's API_SERVER seam; in the pod it is the cluster's
HTTPS endpoint). test-allocate: the allocated NPU is played by /dev/null (a
real character device) and the HPE mount by a temporary directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.chart.chartkit import Render, render

BUSYBOX = shutil.which("busybox")
needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="needs busybox (the test image's tools)")
APPLETS = ("sh", "wget", "sed", "date", "sleep", "cat", "tail", "printf", "ls", "tr", "echo")


@pytest.fixture(scope="module")
def busybox_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PATH of busybox applets only, as in the test image."""
    assert BUSYBOX is not None
    directory = tmp_path_factory.mktemp("busybox-bin")
    for applet in APPLETS:
        (directory / applet).symlink_to(BUSYBOX)
    return directory


def _container(rendered: Render, identity: str) -> dict[str, Any]:
    (container,) = rendered.object(identity)["spec"]["containers"]
    assert container["command"] == ["sh", "-c"]
    return container


def _run(
    container: dict[str, Any], path: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    pod_env = {item["name"]: item["value"] for item in container["env"]}
    return subprocess.run(
        ["sh", "-c", container["args"][0]],
        env={"PATH": str(path), **pod_env, **env},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


class FakeApi:
    """Answers GET of one DaemonSet with a status, or with an HTTP error."""

    def __init__(self) -> None:
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
                        "metadata": {
                            "name": "stc-npu",
                            "generation": api.generation,
                            "managedFields": [{"fieldsV1": {"f:status": {"f:numberReady": {}}}}],
                        },
                        "status": api.status,
                    },
                    separators=(",", ":"),
                ).encode()
                self.send_response(api.code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def api() -> Iterator[FakeApi]:
    fake = FakeApi()
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("secret-token", encoding="utf-8")
    return path


def _agents(
    busybox_bin: Path, api: FakeApi, token: Path, wait: int = 2
) -> subprocess.CompletedProcess[str]:
    container = _container(render(), "Pod-test-agents")
    script = container["args"][0]
    # The pod reads its token from the service account mount; here, from a file.
    container = {
        **container,
        "args": [script.replace("/var/run/secrets/kubernetes.io/serviceaccount/token", str(token))],
    }
    assert container["args"][0] != script
    return _run(container, busybox_bin, {"API_SERVER": api.url, "WAIT_SECONDS": str(wait)})


@needs_busybox
def test_agents_check_fails_at_once_without_agent_nodes(
    busybox_bin: Path, api: FakeApi, token: Path
) -> None:
    api.status = {
        "observedGeneration": 1,
        "desiredNumberScheduled": 0,
        "currentNumberScheduled": 0,
        "numberReady": 0,
    }
    result = _agents(busybox_bin, api, token, wait=600)  # fails before any wait
    assert result.returncode == 1, result.stdout + result.stderr
    assert "runs on 0 nodes" in result.stdout
    assert "kubectl label node <node> streamcomputing.com/npu.present=true" in result.stdout
    (path, authorization), *_ = api.requests
    assert path == "/apis/apps/v1/namespaces/kube-system/daemonsets/stc-npu"
    assert authorization == "Bearer secret-token"


@needs_busybox
def test_agents_check_passes_with_a_ready_agent(
    busybox_bin: Path, api: FakeApi, token: Path
) -> None:
    api.status = {"observedGeneration": 1, "desiredNumberScheduled": 3, "numberReady": 2}
    result = _agents(busybox_bin, api, token)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: 2 of 3 agents Ready" in result.stdout


@needs_busybox
def test_agents_check_gives_up_when_none_becomes_ready(
    busybox_bin: Path, api: FakeApi, token: Path
) -> None:
    api.status = {"observedGeneration": 1, "desiredNumberScheduled": 2, "numberReady": 0}
    result = _agents(busybox_bin, api, token, wait=1)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL: after 1s: 0 of 2 agents are Ready" in result.stdout
    assert "app.kubernetes.io/name=stc-npu,app.kubernetes.io/instance=stc-npu" in result.stdout


@needs_busybox
def test_agents_check_waits_for_the_controller_to_count(
    busybox_bin: Path, api: FakeApi, token: Path
) -> None:
    # Right after install the status is empty: 0 desired means nothing yet.
    api.status = {}
    result = _agents(busybox_bin, api, token, wait=1)
    assert result.returncode == 1
    assert "has not yet counted the agents" in result.stdout
    assert "runs on 0 nodes" not in result.stdout


@needs_busybox
def test_agents_check_names_an_api_error(busybox_bin: Path, api: FakeApi, token: Path) -> None:
    api.code = 403
    result = _agents(busybox_bin, api, token, wait=1)
    assert result.returncode == 1
    assert "cannot read DaemonSet kube-system/stc-npu" in result.stdout
    assert "403" in result.stdout


def _allocate(
    busybox_bin: Path, hpe: Path, devices: str = "null"
) -> subprocess.CompletedProcess[str]:
    container = _container(render(), "Pod-test")
    return _run(container, busybox_bin, {"STC_NPU_DEVICES": devices, "HPE_PATH": str(hpe)})


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
