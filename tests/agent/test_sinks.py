"""The lifecycle's sinks follow every change of the inventory, not only the
changes the kubelet sees (health, NUMA): a CDI spec lists present nodes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from stc_npu_agent.core.devices import DeviceRules, Inventory
from stc_npu_agent.discovery import DeviceScanner
from stc_npu_agent.sinks import SinkSet
from stc_npu_agent.state import DeviceState
from stc_npu_agent.testing.simnode import SimNode

NEVER = 3600.0  # a tick that never comes within a test: only change events count


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[Inventory] = []
        self.stopped = False

    def update(self, inventory: Inventory) -> None:
        self.seen.append(inventory)

    def stop(self) -> None:
        self.stopped = True


class Broken:
    name = "broken"

    def update(self, inventory: Inventory) -> None:
        raise RuntimeError("boom")

    def stop(self) -> None:
        raise RuntimeError("boom at stop")


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(1000):  # 10 s, generous
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"sink never saw {what}")


def test_sinks_follow_node_changes_that_leave_health_alone(tmp_path: Path) -> None:
    node = SimNode(tmp_path / "node")
    node.add_npu(0, numa_node=0)
    node.add_npu(1, numa_node=0)
    recorder = Recorder()

    def present(npu_id: str) -> tuple[str, ...]:
        return recorder.seen[-1].npus[npu_id].present_nodes if recorder.seen else ()

    async def scenario() -> None:
        state = DeviceState(DeviceScanner(node.dev_dir, node.sys_dir, DeviceRules()))
        state.rescan()
        follower = asyncio.create_task(SinkSet([Broken(), recorder]).follow(state, NEVER))
        await until(lambda: "stc1c3" in present("stc1"), "the first inventory")
        node.remove_node("stc1c2")  # stc1 turns Unhealthy: the kubelet's view changes
        state.rescan()
        await until(lambda: "stc1c2" not in present("stc1"), "stc1c2 gone")
        node.remove_node("stc1c3")  # still Unhealthy: only the present nodes change
        state.rescan()
        await until(lambda: "stc1c3" not in present("stc1"), "stc1c3 gone")
        follower.cancel()

    asyncio.run(scenario())
    # A failing sink does not keep the others from following.
    SinkSet([Broken(), recorder]).stop()
    assert recorder.stopped
