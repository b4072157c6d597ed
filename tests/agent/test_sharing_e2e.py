"""Sharing through the real agent process and the kubelet emulator: replica
IDs over real gRPC, and what a change of ``sharing.replicas`` does to pods
that hold IDs from before it."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from stc_npu_agent.testing.kubelet import CHECKPOINT_FILE, KubeletEmulator
from stc_npu_agent.testing.simnode import SimNode

from .conftest import NUMA_OF, RESOURCE, AgentFactory

NPU_NODES = ["", "c0", "c1", "c2", "c3", "ctrl"]
SHARED = RESOURCE + ".shared"


def replica_list(replicas: int) -> list[str]:
    if replicas == 1:
        return [f"stc{i}" for i in NUMA_OF]
    return [f"stc{i}::{k}" for i in NUMA_OF for k in range(replicas)]


def test_replicas_are_listed_and_allocate_gives_each_npu_once(
    kubelet: KubeletEmulator, start_agent: AgentFactory, node: SimNode
) -> None:
    agent = start_agent(config={"sharing": {"replicas": 3}})
    kubelet.wait_registered(RESOURCE)
    kubelet.wait_until(lambda: len(kubelet.devices(RESOURCE)) == 12, what="12 replicas")
    devices = kubelet.devices(RESOURCE)
    assert sorted(devices) == sorted(replica_list(3))
    for index, numa in NUMA_OF.items():
        for k in range(3):
            assert devices[f"stc{index}::{k}"].numa_nodes == (numa,)
    assert kubelet.allocatable(RESOURCE) == 12

    response = kubelet.allocate(RESOURCE, ["stc2::1", "stc0::2", "stc2::0"])
    expected = [f"/dev/stc{i}{suffix}" for i in (0, 2) for suffix in NPU_NODES]
    assert [spec.host_path for spec in response.devices] == expected
    assert dict(response.envs)["STC_NPU_DEVICES"] == "stc0,stc2"
    assert "Allocate stc0::2,stc2::0,stc2::1: NPUs stc0,stc2, 12 device nodes" in agent.log()
    assert "sharing: each NPU is 3 devices of streamcomputing.com/npu" in agent.log()

    # Health of an NPU is the health of every replica of it.
    node.unplug(1)
    kubelet.wait_until(
        lambda: all(not kubelet.devices(RESOURCE)[f"stc1::{k}"].healthy for k in range(3)),
        what="every replica of stc1 Unhealthy",
    )
    assert kubelet.allocatable(RESOURCE) == 9
    with pytest.raises(grpc.RpcError) as unhealthy:
        kubelet.allocate(RESOURCE, ["stc1::2"])
    assert unhealthy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    node.replug(1)
    kubelet.wait_until(lambda: kubelet.allocatable(RESOURCE) == 12, what="stc1 back")


def test_preferred_allocation_spreads_then_packs_and_says_so(
    kubelet: KubeletEmulator, start_agent: AgentFactory
) -> None:
    agent = start_agent(config={"sharing": {"replicas": 2}})
    kubelet.wait_registered(RESOURCE)
    available = list(reversed(replica_list(2)))
    assert kubelet.get_preferred_allocation(RESOURCE, available, [], 2) == ["stc0::0", "stc1::0"]
    assert "packing" not in agent.log()
    chosen = kubelet.get_preferred_allocation(RESOURCE, available, [], 5)
    assert chosen == ["stc0::0", "stc1::0", "stc2::0", "stc3::0", "stc0::1"]
    agent.wait_log(
        "more replicas asked than healthy distinct NPUs available, packing: "
        "5 replicas on 4 distinct NPUs (stc0 x2)"
    )
    assert agent.log().count("packing:") == 1


def test_fail_requests_greater_than_one_over_grpc(
    kubelet: KubeletEmulator, start_agent: AgentFactory
) -> None:
    start_agent(config={"sharing": {"replicas": 2, "failRequestsGreaterThanOne": True}})
    kubelet.wait_registered(RESOURCE)
    assert dict(kubelet.allocate(RESOURCE, ["stc3::1"]).envs)["STC_NPU_DEVICES"] == "stc3"
    with pytest.raises(grpc.RpcError) as refused:
        kubelet.allocate(RESOURCE, ["stc3::1", "stc2::0"])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sharing.failRequestsGreaterThanOne: a container may get one replica" in (
        refused.value.details() or ""
    )


def test_rename_shared_registers_the_shared_resource(
    kubelet: KubeletEmulator, start_agent: AgentFactory, unused_tcp_port: int
) -> None:
    start_agent(
        config={"sharing": {"replicas": 2, "renameShared": True}},
        extra_args=["--probe-address", f"127.0.0.1:{unused_tcp_port}"],
    )
    registration = kubelet.wait_registered(SHARED)
    assert registration.resource_name == SHARED
    kubelet.wait_until(lambda: kubelet.allocatable(SHARED) == 8, what="8 shared replicas")
    assert RESOURCE not in kubelet.resources()
    assert dict(kubelet.allocate(SHARED, ["stc1::1"]).envs)["STC_NPU_DEVICES"] == "stc1"
    # /status says what is advertised, and as what.
    url = f"http://127.0.0.1:{unused_tcp_port}/status"
    with urllib.request.urlopen(url, timeout=5) as answer:
        status = json.loads(answer.read())
    assert status["resourceName"] == SHARED
    assert status["replicas"] == 2
    assert status["npus"][1]["deviceIds"] == ["stc1::0", "stc1::1"]


def checkpointed(kubelet_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((kubelet_dir / CHECKPOINT_FILE).read_text())["Data"]
    return data


@pytest.mark.parametrize(
    "change",
    [
        (1, 4, [("stc0",), ("stc1", "stc3")]),  # sharing turned on
        (4, 2, [("stc0::3",), ("stc2::0", "stc2::3")]),  # fewer replicas
        (2, 1, [("stc1::1",)]),  # sharing turned off
    ],
)
def test_a_replicas_change_reregisters_and_keeps_old_assignments(
    change: tuple[int, int, list[tuple[str, ...]]],
    kubelet: KubeletEmulator,
    kubelet_dir: Path,
    start_agent: AgentFactory,
) -> None:
    before, after, held = change
    old = start_agent(config={"sharing": {"replicas": before}})
    kubelet.wait_registered(RESOURCE)
    for ids in held:
        kubelet.allocate(RESOURCE, ids)
    registrations = len(kubelet.registrations)
    # The chart's checksum rolls the pod on a config change: a stop, then a
    # new agent with the new config.
    assert old.terminate() == 0

    new = start_agent(config={"sharing": {"replicas": after}})
    kubelet.wait_registered(RESOURCE, after=registrations)
    kubelet.wait_until(
        lambda: sorted(kubelet.devices(RESOURCE)) == sorted(replica_list(after)),
        what=f"the list of {after} replicas per NPU",
    )
    assert kubelet.allocatable(RESOURCE) == 4 * after
    # The pods' assignments stay in the kubelet's checkpoint: their
    # containers keep running with the nodes they were given.
    assert kubelet.assignments(RESOURCE) == held
    entries = checkpointed(kubelet_dir)["PodDeviceEntries"]
    assert [tuple(e["DeviceIDs"]) for e in entries] == held
    # ... and the checkpoint's device list is the new one.
    kubelet.wait_until(
        lambda: (
            sorted(checkpointed(kubelet_dir)["RegisteredDevices"][RESOURCE])
            == sorted(replica_list(after))
        ),
        what="the new list in the checkpoint",
    )
    # An old ID that no longer exists is refused, saying why.
    with pytest.raises(grpc.RpcError) as refused:
        kubelet.allocate(RESOURCE, held[0])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    assert f"unknown device IDs: {held[0][0]!r}" in details
    assert "is from another sharing.replicas and is no longer advertised" in details
    assert kubelet.assignments(RESOURCE) == held  # a refused Allocate is no assignment
    # The new IDs work.
    assert dict(kubelet.allocate(RESOURCE, replica_list(after)[-1:]).envs)["STC_NPU_DEVICES"] == (
        "stc3"
    )
    assert new.process.poll() is None
