"""Mode dra end to end through the real agent process: the DRA kubelet
emulator on one side (plugins_registry, NodePrepareResources), the stand-in
API server on the other (the node's ResourceSlice, the ResourceClaims), and
the simulated node underneath. No part of the agent is replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stc_npu_agent.core.slices import PCIE_ROOT_ATTRIBUTE, UNHEALTHY_TAINT_KEY
from stc_npu_agent.testing.dra import DraKubeletEmulator
from stc_npu_agent.testing.fakeapi import FakeApiServer
from stc_npu_agent.testing.simnode import SimNode
from tests.agent.conftest import NUMA_OF, AgentFactory, AgentProcess

DRIVER = "npu.streamcomputing.com"
NODE = "node-a"
SLICE = f"{NODE}-{DRIVER}"
CLAIM_PATH = "/apis/resource.k8s.io/v1/namespaces/team/resourceclaims/train"


def claim(uid: str, devices: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"namespace": "team", "name": "train", "uid": uid},
        "status": {
            "allocation": {
                "devices": {
                    "results": [
                        {"request": "npus", "driver": DRIVER, "pool": NODE, "device": device}
                        for device in devices
                    ]
                }
            }
        },
    }


def wait_for(
    condition: Callable[[], bool], what: str, agent: AgentProcess, timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert agent.process.poll() is None, f"the agent exited while waiting for {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; agent log:\n{agent.log()}")


def devices(api: FakeApiServer) -> dict[str, dict[str, Any]]:
    with api.lock:
        stored = api.slices.get(SLICE)
        return {d["name"]: d for d in (stored or {}).get("spec", {}).get("devices", [])}


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


def slice_status(port: int) -> dict[str, Any]:
    """The resourceSlice block of the agent's /status."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as answer:
        block: dict[str, Any] = json.loads(answer.read())["resourceSlice"]
    return block


def test_dra_mode_publishes_prepares_taints_and_survives_a_restart(
    kubelet_dir: Path,
    node: SimNode,
    start_agent: AgentFactory,
    api: FakeApiServer,
    unused_tcp_port: int,
) -> None:
    host = kubelet_dir.parent
    node_uid = api.add_node(NODE)
    config = {
        "mode": "dra",
        "pluginRegistryDir": str(host / "plugins_registry"),
        "dra": {"stateDir": str(host / "plugins" / DRIVER), "sliceIntervalSeconds": 0.2},
        "cdi": {"specDir": str(host / "cdi")},
    }
    args = ["--kube-api-server", api.url, "--node-name", NODE]
    probes = ["--probe-address", f"127.0.0.1:{unused_tcp_port}"]
    with DraKubeletEmulator(host / "plugins_registry") as kubelet:
        agent = start_agent(config, extra_args=[*args, *probes])
        first = kubelet.wait_registered(DRIVER, timeout=60)

        # The node's slice: one device per NPU, with its attributes, owned by the Node.
        wait_for(lambda: len(devices(api)) == len(NUMA_OF), "the slice's 4 devices", agent)
        # /status tells the slice is published (Ready says only "registered").
        agent.wait_log("probes on http://127.0.0.1")
        wait_for(lambda: slice_status(unused_tcp_port)["inSync"], "/status: slice in sync", agent)
        assert slice_status(unused_tcp_port)["name"] == SLICE
        assert slice_status(unused_tcp_port)["problem"] is None
        with api.lock:
            stored = json.loads(json.dumps(api.slices[SLICE]))
        assert stored["spec"]["driver"] == DRIVER
        assert stored["spec"]["nodeName"] == NODE
        assert stored["spec"]["pool"]["name"] == NODE
        assert [o["uid"] for o in stored["metadata"]["ownerReferences"]] == [node_uid]
        for index, numa in NUMA_OF.items():
            attributes = devices(api)[f"stc{index}"]["attributes"]
            assert attributes["index"] == {"int": index}
            assert attributes["numaNode"] == {"int": numa}
            assert attributes["model"] == {"string": "STCP920"}
            assert attributes["pciAddress"] == {"string": node.bdf(index)}
            assert PCIE_ROOT_ATTRIBUTE in attributes
            assert "taints" not in devices(api)[f"stc{index}"]

        # A starting kubelet deletes the slices of drivers not registered yet:
        # the agent puts its slice back on the new registration (well before
        # its once-a-minute read-back).
        with api.lock:
            del api.slices[SLICE]
        kubelet.restart()
        first = kubelet.wait_registered(DRIVER, after=first.index + 1, timeout=60)
        wait_for(lambda: len(devices(api)) == len(NUMA_OF), "the slice put back", agent, 30)

        # A claim allocated to our driver: prepared with the CDI IDs of the agent's spec.
        api.add_claim(claim("uid-1", ["stc1", "stc3"]))
        answer = kubelet.prepare(DRIVER, [("team", "train", "uid-1")])
        result = answer.claims["uid-1"]
        assert result.error == ""
        assert [list(d.cdi_device_ids) for d in result.devices] == [
            ["streamcomputing.com/npu=stc1", "streamcomputing.com/npu=claim-uid-1-npus"],
            ["streamcomputing.com/npu=stc3", "streamcomputing.com/npu=claim-uid-1-npus"],
        ]

        # Unplug: the NPU stays in the slice, tainted NoSchedule with the reason.
        node.unplug(2)
        wait_for(lambda: "taints" in devices(api).get("stc2", {}), "stc2 tainted", agent)
        (taint,) = devices(api)["stc2"]["taints"]
        assert taint["key"] == UNHEALTHY_TAINT_KEY
        assert taint["effect"] == "NoSchedule"
        assert all("taints" not in devices(api)[f"stc{i}"] for i in (0, 1, 3))
        # Replugged: the taint goes (a restarted agent would not know stc2 otherwise).
        node.replug(2)
        wait_for(lambda: "taints" not in devices(api)["stc2"], "stc2's taint gone", agent)

        # Restart with the claim prepared, and the claim gone from the API:
        # the checkpoint answers, and the slice is neither deleted nor rewritten.
        assert agent.terminate() == 0
        assert set(devices(api)) == {f"stc{i}" for i in NUMA_OF}
        writes_before = len(api.writes())
        with api.lock:
            api.claims.clear()
            requests_before = len(api.requests)
            claim_reads_before = sum(r.path == CLAIM_PATH for r in api.requests)
        again = start_agent(config, extra_args=args)
        kubelet.wait_registered(DRIVER, after=first.index + 1, timeout=60)
        repeated = kubelet.prepare(DRIVER, [("team", "train", "uid-1")])
        assert repeated.claims["uid-1"] == result
        # The new agent has read its slice back (on registration) by now.
        wait_for(
            lambda: any(
                r.method == "GET" and r.path.endswith(f"/resourceslices/{SLICE}")
                for r in api.requests[requests_before:]
            ),
            "the restarted agent's read of its slice",
            again,
        )
        with api.lock:
            assert sum(r.path == CLAIM_PATH for r in api.requests) == claim_reads_before
        assert len(api.writes()) == writes_before, "a restart rewrote an unchanged slice"
        assert again.terminate() == 0


def test_dra_mode_without_credentials_exits_2_in_one_line(
    kubelet_dir: Path, node: SimNode, tmp_path: Path
) -> None:
    host = kubelet_dir.parent
    config = tmp_path / "config.yaml"
    config.write_text(f"mode: dra\npluginRegistryDir: {host / 'plugins_registry'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.pop("STC_NPU_KUBE_API_SERVER", None)
    result = subprocess.run(
        [
            sys.executable, "-m", "stc_npu_agent",
            "--kubelet-dir", str(kubelet_dir),
            "--dev-dir", str(node.dev_dir),
            "--sys-dir", str(node.sys_dir),
            "--config", str(config),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("stc-npu-agent: mode dra: no in-cluster Kubernetes credentials")
    assert "ServiceAccount token" in lines[-1]
    assert not (host / "plugins_registry").exists() or not any(
        (host / "plugins_registry").iterdir()
    )
