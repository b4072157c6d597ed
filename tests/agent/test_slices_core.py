"""The node's ResourceSlice as the core builds it from a real scan of a
simulated node: attributes, taints or omission, names, and what a write
must keep from the slice on the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stc_npu_agent.core import slices
from stc_npu_agent.core.devices import DeviceRules, Inventory
from stc_npu_agent.discovery import DeviceScanner, pcie_root
from stc_npu_agent.testing.simnode import SimNode

DRIVER = "npu.streamcomputing.com"


def scan(node: SimNode) -> Inventory:
    scanner = DeviceScanner(node.dev_dir, node.sys_dir, DeviceRules())
    return Inventory().updated(scanner.scan(), scanner.rules)


def test_scan_keeps_the_pcie_root_of_each_function(tmp_path: Path) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0, numa_node=0)
    npu = scan(node).npus["stc0"]
    assert npu.pci.pcie_root == "pci0000:00"
    assert npu.pci.address == node.bdf(0)


def test_pcie_root_is_the_root_complex_under_devices() -> None:
    assert pcie_root(Path("/sys/devices/pci0000:80/0000:80:01.0/0000:81:00.0")) == "pci0000:80"
    # A test tree whose own path has such names: the last pair counts.
    nested = Path("/tmp/devices/pcix/sys/devices/pci0001:00/0001:00:02.0/0001:01:00.0")
    assert pcie_root(nested) == "pci0001:00"
    assert pcie_root(Path("/sys/devices/platform/soc/stc0")) is None


def test_devices_carry_the_attributes_claims_select_on(tmp_path: Path) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0, numa_node=0)
    node.add_npu(1, numa_node=1, device="0x0200")
    node.add_npu(2, numa_node=None)
    listed = slices.devices(scan(node), driver_versions={"stc": "2.3.1"}, taints=True)
    by_name = {device["name"]: device["attributes"] for device in listed}
    assert list(by_name) == ["stc0", "stc1", "stc2"]
    assert by_name["stc0"] == {
        "index": {"int": 0},
        "model": {"string": "STCP920"},
        "numaNode": {"int": 0},
        "resource.kubernetes.io/pcieRoot": {"string": "pci0000:00"},
        "pciAddress": {"string": node.bdf(0)},
        "driverVersion": {"version": "2.3.1"},
    }
    assert by_name["stc1"]["model"] == {"string": "0x0200"}  # not in the table: the ID
    assert by_name["stc1"]["numaNode"] == {"int": 1}
    assert "numaNode" not in by_name["stc2"]  # no topology: left out, not guessed


def test_model_table_is_configurable(tmp_path: Path) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0, device="0x0200")
    listed = slices.devices(scan(node), models={"0x0200": "STCP930"}, taints=True)
    assert listed[0]["attributes"]["model"] == {"string": "STCP930"}


@pytest.mark.parametrize("version", ["2.3", "v2.3.1", "", "1.02.3"])
def test_a_driver_version_that_is_no_semver_is_left_out(tmp_path: Path, version: str) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0)
    listed = slices.devices(scan(node), driver_versions={"stc": version}, taints=True)
    assert "driverVersion" not in listed[0]["attributes"]


def test_unhealthy_npu_is_tainted_with_its_reason_or_left_out(tmp_path: Path) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0)
    node.add_npu(1)
    node.remove_node("stc1c2")
    inventory = scan(node)
    tainted = slices.devices(inventory, taints=True)
    assert "taints" not in tainted[0]
    assert tainted[1]["taints"] == [
        {
            "key": "npu.streamcomputing.com/unhealthy",
            "value": "missing-stc1c2",
            "effect": "NoSchedule",
        }
    ]
    assert [device["name"] for device in slices.devices(inventory, taints=False)] == ["stc0"]


def test_taint_value_is_a_label_value() -> None:
    value = slices.taint_value(
        "stc1c0: PCI 0000:04:00.0 vendor 0x10de is not allowed (0x23e2); " * 3
    )
    assert len(value) <= 63
    assert value[0].isalnum()
    assert value[-1].isalnum()
    assert set(value) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    assert slices.taint_value("!!!") == "unhealthy"


def test_slice_object_is_one_pool_per_node_owned_by_the_node() -> None:
    obj = slices.slice_object(
        node_name="node-a", node_uid="uid-1", driver=DRIVER, generation=3, device_list=[]
    )
    assert obj["metadata"]["name"] == "node-a-npu.streamcomputing.com"
    assert obj["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": "uid-1"}
    ]
    assert obj["spec"]["pool"] == {"name": "node-a", "generation": 3, "resourceSliceCount": 1}
    assert obj["spec"]["nodeName"] == "node-a"
    no_uid = slices.slice_object(
        node_name="node-a", node_uid=None, driver=DRIVER, generation=1, device_list=[]
    )
    assert "ownerReferences" not in no_uid["metadata"]


def test_slice_name_stays_a_valid_length_and_unique() -> None:
    long_a, long_b = "a" * 240 + "x", "a" * 240 + "y"
    name_a, name_b = slices.slice_name(long_a, DRIVER), slices.slice_name(long_b, DRIVER)
    assert max(len(name_a), len(name_b)) <= 253
    assert name_a != name_b


def test_taint_times_are_kept_and_ignored_when_comparing() -> None:
    taint: dict[str, Any] = {"key": "k", "value": "v", "effect": "NoSchedule"}
    current: list[dict[str, Any]] = [
        {"name": "stc1", "taints": [{**taint, "timeAdded": "2026-01-01T00:00:00Z"}]}
    ]
    desired: list[dict[str, Any]] = [{"name": "stc1", "taints": [dict(taint)]}]
    assert slices.comparable_devices(current) == desired
    slices.keep_taint_times(desired, current)
    assert desired[0]["taints"][0]["timeAdded"] == "2026-01-01T00:00:00Z"
    other: list[dict[str, Any]] = [{"name": "stc1", "taints": [{**taint, "value": "w"}]}]
    slices.keep_taint_times(other, current)
    assert "timeAdded" not in other[0]["taints"][0]  # another reason: a new taint


def test_taints_kept_tells_a_server_that_drops_them() -> None:
    sent: list[dict[str, Any]] = [{"name": "stc0"}, {"name": "stc1", "taints": [{"key": "k"}]}]
    assert slices.taints_kept(sent, [{"name": "stc0"}, {"name": "stc1", "taints": [{"key": "k"}]}])
    assert not slices.taints_kept(sent, [{"name": "stc0"}, {"name": "stc1"}])
