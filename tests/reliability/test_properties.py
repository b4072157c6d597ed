"""Property-based tests over random event sequences (plug, unplug, a node
broken or faked, kubelet restart, allocate).

Invariants: Healthy = every node the NPU ever had is present as a character
device; an unknown or unhealthy ID is never allocated; a preferred
allocation holds the must-include IDs and has the requested size when enough
healthy IDs are available. Two layers: the pure core with many examples, the
real agent process with a few short sequences.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stc_npu_agent.core.allocation import AllocationError, plan_allocation, preferred_allocation
from stc_npu_agent.core.config import Config, DiscoveryConfig
from stc_npu_agent.core.devices import DeviceRules, Inventory, NodeKind, NodeObservation, PciInfo
from stc_npu_agent.testing.kubelet import KubeletEmulator
from stc_npu_agent.testing.simnode import SimNode
from tests.agent.conftest import RESOURCE

from .kit import DEVICE_PATH

NPUS = 6
SUFFIXES = ["", "c0", "c1", "ctrl"]
CONFIG = Config()
# The required members: the model's own suffixes.
RULES = DeviceRules(
    DiscoveryConfig(required_members=("stc{index}c0", "stc{index}c1", "stc{index}ctrl"))
)
NAMING = RULES.naming

# --- the pure core ----------------------------------------------------------


def genuine(name: str) -> PciInfo:
    """The PCI function of an STC NPU, the one of the node's own NPU."""
    classified = NAMING.classify(name)
    index = classified[0] if classified else 0
    return PciInfo(index % 2, "0x23e2", "0x0100", f"0000:{index + 3:02x}:00.0", "stc")


def required(index: int) -> set[str]:
    return set(RULES.required_names(index))


# An event: (what, NPU index, which node, how it is broken)
EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["plug", "unplug", "break", "fix"]),
        st.integers(0, NPUS - 1),
        st.sampled_from(SUFFIXES),
        st.sampled_from(["absent", "file"]),
    ),
    max_size=40,
)
ID_LISTS = st.lists(st.sampled_from([f"stc{i}" for i in range(NPUS + 2)]), max_size=5)


@settings(max_examples=400, deadline=None)
@given(events=EVENTS, ask=ID_LISTS, available=ID_LISTS, must=ID_LISTS, size=st.integers(-1, 6))
def test_core_inventory_and_allocation_invariants(  # noqa: PLR0912
    events: list[tuple[str, int, str, str]],
    ask: list[str],
    available: list[str],
    must: list[str],
    size: int,
) -> None:
    nodes: dict[str, NodeKind] = {}  # what the device dir holds now
    ever: dict[int, set[str]] = {}  # every node seen per NPU, once its own node was
    inventory = Inventory()
    for what, index, suffix, how in events:
        names = [f"stc{index}{s}" for s in SUFFIXES]
        name = f"stc{index}{suffix}"
        if what == "plug":
            nodes.update(dict.fromkeys(names, NodeKind.CHAR_DEVICE))
        elif what == "unplug":
            for gone in names:
                nodes.pop(gone, None)
        elif what == "break":
            if how == "absent":
                nodes.pop(name, None)
            else:
                nodes[name] = NodeKind.OTHER
        else:
            nodes[name] = NodeKind.CHAR_DEVICE
        observations = [
            NodeObservation(n, kind, (240, position), genuine(n))
            if kind is NodeKind.CHAR_DEVICE
            else NodeObservation(n, kind)
            for position, (n, kind) in enumerate(nodes.items())
        ]
        inventory = inventory.updated(observations, RULES)
        for i in range(NPUS):
            own = f"stc{i}"
            if own in nodes or i in ever:
                ever.setdefault(i, set()).update(
                    n for n in nodes if NAMING.classify(n) == (i, n == own)
                )
        # Healthy = present: every node ever seen, and every required one, is
        # a char device now.
        expected = {
            f"stc{i}"
            for i, seen in ever.items()
            if all(nodes.get(n) is NodeKind.CHAR_DEVICE for n in seen | required(i))
        }
        assert inventory.healthy_ids() == expected
        assert set(inventory.npus) == {f"stc{i}" for i in ever}  # once seen, listed

    healthy = inventory.healthy_ids()
    try:
        plan = plan_allocation(inventory, ask, CONFIG.hpe)
    except AllocationError:
        assert not ask or not set(ask) <= healthy or len(set(ask)) != len(ask)
    else:
        assert ask
        assert set(ask) <= healthy  # never an unknown or unhealthy ID
        assert len(set(ask)) == len(ask)
        assert all(DEVICE_PATH.fullmatch(spec.host_path) for spec in plan.devices)
    try:
        chosen = preferred_allocation(inventory, available, must, size)
    except AllocationError:
        usable = (set(available) & healthy) | set(must)
        possible = (
            size > 0
            and len(set(available)) == len(available)
            and set(available) <= set(inventory.npus)
            and len(set(must)) == len(must)
            and set(must) <= set(available) & healthy
            and len(usable) >= size >= len(must)
        )
        assert not possible, (available, must, size)
    else:
        assert len(chosen) == size  # the requested size
        assert set(must) <= set(chosen)  # must-include first
        assert set(chosen) <= set(available)
        assert set(chosen) <= healthy


# --- the real process ---------------------------------------------------------

STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("unplug"), st.integers(0, 3)),
        st.tuples(st.just("replug"), st.integers(0, 3)),
        st.tuples(st.just("restart"), st.integers(0, 1)),
        st.tuples(st.just("allocate"), st.integers(0, 3)),
    ),
    min_size=1,
    max_size=8,
)


@pytest.mark.timeout(300)
@settings(max_examples=6, deadline=None)
@given(steps=STEPS)
def test_agent_process_over_random_sequences(steps: list[tuple[str, int]]) -> None:
    root = Path(tempfile.mkdtemp(prefix="stc-npu-"))
    node = SimNode(root / "node")
    for index in range(4):
        node.add_npu(index, numa_node=index // 2)
    plugin_dir = root / "dp"
    kubelet = KubeletEmulator(plugin_dir, version="1.32")
    kubelet.start()
    log_path = root / "agent.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "stc_npu_agent", "--kubelet-dir", str(plugin_dir),
             "--dev-dir", str(node.dev_dir), "--sys-dir", str(node.sys_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        kubelet.wait_registered(RESOURCE, timeout=30)
        for what, index in steps:
            present = set(node.present_npus())
            if what == "unplug" and index in present:
                node.unplug(index)
            elif what == "replug" and index not in present:
                node.replug(index)
            elif what == "restart":
                after = len(kubelet.registrations)
                kubelet.restart(crash=bool(index))
                kubelet.wait_registered(RESOURCE, after=after, timeout=30)
            elif what == "allocate":
                healthy_now = {d.id for d in kubelet.devices(RESOURCE).values() if d.healthy}
                device_id = f"stc{index}"
                try:
                    specs = kubelet.allocate(RESOURCE, [device_id], timeout=10).devices
                except grpc.RpcError:
                    # Refused: it must be unhealthy on the node right now.
                    assert index not in node.present_npus()
                else:
                    assert index in node.present_npus() or device_id in healthy_now
                    assert all(DEVICE_PATH.fullmatch(s.host_path) for s in specs)
            expected = {f"stc{i}": i in node.present_npus() for i in range(4)}
            kubelet.wait_until(
                lambda expected=expected: (
                    {  # type: ignore[misc]
                        d.id: d.healthy for d in kubelet.devices(RESOURCE).values()
                    }
                    == expected
                ),
                timeout=30,
                what=f"Healthy = present {expected}",
            )
        assert process.poll() is None
    finally:
        process.terminate()
        code = process.wait(30)
        kubelet.close()
        shutil.rmtree(root, ignore_errors=True)
    assert code == 0
