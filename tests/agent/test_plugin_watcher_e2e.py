"""The real agent with registration: plugin-watcher, against the kubelet
emulator's plugin watcher: registration through plugins_registry, restart
recovery without a new socket, cleanup on stop."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from stc_npu_agent.pluginregistration import api_pb2 as registration_pb2
from stc_npu_agent.pluginregistration import api_pb2_grpc as registration_grpc
from stc_npu_agent.testing.kubelet import KubeletEmulator

from .conftest import RESOURCE, AgentFactory

SOCKET_NAME = re.compile(r"stc-npu\.[0-9a-f]+\.sock")


@pytest.fixture
def registry_dir(kubelet_dir: Path) -> Path:
    return kubelet_dir.parent / "plugins_registry"


def watcher_config(registry_dir: Path) -> dict[str, object]:
    return {"registration": "plugin-watcher", "pluginRegistryDir": str(registry_dir)}


def registry_sockets(registry_dir: Path) -> list[str]:
    return sorted(p.name for p in registry_dir.iterdir() if p.is_socket())


def test_registers_through_the_plugin_watcher_without_calling_register(
    kubelet_dir: Path, registry_dir: Path, start_agent: AgentFactory
) -> None:
    with KubeletEmulator(kubelet_dir, plugin_registry_dir=registry_dir) as kubelet:
        agent = start_agent(watcher_config(registry_dir))
        registration = kubelet.wait_registered(RESOURCE)
        (name,) = registry_sockets(registry_dir)
        assert SOCKET_NAME.fullmatch(name)
        # The endpoint is the registration socket itself, as a full path.
        assert registration.endpoint == str(registry_dir / name)
        assert registration.accepted
        assert kubelet.allocatable(RESOURCE) == 4
        # No Register on kubelet.sock, no socket in the device plugin dir.
        assert not any(p.name.startswith("stc-npu.") for p in kubelet_dir.iterdir())
        assert "plugin watcher: streamcomputing.com/npu" in "\n".join(kubelet.events())
        agent.wait_log("the kubelet registered streamcomputing.com/npu (plugin-watcher)")
        plan = kubelet.allocate(RESOURCE, ["stc1"])
        assert "/dev/stc1" in [d.host_path for d in plan.devices]


def test_get_info_names_the_device_plugin_and_its_endpoint(
    kubelet_dir: Path, registry_dir: Path, start_agent: AgentFactory
) -> None:
    with KubeletEmulator(kubelet_dir, plugin_registry_dir=registry_dir) as kubelet:
        start_agent(watcher_config(registry_dir))
        kubelet.wait_registered(RESOURCE)
        (name,) = registry_sockets(registry_dir)
        with grpc.insecure_channel(f"unix://{registry_dir / name}") as channel:
            info = registration_grpc.RegistrationStub(channel).GetInfo(
                registration_pb2.InfoRequest(), timeout=5
            )
        assert info.type == "DevicePlugin"
        assert info.name == RESOURCE
        assert info.endpoint == str(registry_dir / name)
        assert list(info.supported_versions) == ["v1beta1"]


def test_a_kubelet_restart_finds_the_same_socket_again(
    kubelet_dir: Path, registry_dir: Path, start_agent: AgentFactory
) -> None:
    with KubeletEmulator(kubelet_dir, plugin_registry_dir=registry_dir) as kubelet:
        agent = start_agent(watcher_config(registry_dir))
        first = kubelet.wait_registered(RESOURCE)
        kubelet.restart()
        second = kubelet.wait_registered(RESOURCE, after=first.index + 1)
        # Nothing new from the agent: the kubelet found the same socket.
        assert second.endpoint == first.endpoint
        assert registry_sockets(registry_dir) == [Path(first.endpoint).name]
        assert kubelet.allocatable(RESOURCE) == 4
        agent.wait_log("waiting for it to register us again")
        assert "re-registering" not in agent.log()


def test_a_deleted_socket_is_served_anew(
    kubelet_dir: Path, registry_dir: Path, start_agent: AgentFactory
) -> None:
    with KubeletEmulator(kubelet_dir, plugin_registry_dir=registry_dir) as kubelet:
        start_agent(watcher_config(registry_dir))
        first = kubelet.wait_registered(RESOURCE)
        Path(first.endpoint).unlink()
        second = kubelet.wait_registered(RESOURCE, after=first.index + 1)
        assert second.endpoint != first.endpoint
        assert registry_sockets(registry_dir) == [Path(second.endpoint).name]


def test_a_clean_stop_removes_the_registration_socket(
    kubelet_dir: Path, registry_dir: Path, start_agent: AgentFactory
) -> None:
    with KubeletEmulator(kubelet_dir, plugin_registry_dir=registry_dir) as kubelet:
        agent = start_agent(watcher_config(registry_dir))
        kubelet.wait_registered(RESOURCE)
        assert agent.terminate() == 0
        assert list(registry_dir.iterdir()) == []
        kubelet.wait_until(lambda: kubelet.allocatable(RESOURCE) == 0)


def test_serves_before_the_kubelet_exists(
    kubelet_dir: Path, registry_dir: Path, start_agent: AgentFactory
) -> None:
    registry_dir.mkdir(parents=True)
    agent = start_agent(watcher_config(registry_dir))
    agent.wait_log("waiting for the kubelet's plugin watcher")
    with KubeletEmulator(kubelet_dir, plugin_registry_dir=registry_dir) as kubelet:
        kubelet.wait_registered(RESOURCE)
        assert kubelet.allocatable(RESOURCE) == 4


def test_too_long_registry_dir_is_a_clear_error_naming_it(
    kubelet_dir: Path, start_agent: AgentFactory
) -> None:
    # The socket is bound under its dot-name first: one byte longer than its
    # final name. Long enough that the bind path passes 107 bytes.
    base = kubelet_dir.parent / "r"
    padding = 107 - len(f"{base}/.stc-npu.{'0' * 16}.sock") + 1
    registry = base / ("d" * padding)
    registry.mkdir(parents=True)
    agent = start_agent({"registration": "plugin-watcher", "pluginRegistryDir": str(registry)})
    agent.wait_log("the limit for unix sockets: use a shorter pluginRegistryDir")
    assert agent.process.poll() is None
