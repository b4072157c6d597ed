"""Sharing an NPU (pure): replica IDs, Allocate over replicas, and the
preferred allocation's distinct-NPUs-first policy."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from stc_npu_agent.core.allocation import (
    DEVICES_ENV,
    SET_DEVICES_ENV,
    AllocationError,
    Delivery,
    ErrorKind,
    plan_allocation,
    preferred_allocation,
)
from stc_npu_agent.core.config import SharingConfig
from stc_npu_agent.core.sharing import npu_id_of, repeated_npus, replica_ids
from stc_npu_agent.plugin import list_response

from .test_allocation import MAPPED, inventory

FOUR_BY_TWO = {0: 0, 1: 0, 2: 1, 3: 1}
SHARED4 = SharingConfig(replicas=4)


def all_ids(npus: range | list[int], replicas: int) -> list[str]:
    return [device_id for i in npus for device_id in replica_ids(f"stc{i}", replicas)]


def test_replica_ids_and_back() -> None:
    assert replica_ids("stc0", 1) == ("stc0",)
    assert replica_ids("stc7", 3) == ("stc7::0", "stc7::1", "stc7::2")
    assert npu_id_of("stc7::2", 3) == "stc7"
    assert npu_id_of("stc0", 1) == "stc0"
    # Not replica IDs under 3: out of range, leading zero, no number, no NPU.
    for device_id in ("stc7::3", "stc7::01", "stc7::", "stc7", "::1", "stc7::-1", "stc7::１"):
        assert npu_id_of(device_id, 3) is None, device_id


# --- ListAndWatch ---


def test_every_replica_is_listed_with_its_npus_health_and_numa() -> None:
    inv = inventory({0: 0, 1: None, 2: 1}, unhealthy=(2,))
    devices = {d.ID: d for d in list_response(inv, 3).devices}
    assert list(devices) == all_ids([0, 1, 2], 3)
    for k in range(3):
        assert devices[f"stc0::{k}"].health == "Healthy"
        assert [n.ID for n in devices[f"stc0::{k}"].topology.nodes] == [0]
        assert not devices[f"stc1::{k}"].topology.nodes  # no NUMA facts: none given
        assert devices[f"stc2::{k}"].health == "Unhealthy"
        assert [n.ID for n in devices[f"stc2::{k}"].topology.nodes] == [1]


def test_one_replica_lists_the_npus_own_ids() -> None:
    assert [d.ID for d in list_response(inventory(FOUR_BY_TWO), 1).devices] == all_ids(range(4), 1)


# --- Allocate ---


def test_two_replicas_of_one_npu_give_its_nodes_once() -> None:
    delivery = Delivery(
        device_specs=True, cdi_kind="streamcomputing.com/npu", stc_set_devices="global"
    )
    plan = plan_allocation(
        inventory(FOUR_BY_TWO), ["stc1::3", "stc1::0", "stc0::2"], MAPPED, delivery, sharing=SHARED4
    )
    assert plan.npus == ("stc0", "stc1")
    paths = [spec.host_path for spec in plan.devices]
    assert len(paths) == len(set(paths)) == 12
    envs = dict(plan.envs)
    assert envs[DEVICES_ENV] == "stc0,stc1"
    assert envs[SET_DEVICES_ENV] == "0,1,2,3,4,5,6,7"
    assert plan.cdi_devices == ("streamcomputing.com/npu=stc0", "streamcomputing.com/npu=stc1")


@pytest.mark.parametrize(
    ("ids", "kind", "text"),
    [
        (["stc0::4"], ErrorKind.INVALID_ARGUMENT, "unknown device IDs: 'stc0::4'"),
        (["stc9::0"], ErrorKind.INVALID_ARGUMENT, "unknown device IDs: 'stc9::0'"),
        (["stc0::1", "stc0::1"], ErrorKind.INVALID_ARGUMENT, "duplicate device IDs: 'stc0::1'"),
        (["stc1::0", "stc1::2"], ErrorKind.FAILED_PRECONDITION, "unhealthy device IDs: stc1: "),
    ],
)
def test_refused_replica_ids(ids: list[str], kind: ErrorKind, text: str) -> None:
    with pytest.raises(AllocationError) as caught:
        plan_allocation(inventory(FOUR_BY_TWO, unhealthy=(1,)), ids, MAPPED, sharing=SHARED4)
    assert caught.value.kind is kind
    assert text in caught.value.message
    # One reason per NPU, however many of its replicas were asked for.
    assert caught.value.message.count("stc1: ") <= 1


@pytest.mark.parametrize(
    ("replicas", "old_id", "hint"),
    [
        (4, "stc0", "sharing.replicas is 4: IDs are <npu>::0 .. <npu>::3"),
        (2, "stc0::3", "sharing.replicas is 2: IDs are <npu>::0 .. <npu>::1"),
        (1, "stc0::1", "sharing is off: each NPU's ID is its own"),
    ],
)
def test_an_id_from_another_replicas_value_is_refused_with_why(
    replicas: int, old_id: str, hint: str
) -> None:
    with pytest.raises(AllocationError) as caught:
        plan_allocation(
            inventory(FOUR_BY_TWO), [old_id], MAPPED, sharing=SharingConfig(replicas=replicas)
        )
    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT
    message = caught.value.message
    assert message.startswith(f"unknown device IDs: {old_id!r} (")
    assert hint in message
    assert "from another sharing.replicas and is no longer advertised" in message


def test_an_unknown_id_of_no_known_npu_gets_no_hint() -> None:
    with pytest.raises(AllocationError) as caught:
        plan_allocation(inventory(FOUR_BY_TWO), ["stc9"], MAPPED, sharing=SHARED4)
    assert caught.value.message == "unknown device IDs: 'stc9'"


def test_fail_requests_greater_than_one() -> None:
    strict = SharingConfig(replicas=4, fail_requests_greater_than_one=True)
    inv = inventory(FOUR_BY_TWO)
    assert plan_allocation(inv, ["stc2::1"], MAPPED, sharing=strict).npus == ("stc2",)
    with pytest.raises(AllocationError) as caught:
        plan_allocation(inv, ["stc2::1", "stc3::0"], MAPPED, sharing=strict)
    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT
    assert caught.value.message == (
        "sharing.failRequestsGreaterThanOne: a container may get one replica of a shared NPU, "
        "this one asks for 2: 'stc2::1', 'stc3::0'"
    )
    # Without sharing the option has nothing to limit.
    unshared = SharingConfig(replicas=1, fail_requests_greater_than_one=True)
    assert plan_allocation(inv, ["stc2", "stc3"], MAPPED, sharing=unshared).npus == ("stc2", "stc3")


# --- preferred allocation ---


def test_distinct_npus_before_numa() -> None:
    inv = inventory(FOUR_BY_TWO)
    # Two replicas of stc0 would be on one NUMA node; two distinct NPUs of
    # NUMA 0 are preferred, and of each NPU its lowest free replica.
    available = all_ids(range(4), 4)
    assert preferred_allocation(inv, available, [], 2, replicas=4) == ["stc0::0", "stc1::0"]
    # Three: the most NPUs on the fewest NUMA nodes (two of NUMA 0 + one).
    assert preferred_allocation(inv, available, [], 3, replicas=4) == [
        "stc0::0",
        "stc1::0",
        "stc2::0",
    ]


def test_must_include_npu_is_not_taken_twice_while_others_are_free() -> None:
    inv = inventory(FOUR_BY_TWO)
    available = all_ids(range(4), 4)
    assert preferred_allocation(inv, available, ["stc3::2"], 2, replicas=4) == [
        "stc3::2",
        "stc2::0",  # stc3's NUMA node, another NPU
    ]


def test_only_replicas_of_used_npus_free_lowest_free_replica_is_taken() -> None:
    inv = inventory(FOUR_BY_TWO)
    available = ["stc0::3", "stc0::1", "stc2::2"]
    assert preferred_allocation(inv, available, [], 2, replicas=4) == ["stc0::1", "stc2::2"]


def test_larger_than_distinct_npus_packs_evenly() -> None:
    inv = inventory(FOUR_BY_TWO, unhealthy=(3,))
    available = all_ids(range(4), 4)
    chosen = preferred_allocation(inv, available, [], 7, replicas=4)
    # Three healthy NPUs: each once, then each again, then one a third time.
    assert chosen == ["stc0::0", "stc1::0", "stc2::0", "stc0::1", "stc1::1", "stc2::1", "stc0::2"]
    assert repeated_npus(chosen, 4) == {"stc0": 3, "stc1": 2, "stc2": 2}


def test_no_sharing_is_the_numa_policy_unchanged() -> None:
    inv = inventory({0: 0, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2})
    ids = all_ids(range(6), 1)
    assert preferred_allocation(inv, ids, [], 4) == ["stc1", "stc2", "stc3", "stc0"]
    assert repeated_npus(ids, 1) == {}


def test_preferred_refuses_ids_of_another_replicas_value() -> None:
    with pytest.raises(AllocationError) as caught:
        preferred_allocation(inventory(FOUR_BY_TWO), ["stc0", "stc1"], [], 1, replicas=2)
    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT
    assert "unknown available IDs: 'stc0', 'stc1' (sharing.replicas is 2" in caught.value.message


@st.composite
def requests(
    draw: st.DrawFn,
) -> tuple[dict[int, int | None], tuple[int, ...], int, list[str], list[str], int]:
    count = draw(st.integers(1, 6))
    numa = {i: draw(st.sampled_from([0, 1, 2, None])) for i in range(count)}
    unhealthy = tuple(draw(st.sets(st.integers(0, count - 1), max_size=count - 1)))
    replicas = draw(st.integers(1, 5))
    ids = all_ids(range(count), replicas)
    available = draw(st.lists(st.sampled_from(ids), unique=True, min_size=1))
    healthy_available = [i for i in available if int(i[3:].split("::")[0]) not in unhealthy]
    assume(healthy_available)
    must = draw(st.lists(st.sampled_from(healthy_available), unique=True))
    size = draw(st.integers(max(1, len(must)), len(healthy_available)))
    return numa, unhealthy, replicas, available, must, size


@settings(max_examples=300, deadline=None)
@given(requests(), st.randoms(use_true_random=False))
def test_preferred_properties(
    request: tuple[dict[int, int | None], tuple[int, ...], int, list[str], list[str], int],
    shuffler: random.Random,
) -> None:
    numa, unhealthy, replicas, available, must, size = request
    inv = inventory(numa, unhealthy=unhealthy)
    chosen = preferred_allocation(inv, available, must, size, replicas=replicas)

    assert len(chosen) == len(set(chosen)) == size
    assert chosen[: len(must)] == must
    assert set(chosen) <= set(available)
    npus = [npu_id_of(device_id, replicas) for device_id in chosen]
    assert all(npu is not None and inv.npus[npu].healthy for npu in npus)
    # The most distinct NPUs the request can have: all of them, or one per ID.
    offered = {npu_id_of(d, replicas) for d in available if d not in must}
    offered = {n for n in offered if n is not None and inv.npus[n].healthy}
    counts = Counter(npus)
    must_npus = {npu_id_of(d, replicas) for d in must}
    reachable = len(must_npus | offered)
    assert len(counts) == min(reachable, len(must_npus) + size - len(must))
    # The preference holds an NPU again only when every NPU with a free
    # replica is held (must_include may name one NPU's replicas twice itself).
    picked = npus[len(must) :]
    if any(npu in must_npus for npu in picked) or len(set(picked)) < len(picked):
        assert offered <= set(counts)
    # Deterministic whatever the order of available.
    shuffled = list(available)
    shuffler.shuffle(shuffled)
    assert preferred_allocation(inv, shuffled, must, size, replicas=replicas) == chosen
