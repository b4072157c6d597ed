"""The live state and the scanner on a simulated node, in process: settle
timers, sysfs that cannot be read, what Allocate re-checks, what is logged."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from stc_npu_agent.core.allocation import AllocationError, ContainerAllocation, ErrorKind
from stc_npu_agent.core.config import HpeConfig
from stc_npu_agent.core.devices import DeviceRules
from stc_npu_agent.discovery import DeviceScanner
from stc_npu_agent.plugin import checked_allocation
from stc_npu_agent.state import DeviceState
from stc_npu_agent.testing.simnode import SimNode

WAIT = 30.0


@pytest.fixture
def node(tmp_path: Path) -> SimNode:
    sim = SimNode(tmp_path / "node")
    for index in range(4):
        sim.add_npu(index, numa_node=index // 2)
    return sim


def make_state(node: SimNode) -> DeviceState:
    return DeviceState(DeviceScanner(node.dev_dir, node.sys_dir, DeviceRules()))


def allocate(state: DeviceState, ids: list[str]) -> ContainerAllocation:
    return checked_allocation(state.inventory, state.scanner, ids, HpeConfig())


def run(scenario: Callable[[], Any]) -> Any:
    async def main() -> Any:
        return await scenario()

    return asyncio.run(main())


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_one_settle_timer_per_deadline(node: SimNode) -> None:
    async def scenario() -> None:
        state = make_state(node)
        state.rescan()
        node.add_npu(4)  # after the first scan: it settles before it is Healthy
        for _ in range(10):
            state.rescan()  # e.g. the six inotify events of its six nodes
        loop = asyncio.get_running_loop()
        # The loop's own timer heap: the only place all pending timers show.
        timers = [
            handle
            for handle in loop._scheduled  # type: ignore[attr-defined]
            if not handle.cancelled() and getattr(handle._callback, "__self__", None) is state
        ]
        assert len(timers) == 1
        await wait_for(lambda: state.inventory.npus["stc4"].healthy, "stc4 settled")

    run(scenario)


def test_permission_denied_in_sysfs_does_not_poison_the_scan(
    node: SimNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root is never refused by file modes: make every sysfs lookup fail with
    # EACCES, as a locked-down mount or an LSM does.
    sys_prefix = str(node.sys_dir)

    def refusing(real: Callable[..., os.stat_result]) -> Callable[..., os.stat_result]:
        def call(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            if os.fspath(path).startswith(sys_prefix):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "stat", refusing(os.stat))
    monkeypatch.setattr(os, "lstat", refusing(os.lstat))

    async def scenario() -> None:
        state = make_state(node)
        state.rescan()
        assert sorted(state.inventory.npus) == ["stc0", "stc1", "stc2", "stc3"]
        for npu in state.inventory.npus.values():
            assert not npu.healthy
            assert "Permission denied" in npu.reason
        monkeypatch.undo()
        state.rescan()
        assert state.inventory.healthy_ids() == {"stc0", "stc1", "stc2", "stc3"}

    run(scenario)


def test_allocate_refuses_a_node_replaced_since_the_scan(node: SimNode) -> None:
    async def scenario() -> None:
        state = make_state(node)
        state.rescan()
        assert allocate(state, ["stc0"]).devices
        # No rescan in between: the inventory still says stc0 is Healthy.
        node.replace_with_device("stc0c1", (1, 3))
        assert state.inventory.npus["stc0"].healthy
        with pytest.raises(AllocationError) as refused:
            allocate(state, ["stc0"])
        assert refused.value.kind is ErrorKind.FAILED_PRECONDITION
        assert "stc0c1" in refused.value.message
        assert allocate(state, ["stc1"]).devices  # the others are fine

    run(scenario)


def test_an_impostor_is_logged_once_per_change(
    node: SimNode, caplog: pytest.LogCaptureFixture
) -> None:
    node.add_foreign_node("null")  # /dev/null: 1:3, a virtual device in sysfs

    async def scenario() -> None:
        state = make_state(node)
        state.rescan()
        node.replace_with_device("stc0c1", (1, 3))
        for _ in range(5):
            state.rescan()
        node.replace_with_device("stc0c2", (1, 3))
        for _ in range(5):
            state.rescan()
        node.unplug(1)  # an NPU going away is no impostor
        for _ in range(5):
            state.rescan()

    with caplog.at_level(logging.INFO, logger="stc_npu_agent"):
        run(scenario)
    messages = [record.getMessage() for record in caplog.records]
    lines = [line for line in messages if line.startswith("device ")]
    assert sum("stc0c1: 1:3 is not a PCI device" in line for line in lines) == 2, lines
    assert sum("stc0c2: 1:3 is not a PCI device" in line for line in lines) == 1, lines
    assert [line for line in lines if "stc1" in line][1:] == [
        "device stc1 Healthy -> Unhealthy (missing stc1, stc1c0, stc1c1, stc1c2, stc1c3, stc1ctrl)"
    ]
    # And one line per signal transition: the driver signal turned bad once.
    transitions = [line for line in messages if line.startswith("health ")]
    assert transitions == [
        "health stc0 pciDriver ok -> bad: stc0c1: 1:3 is not a PCI device",
        "health stc1 presence ok -> bad: missing stc1, stc1c0, stc1c1, stc1c2, stc1c3, stc1ctrl",
    ]


def test_a_node_without_a_device_is_dead_not_an_impostor(node: SimNode) -> None:
    # The kernel removes a device's sysfs entry before udev removes its node
    # (and a node made by hand may have numbers no device has).
    async def scenario() -> None:
        state = make_state(node)
        state.rescan()
        (node.sys_dir / "dev" / "char" / "240:5").unlink()  # stc0ctrl's
        state.rescan()
        npu = state.inventory.npus["stc0"]
        assert npu.reason == "no device behind stc0ctrl"
        assert npu.impostors == ()
        assert "stc0ctrl" not in npu.present_nodes

    run(scenario)


def test_a_rebound_driver_is_seen_without_a_device_node_event(node: SimNode) -> None:
    # sysfs is resolved once per device number, but the driver is read each
    # scan: a function handed to vfio-pci keeps its /dev nodes unchanged.
    async def scenario() -> None:
        state = make_state(node)
        state.rescan()
        node.bind_driver(2, "vfio-pci")
        state.rescan()
        assert state.inventory.npus["stc2"].reason == (
            "stc2: PCI 0000:05:00.0 is bound to vfio-pci, not stc"
        )
        node.bind_driver(2, "stc")
        state.rescan()
        assert state.inventory.healthy_ids() == {"stc0", "stc1", "stc2", "stc3"}
        assert state.inventory.npus["stc2"].pci.driver == "stc"

    run(scenario)


def test_one_device_under_two_names_is_not_two_npus(node: SimNode) -> None:
    # mknod stc5 c 240 0 (and its members) beside stc0: same vendor, same
    # driver, same PCI function; only the kernel's name for 240:0 tells.
    for name in ("stc5", "stc5c0", "stc5c1", "stc5c2", "stc5c3", "stc5ctrl"):
        node.add_foreign_node(name, node.devnum(name.replace("stc5", "stc0")))
    node.replace_with_device("stc1c2", node.devnum("stc1c3"))  # twice in one NPU

    async def scenario() -> None:
        state = make_state(node)
        state.rescan()
        stc5 = state.inventory.npus["stc5"]
        assert not stc5.healthy
        assert stc5.reason.startswith("stc5: 240:0 is stc0 by the kernel; stc5c0: 240:1 is stc0c0")
        assert state.inventory.npus["stc1"].reason == "stc1c2: 240:12 is stc1c3 by the kernel"
        assert state.inventory.healthy_ids() == {"stc0", "stc2", "stc3"}

    run(scenario)
