"""Allocation plans and the preferred-allocation policy (pure)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from stc_npu_agent.core.allocation import (
    DEVICES_ENV,
    AllocationError,
    DeviceSpec,
    ErrorKind,
    Mount,
    plan_allocation,
    preferred_allocation,
)
from stc_npu_agent.core.config import HpeConfig
from stc_npu_agent.core.devices import DeviceRules, Inventory, NodeKind, NodeObservation, PciInfo

RULES = DeviceRules()
MAPPED = HpeConfig("mapped", "/usr/local/hpe", "/opt/hpe")
UNMAPPED = HpeConfig("unmapped")


def nodes(index: int, numa: int | None) -> list[NodeObservation]:
    names = [f"stc{index}", *(f"stc{index}c{k}" for k in range(4)), f"stc{index}ctrl"]
    pci = PciInfo(numa, "0x23e2", "0x0100", f"0000:{index + 3:02x}:00.0", "stc")
    return [
        NodeObservation(name, NodeKind.CHAR_DEVICE, (240, index * 8 + k), pci)
        for k, name in enumerate(names)
    ]


def inventory(numa: Mapping[int, int | None], unhealthy: tuple[int, ...] = ()) -> Inventory:
    """NPUs by index -> NUMA node; the unhealthy ones lose their own node."""
    observations = [obs for index, node in numa.items() for obs in nodes(index, node)]
    full = Inventory().updated(observations, RULES)
    present = [obs for obs in observations if obs.name not in {f"stc{i}" for i in unhealthy}]
    return full.updated(present, RULES)


def test_one_npu_mapped() -> None:
    plan = plan_allocation(inventory({0: 0, 1: 0}), ["stc1"], MAPPED)
    assert [spec.host_path for spec in plan.devices] == [
        "/dev/stc1",
        "/dev/stc1c0",
        "/dev/stc1c1",
        "/dev/stc1c2",
        "/dev/stc1c3",
        "/dev/stc1ctrl",
    ]
    assert all(spec == DeviceSpec(spec.host_path, spec.host_path, "rw") for spec in plan.devices)
    assert plan.mounts == (Mount("/usr/local/hpe", "/opt/hpe", read_only=True),)
    # The HPE runtime's env, for HPE where the container sees it.
    assert dict(plan.envs) == {
        DEVICES_ENV: "stc1",
        "LD_LIBRARY_PATH": "/opt/hpe/lib",
        "RISCV": "/opt/hpe",
    }
    assert plan.cdi_devices == ()


def test_two_npus_unmapped_is_the_union_without_mount() -> None:
    plan = plan_allocation(inventory({0: 0, 1: 0, 2: 1}), ["stc2", "stc0"], UNMAPPED)
    paths = [spec.host_path for spec in plan.devices]
    assert len(paths) == 12
    assert paths[0] == "/dev/stc0"
    assert paths[6] == "/dev/stc2"
    assert not any(path.startswith("/dev/stc1") for path in paths)
    assert plan.mounts == ()
    assert dict(plan.envs) == {DEVICES_ENV: "stc0,stc2"}


@pytest.mark.parametrize(
    ("ids", "kind", "text"),
    [
        ([], ErrorKind.INVALID_ARGUMENT, "no device IDs"),
        (["stc9"], ErrorKind.INVALID_ARGUMENT, "unknown device IDs: 'stc9'"),
        (["stc0", "stc0"], ErrorKind.INVALID_ARGUMENT, "duplicate device IDs: 'stc0'"),
        (["../etc/passwd"], ErrorKind.INVALID_ARGUMENT, "unknown device IDs: '../etc/passwd'"),
        (["stc0\x00"], ErrorKind.INVALID_ARGUMENT, r"'stc0\x00'"),
        (["stc1"], ErrorKind.FAILED_PRECONDITION, "unhealthy device IDs: stc1: missing stc1"),
    ],
)
def test_refused_ids(ids: list[str], kind: ErrorKind, text: str) -> None:
    with pytest.raises(AllocationError) as caught:
        plan_allocation(inventory({0: 0, 1: 0}, unhealthy=(1,)), ids, MAPPED)
    assert caught.value.kind is kind
    assert text in caught.value.message


def test_many_unknown_ids_message_is_capped() -> None:
    ids = [f"x{i}" for i in range(10_000)]
    with pytest.raises(AllocationError) as caught:
        plan_allocation(inventory({0: 0}), ids, MAPPED)
    assert "and 9992 more" in caught.value.message
    assert len(caught.value.message) < 1000


# --- preferred allocation ---

FOUR_BY_TWO = {0: 0, 1: 0, 2: 1, 3: 1}


def test_prefers_a_single_numa_node() -> None:
    inv = inventory(FOUR_BY_TWO)
    assert preferred_allocation(inv, ["stc0", "stc2", "stc3", "stc1"], [], 2) == ["stc0", "stc1"]


def test_must_include_first_then_its_numa_node() -> None:
    inv = inventory(FOUR_BY_TWO)
    assert preferred_allocation(inv, ["stc0", "stc1", "stc2", "stc3"], ["stc3"], 2) == [
        "stc3",
        "stc2",
    ]


def test_best_fit_keeps_larger_numa_groups_whole() -> None:
    # NUMA 0 has three free NPUs, NUMA 1 one: a request of one takes NUMA 1's.
    inv = inventory({0: 0, 1: 0, 2: 0, 3: 1})
    assert preferred_allocation(inv, ["stc0", "stc1", "stc2", "stc3"], [], 1) == ["stc3"]


def test_spans_fewest_numa_nodes_when_none_fits() -> None:
    inv = inventory({0: 0, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2})
    result = preferred_allocation(inv, [f"stc{i}" for i in range(6)], [], 4)
    # The largest node first (three NPUs), then the best fit for the last one,
    # which leaves NUMA 2's pair whole.
    assert result == ["stc1", "stc2", "stc3", "stc0"]


def test_unhealthy_available_ids_are_skipped() -> None:
    inv = inventory(FOUR_BY_TWO, unhealthy=(0,))
    assert preferred_allocation(inv, ["stc0", "stc1", "stc2", "stc3"], [], 2) == ["stc2", "stc3"]


def test_no_numa_information_sorts_last() -> None:
    inv = inventory({0: None, 1: None, 2: 0, 3: 0})
    assert preferred_allocation(inv, ["stc0", "stc1", "stc2", "stc3"], [], 2) == ["stc2", "stc3"]


def test_deterministic_whatever_the_input_order() -> None:
    inv = inventory({i: i % 3 for i in range(9)})
    ids = [f"stc{i}" for i in range(9)]
    first = preferred_allocation(inv, ids, ["stc4"], 3)
    assert preferred_allocation(inv, list(reversed(ids)), ["stc4"], 3) == first
    assert first == ["stc4", "stc1", "stc7"]


@pytest.mark.parametrize(
    ("available", "must", "size", "kind", "text"),
    [
        (["stc0"], [], 0, ErrorKind.INVALID_ARGUMENT, "must be positive"),
        (["stc0"], [], -3, ErrorKind.INVALID_ARGUMENT, "must be positive, got -3"),
        (["stc0", "stc9"], [], 1, ErrorKind.INVALID_ARGUMENT, "unknown available IDs: 'stc9'"),
        (["stc0", "stc0"], [], 1, ErrorKind.INVALID_ARGUMENT, "duplicate available IDs"),
        (["stc0"], ["stc9"], 1, ErrorKind.INVALID_ARGUMENT, "unknown must-include IDs"),
        (["stc0"], ["stc2"], 1, ErrorKind.INVALID_ARGUMENT, "not in available: 'stc2'"),
        (
            ["stc0", "stc2"],
            ["stc0", "stc2"],
            1,
            ErrorKind.INVALID_ARGUMENT,
            "exceed the allocation size",
        ),
        (["stc0", "stc2"], [], 3, ErrorKind.FAILED_PRECONDITION, "exceeds the 2 healthy"),
        (["stc1", "stc2"], ["stc1"], 1, ErrorKind.FAILED_PRECONDITION, "unhealthy must-include"),
    ],
)
def test_preferred_refusals(
    available: list[str], must: list[str], size: int, kind: ErrorKind, text: str
) -> None:
    inv = inventory(FOUR_BY_TWO, unhealthy=(1,))
    with pytest.raises(AllocationError) as caught:
        preferred_allocation(inv, available, must, size)
    assert caught.value.kind is kind
    assert text in caught.value.message
