"""CDI through the real agent process: Allocate with each deviceListStrategy
over real gRPC, and the CDI spec file that follows the node."""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stc_npu_agent.testing.kubelet import KubeletEmulator
from stc_npu_agent.testing.simnode import SimNode

from .cdi_checker import problems
from .conftest import RESOURCE, AgentFactory

SPEC_NAME = "streamcomputing.com-npu.json"
NPU_NODES = ["", "c0", "c1", "c2", "c3", "ctrl"]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def read_spec(spec_dir: Path) -> dict[str, Any] | None:
    try:
        document: dict[str, Any] = json.loads((spec_dir / SPEC_NAME).read_text())
    except FileNotFoundError:
        return None
    return document


def device_names(spec_dir: Path) -> list[str] | None:
    document = read_spec(spec_dir)
    return None if document is None else [device["name"] for device in document["devices"]]


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    return tmp_path / "run" / "cdi"  # not there yet: the agent makes it


def cdi_config(spec_dir: Path, *strategies: str, **extra: object) -> dict[str, object]:
    return {"deviceListStrategy": list(strategies), "cdi": {"specDir": str(spec_dir)}, **extra}


def test_cdi_cri_alone_answers_names_that_the_spec_resolves(
    kubelet: KubeletEmulator, start_agent: AgentFactory, spec_dir: Path
) -> None:
    agent = start_agent(config=cdi_config(spec_dir, "cdi-cri"))
    kubelet.wait_registered(RESOURCE)
    document = read_spec(spec_dir)
    assert document is not None, "the spec is written before the first registration"
    assert problems(document) == []

    response = kubelet.allocate(RESOURCE, ["stc2", "stc0"])

    names = [device.name for device in response.cdi_devices]
    assert names == ["streamcomputing.com/npu=stc0", "streamcomputing.com/npu=stc2"]
    assert list(response.devices) == []  # NO DeviceSpecs
    assert list(response.mounts) == []  # the spec's containerEdits mount HPE
    assert dict(response.envs) == {"STC_NPU_DEVICES": "stc0,stc2"}
    # What a runtime makes of the names: exactly these NPUs' nodes, and HPE.
    by_name = {f"{document['kind']}={device['name']}": device for device in document["devices"]}
    nodes = [
        node["path"] for name in names for node in by_name[name]["containerEdits"]["deviceNodes"]
    ]
    assert nodes == [f"/dev/stc{index}{suffix}" for index in (0, 2) for suffix in NPU_NODES]
    assert document["containerEdits"]["mounts"][0]["hostPath"] == "/usr/local/hpe"
    assert "CDI streamcomputing.com/npu=stc0,streamcomputing.com/npu=stc2" in agent.log()


def test_both_strategies_answer_both(
    kubelet: KubeletEmulator, start_agent: AgentFactory, spec_dir: Path
) -> None:
    start_agent(config=cdi_config(spec_dir, "device-specs", "cdi-cri"))
    kubelet.wait_registered(RESOURCE)
    response = kubelet.allocate(RESOURCE, ["stc1"])
    assert [device.name for device in response.cdi_devices] == ["streamcomputing.com/npu=stc1"]
    assert [spec.host_path for spec in response.devices] == [
        f"/dev/stc1{suffix}" for suffix in NPU_NODES
    ]
    assert [(m.host_path, m.read_only) for m in response.mounts] == [("/usr/local/hpe", True)]


def test_device_specs_alone_writes_no_spec(
    kubelet: KubeletEmulator, start_agent: AgentFactory, spec_dir: Path
) -> None:
    agent = start_agent(config={"cdi": {"specDir": str(spec_dir)}})
    kubelet.wait_registered(RESOURCE)
    assert not kubelet.allocate(RESOURCE, ["stc1"]).cdi_devices
    agent.terminate()
    assert not spec_dir.exists()


@pytest.mark.parametrize(
    "mode_and_value",
    [("global", "4,5,6,7,12,13,14,15"), ("local", "0,1,2,3,4,5,6,7"), ("none", None)],
)
@pytest.mark.parametrize("strategy", ["device-specs", "cdi-cri"])
def test_stc_set_devices_through_allocate(
    mode_and_value: tuple[str, str | None],
    strategy: str,
    kubelet: KubeletEmulator,
    start_agent: AgentFactory,
    spec_dir: Path,
) -> None:
    mode, expected = mode_and_value
    start_agent(config=cdi_config(spec_dir, strategy, stcSetDevices=mode))
    kubelet.wait_registered(RESOURCE)
    envs = dict(kubelet.allocate(RESOURCE, ["stc3", "stc1"]).envs)
    assert envs.get("STC_SET_DEVICES") == expected
    assert envs["STC_NPU_DEVICES"] == "stc1,stc3"


def test_spec_follows_unplug_replug_and_new_npus(
    kubelet: KubeletEmulator, start_agent: AgentFactory, spec_dir: Path, node: SimNode
) -> None:
    agent = start_agent(config=cdi_config(spec_dir, "cdi-cri", hpe={"mode": "unmapped"}))
    kubelet.wait_registered(RESOURCE)
    wait_for(lambda: device_names(spec_dir) == ["stc0", "stc1", "stc2", "stc3"], "the spec")

    node.unplug(1)
    wait_for(lambda: device_names(spec_dir) == ["stc0", "stc2", "stc3"], "stc1 leaves the spec")
    node.replug(1)
    wait_for(lambda: device_names(spec_dir) == ["stc0", "stc1", "stc2", "stc3"], "stc1 back")
    node.add_npu(7, numa_node=1)
    wait_for(lambda: "stc7" in (device_names(spec_dir) or []), "stc7 in the spec")
    # Rewritten through a temp file that never stays behind (a write may be
    # under way while stc7 settles: wait for the dir to be quiet).
    # The spec may list stc7 before the kubelet's list does: wait for both.
    kubelet.wait_until(
        lambda: "stc7" in kubelet.devices(RESOURCE) and kubelet.devices(RESOURCE)["stc7"].healthy,
        what="stc7 healthy",
    )
    wait_for(lambda: sorted(p.name for p in spec_dir.iterdir()) == [SPEC_NAME], "only the spec")

    document = read_spec(spec_dir)
    assert document is not None
    assert problems(document) == []
    assert "containerEdits" not in document  # unmapped: no HPE mount or env
    assert oct((spec_dir / SPEC_NAME).stat().st_mode & 0o777) == "0o644"

    assert agent.terminate() == 0
    assert not (spec_dir / SPEC_NAME).exists()
    assert "removed the CDI spec" in agent.log()


def test_spec_removed_by_someone_else_is_restored(
    kubelet: KubeletEmulator, start_agent: AgentFactory, spec_dir: Path
) -> None:
    agent = start_agent(config=cdi_config(spec_dir, "cdi-cri"))
    kubelet.wait_registered(RESOURCE)
    (spec_dir / SPEC_NAME).unlink()
    wait_for(lambda: read_spec(spec_dir) is not None, "the spec restored")
    agent.wait_log("restored CDI spec")


@pytest.fixture
def other_agent_socket(kubelet_dir: Path) -> Iterator[Path]:
    """A socket of ours that answers: another agent serving (rolling update)."""
    path = kubelet_dir / "stc-npu.0000other.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    yield path
    listener.close()
    path.unlink(missing_ok=True)


def test_spec_stays_while_another_agent_serves(
    kubelet: KubeletEmulator,
    start_agent: AgentFactory,
    spec_dir: Path,
    other_agent_socket: Path,
) -> None:
    agent = start_agent(config=cdi_config(spec_dir, "cdi-cri"))
    kubelet.wait_registered(RESOURCE)
    assert agent.terminate() == 0
    assert (spec_dir / SPEC_NAME).exists()
    assert "another stc-npu agent serves" in agent.log()
    assert other_agent_socket.exists()  # answered, so never taken for stale


def test_spec_goes_when_the_other_socket_is_stale(
    kubelet: KubeletEmulator, kubelet_dir: Path, start_agent: AgentFactory, spec_dir: Path
) -> None:
    agent = start_agent(config=cdi_config(spec_dir, "cdi-cri"))
    kubelet.wait_registered(RESOURCE)
    stale = kubelet_dir / "stc-npu.0000stale.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale))
    listener.close()  # bound, never listening: connections are refused
    assert agent.terminate() == 0
    assert not (spec_dir / SPEC_NAME).exists()


def test_unwritable_spec_dir_is_one_line_and_the_agent_serves(
    kubelet: KubeletEmulator, start_agent: AgentFactory, tmp_path: Path
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the spec dir's parent should be")
    spec_dir = blocker / "cdi"
    agent = start_agent(config=cdi_config(spec_dir, "device-specs", "cdi-cri"))
    kubelet.wait_registered(RESOURCE)
    agent.wait_log("cannot write the CDI spec")
    response = kubelet.allocate(RESOURCE, ["stc0"])
    assert len(response.devices) == 6  # DeviceSpecs still work
    # ... and alone: a CDI name the runtime cannot resolve would fail the
    # container that the DeviceSpecs alone would start.
    assert not response.cdi_devices
    agent.wait_log("answering DeviceSpecs only")
    time.sleep(2.5)  # two ticks retry the write: still one warning
    assert agent.log().count("cannot write the CDI spec") == 1
    line = next(line for line in agent.log().splitlines() if "cannot write" in line)
    assert str(spec_dir) in line
    assert "Not a directory" in line

    blocker.unlink()  # the operator fixes the node
    wait_for(lambda: read_spec(spec_dir) is not None, "the spec written once possible")
    agent.wait_log("is writable again")
    names = [device.name for device in kubelet.allocate(RESOURCE, ["stc0"]).cdi_devices]
    assert names == ["streamcomputing.com/npu=stc0"]
    assert agent.process.poll() is None
    shutil.rmtree(blocker, ignore_errors=True)
