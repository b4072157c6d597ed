"""`stc-npu-agent diagnose` on the simulated node, next to the running agent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from stc_npu_agent.testing.kubelet import KubeletEmulator
from stc_npu_agent.testing.simnode import SimNode

from .conftest import RESOURCE, AgentFactory


def diagnose(
    node: SimNode, kubelet_dir: Path, *args: str, hpe_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "stc_npu_agent", "diagnose",
        "--kubelet-dir", str(kubelet_dir),
        "--dev-dir", str(node.dev_dir),
        "--sys-dir", str(node.sys_dir),
        *(["--hpe-dir", str(hpe_dir)] if hpe_dir else []),
        *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def hpe_install(tmp_path: Path) -> Path:
    hpe = tmp_path / "hpe"
    (hpe / "lib").mkdir(parents=True)
    return hpe


@pytest.fixture
def probe(kubelet: KubeletEmulator, start_agent: AgentFactory, unused_tcp_port: int) -> str:
    """A running, registered agent with its probes on; their address."""
    address = f"127.0.0.1:{unused_tcp_port}"
    start_agent(extra_args=["--probe-address", address])
    kubelet.wait_registered(RESOURCE)
    kubelet.wait_until(lambda: kubelet.stream_open(RESOURCE), what="stream open")
    return address


def test_healthy_node_reports_no_problems(
    tmp_path: Path, node: SimNode, kubelet: KubeletEmulator, kubelet_dir: Path, probe: str
) -> None:
    result = diagnose(
        node, kubelet_dir, "--json", "--probe-address", probe, hpe_dir=hpe_install(tmp_path)
    )
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["problems"] == []
    assert result.returncode == 0
    assert [npu["id"] for npu in report["npus"]] == ["stc0", "stc1", "stc2", "stc3"]
    first = report["npus"][0]
    assert first["health"] == "Healthy"
    assert first["numaNode"] == 0
    assert first["pci"]["vendor"] == "0x23e2"
    assert first["pci"]["isStreamComputing"] is True
    assert [n["name"] for n in first["nodes"]][-1] == "stc0ctrl"
    assert report["kubelet"]["socket"] == "answers"
    assert report["agent"]["registered"] is True
    sockets = report["agent"]["sockets"]
    assert len(sockets) == 1
    assert sockets[0]["state"] == "answers"
    assert sockets[0]["options"]["getPreferredAllocationAvailable"] is True
    # Diagnose must not disturb the agent: still one registration, stream open.
    assert len(kubelet.registrations) == 1
    assert kubelet.stream_open(RESOURCE)


def test_text_output_explains_an_unhealthy_npu_and_allocate(
    tmp_path: Path, node: SimNode, kubelet: KubeletEmulator, kubelet_dir: Path
) -> None:
    node.replace_with_regular_file("stc1c3")
    result = diagnose(
        node, kubelet_dir, "--allocate", "stc0", "--allocate", "stc1", hpe_dir=hpe_install(tmp_path)
    )
    out = result.stdout
    assert result.returncode == 1
    assert "stc1   Unhealthy" in out
    assert "why: not a character device: stc1c3" in out
    assert "!stc1c3" in out
    assert "Allocate [stc0] would answer, by a one-shot scan" in out
    assert "  device /dev/stc0ctrl -> /dev/stc0ctrl (rw)" in out
    assert "  env    STC_NPU_DEVICES=stc0" in out
    assert "error FAILED_PRECONDITION: unhealthy device IDs: stc1: not a character device" in out
    assert "- no agent socket answers" in out
    assert "registered: unknown (no probe address configured" in out


def test_the_agents_view_shows_vanished_npus(
    node: SimNode, kubelet: KubeletEmulator, kubelet_dir: Path, probe: str
) -> None:
    node.unplug(3)
    kubelet.wait_until(lambda: not kubelet.devices(RESOURCE)["stc3"].healthy, what="stc3 down")
    report = json.loads(diagnose(node, kubelet_dir, "--json", "--probe-address", probe).stdout)
    stc3 = next(npu for npu in report["npus"] if npu["id"] == "stc3")
    assert stc3["source"] == "agent"
    assert stc3["pci"]["address"] == node.bdf(3)  # remembered by the agent
    assert stc3["pci"]["vendor"] == "0x23e2"
    assert stc3["health"] == "Unhealthy"
    assert "missing stc3" in stc3["reason"]
    assert not any(n["present"] for n in stc3["nodes"])
    assert any(problem.startswith("stc3 is Unhealthy") for problem in report["problems"])


def test_missing_hpe_in_mapped_mode_is_a_problem(
    tmp_path: Path, node: SimNode, kubelet_dir: Path
) -> None:
    empty = tmp_path / "empty-hpe"
    empty.mkdir()
    report = json.loads(diagnose(node, kubelet_dir, "--json", hpe_dir=empty).stdout)
    assert "is missing or empty on this node" in report["hpe"]["problem"]
    assert report["hpe"]["problem"] in report["problems"]


def test_stale_kubelet_socket_and_missing_dev_dir(
    tmp_path: Path, node: SimNode, kubelet_dir: Path
) -> None:
    with KubeletEmulator(kubelet_dir, version="1.25") as kubelet:
        kubelet.stop(crash=True)
    missing = SimNode(tmp_path / "other")
    missing.dev_dir.rmdir()
    report = json.loads(diagnose(missing, kubelet_dir, "--json").stdout)
    assert report["kubelet"]["socket"] == "refuses"
    assert report["kubelet"]["deprecationFile"] is True
    assert f"device dir {missing.dev_dir} does not exist" in report["problems"]


def test_bad_config_is_exit_2(tmp_path: Path, node: SimNode, kubelet_dir: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("hpe:\n  mode: maped\n")
    result = diagnose(node, kubelet_dir, "--config", str(config))
    assert result.returncode == 2
    assert "hpe.mode: expected one of mapped, unmapped, got 'maped'" in result.stderr


def test_allocate_answer_comes_from_the_running_agent(
    node: SimNode, kubelet: KubeletEmulator, kubelet_dir: Path, probe: str
) -> None:
    node.unplug(3)
    kubelet.wait_until(lambda: not kubelet.devices(RESOURCE)["stc3"].healthy, what="stc3 down")
    result = diagnose(
        node, kubelet_dir, "--json", "--probe-address", probe, "--allocate", "stc3",
        "--allocate", "stc0",
    )  # fmt: skip
    answers = json.loads(result.stdout)["allocate"]
    # A one-shot scan no longer knows stc3 ("unknown device IDs"); the agent
    # still lists it, Unhealthy, and that is what Allocate answers.
    assert answers["stc3"]["error"]["code"] == "FAILED_PRECONDITION"
    assert answers["stc3"]["source"] == "agent"
    assert "stc3: missing stc3" in answers["stc3"]["error"]["message"]
    assert answers["stc0"]["source"] == "agent"
    assert answers["stc0"]["envs"]["STC_NPU_DEVICES"] == "stc0"
    text = diagnose(node, kubelet_dir, "--probe-address", probe, "--allocate", "stc0").stdout
    assert "Allocate [stc0] answered by the running agent (from http://" in text
    # Asking is no Allocate: the kubelet's record and the agent's log stay as they were.
    assert kubelet.assignments(RESOURCE) == []


def test_allocate_without_the_agent_says_it_is_a_one_shot_scan(
    tmp_path: Path, node: SimNode, kubelet_dir: Path
) -> None:
    result = diagnose(node, kubelet_dir, "--json", "--allocate", "stc0")
    answer = json.loads(result.stdout)["allocate"]["stc0"]
    assert answer["source"] == "scan"
    assert answer["envs"]["STC_NPU_DEVICES"] == "stc0"
    text = diagnose(node, kubelet_dir, "--allocate", "stc0").stdout
    assert "Allocate [stc0] would answer, by a one-shot scan (no probe address" in text


def test_impostors_are_named(tmp_path: Path, node: SimNode, kubelet_dir: Path) -> None:
    node.add_foreign_node("stc7")
    node.bind_driver(1, "vfio-pci")
    report = json.loads(diagnose(node, kubelet_dir, "--json").stdout)
    health = {npu["id"]: npu["health"] for npu in report["npus"]}
    assert health == {
        "stc0": "Healthy",
        "stc1": "Unhealthy",
        "stc2": "Healthy",
        "stc3": "Healthy",
        "stc7": "Unhealthy",
    }
    problems = "\n".join(report["problems"])
    assert "stc7 is Unhealthy: stc7: 1:3 is not a PCI device" in problems
    assert "stc1 is Unhealthy: stc1: PCI 0000:04:00.0 is bound to vfio-pci, not stc" in problems
    stc1 = next(npu for npu in report["npus"] if npu["id"] == "stc1")
    assert stc1["pci"]["driver"] == "vfio-pci"


def test_cdi_answer_and_a_missing_spec(tmp_path: Path, node: SimNode, kubelet_dir: Path) -> None:
    spec_dir = tmp_path / "cdi"
    config = tmp_path / "config.yaml"
    config.write_text(
        f"deviceListStrategy: [cdi-cri]\nstcSetDevices: global\ncdi:\n  specDir: {spec_dir}\n"
    )
    args = ("--config", str(config), "--allocate", "stc1")
    out = diagnose(node, kubelet_dir, *args, hpe_dir=hpe_install(tmp_path)).stdout
    assert "  cdi    streamcomputing.com/npu=stc1" in out
    assert "  env    STC_SET_DEVICES=4,5,6,7" in out
    assert "  device " not in out  # cdi-cri alone: no DeviceSpecs
    missing = f"the CDI spec {spec_dir}/streamcomputing.com-npu.json is missing"
    assert missing in out

    spec_dir.mkdir()
    (spec_dir / "streamcomputing.com-npu.json").write_text("{}")
    assert missing not in diagnose(node, kubelet_dir, *args).stdout


def test_sharing_is_shown_and_replica_ids_allocate(
    tmp_path: Path, node: SimNode, kubelet_dir: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("sharing:\n  replicas: 3\n  renameShared: true\n")
    args = ("--config", str(config), "--allocate", "stc1::2", "--allocate", "stc1")
    text = diagnose(node, kubelet_dir, *args).stdout
    assert (
        "sharing: 3 replicas per NPU (<npu>::0 .. <npu>::2) as streamcomputing.com/npu.shared"
        in text
    )
    assert "  env    STC_NPU_DEVICES=stc1" in text
    assert "Allocate [stc1] would answer" in text
    assert "error INVALID_ARGUMENT: unknown device IDs: 'stc1' (sharing.replicas is 3" in text
    report = json.loads(diagnose(node, kubelet_dir, *args, "--json").stdout)
    assert report["resource"] == "streamcomputing.com/npu.shared"
    assert report["config"]["sharing"]["replicas"] == 3
    # Without sharing, no sharing line.
    assert "sharing:" not in diagnose(node, kubelet_dir).stdout
