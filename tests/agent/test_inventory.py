"""The inventory (pure): discovery rules, health both ways, stable IDs."""

from __future__ import annotations

from stc_npu_agent.core.config import DEFAULT_MEMBER_PATTERN, DEFAULT_NPU_PATTERN
from stc_npu_agent.core.devices import (
    HEALTHY,
    SETTLING,
    UNHEALTHY,
    Inventory,
    Naming,
    NodeKind,
    NodeObservation,
    Npu,
    PciInfo,
    describe_changes,
    node_sort_key,
)

NAMING = Naming(DEFAULT_NPU_PATTERN, DEFAULT_MEMBER_PATTERN)


def char(name: str) -> NodeObservation:
    return NodeObservation(name, NodeKind.CHAR_DEVICE, (240, 0))


def npu_nodes(index: int) -> list[NodeObservation]:
    names = [f"stc{index}", *(f"stc{index}c{k}" for k in range(4)), f"stc{index}ctrl"]
    return [char(name) for name in names]


def scan(inventory: Inventory, observations: list[NodeObservation], **pci: PciInfo) -> Inventory:
    return inventory.updated(observations, NAMING, pci)


def test_naming_classifies_own_and_member_nodes() -> None:
    assert NAMING.classify("stc0") == (0, True)
    assert NAMING.classify("stc12") == (12, True)
    assert NAMING.classify("stc3c1") == (3, False)
    assert NAMING.classify("stc3ctrl") == (3, False)
    assert NAMING.classify("stcx") is None
    assert NAMING.classify("tty0") is None
    assert NAMING.classify("stc0c") is None


def test_full_npu_is_healthy_with_nodes_in_order() -> None:
    inventory = scan(Inventory(), list(reversed(npu_nodes(0))), stc0=PciInfo(numa_node=1))
    npu = inventory.npus["stc0"]
    assert npu.healthy
    assert npu.health == HEALTHY
    assert npu.numa_node == 1
    assert npu.expected_nodes == ("stc0", "stc0c0", "stc0c1", "stc0c2", "stc0c3", "stc0ctrl")
    assert npu.present_nodes == npu.expected_nodes


def test_natural_node_order() -> None:
    names = ["stc0c10", "stc0ctrl", "stc0c2", "stc0c0"]
    assert sorted(names, key=node_sort_key) == ["stc0c0", "stc0c2", "stc0c10", "stc0ctrl"]


def test_unplugged_npu_stays_listed_unhealthy_and_recovers() -> None:
    both = scan(Inventory(), npu_nodes(0) + npu_nodes(1))
    unplugged = scan(both, npu_nodes(0))
    assert set(unplugged.npus) == {"stc0", "stc1"}
    assert unplugged.npus["stc1"].health == UNHEALTHY
    assert "missing stc1" in unplugged.npus["stc1"].reason
    assert unplugged.npus["stc0"].healthy
    replugged = scan(unplugged, npu_nodes(0) + npu_nodes(1))
    assert replugged.npus["stc1"].healthy
    assert replugged.npus["stc1"].reason == ""


def test_missing_member_node_makes_npu_unhealthy() -> None:
    full = scan(Inventory(), npu_nodes(0))
    partial = scan(full, [obs for obs in npu_nodes(0) if obs.name != "stc0c2"])
    npu = partial.npus["stc0"]
    assert not npu.healthy
    assert npu.reason == "missing stc0c2"
    assert "stc0c2" not in npu.present_nodes


def test_node_that_is_not_a_char_device_is_unhealthy() -> None:
    full = scan(Inventory(), npu_nodes(0))
    replaced = [
        NodeObservation("stc0", NodeKind.OTHER) if obs.name == "stc0" else obs
        for obs in npu_nodes(0)
    ]
    npu = scan(full, replaced).npus["stc0"]
    assert not npu.healthy
    assert npu.reason == "not a character device: stc0"
    assert "stc0" not in npu.present_nodes


def test_first_seen_as_regular_file_is_unhealthy() -> None:
    inventory = scan(Inventory(), [NodeObservation("stc4", NodeKind.OTHER)])
    assert inventory.npus["stc4"].health == UNHEALTHY


def test_members_without_their_npu_node_are_ignored() -> None:
    inventory = scan(Inventory(), [char("stc5c0"), char("stc5ctrl")])
    assert inventory.npus == {}


def test_new_npu_appears() -> None:
    one = scan(Inventory(), npu_nodes(0))
    two = scan(one, npu_nodes(0) + npu_nodes(2))
    assert [npu.id for npu in two.ordered()] == ["stc0", "stc2"]
    assert two.healthy_ids() == {"stc0", "stc2"}


def test_ordered_is_by_index_not_by_name() -> None:
    inventory = scan(Inventory(), npu_nodes(10) + npu_nodes(2))
    assert [npu.id for npu in inventory.ordered()] == ["stc2", "stc10"]


def test_pci_info_is_kept_while_unplugged() -> None:
    full = scan(Inventory(), npu_nodes(0), stc0=PciInfo(numa_node=1, vendor="0x23e2"))
    gone = scan(full, [])
    assert gone.npus["stc0"].numa_node == 1
    assert gone.npus["stc0"].pci.vendor == "0x23e2"


class AlwaysHot:
    def __init__(self, bad: str) -> None:
        self.bad = bad
        self.seen: list[str] = []

    def problem(self, npu: Npu) -> str | None:
        self.seen.append(npu.id)
        return "temperature above shutdown limit" if npu.id == self.bad else None


def test_extra_health_check_runs_only_for_present_npus() -> None:
    check = AlwaysHot("stc1")
    full = Inventory().updated(npu_nodes(0) + npu_nodes(1), NAMING, {}, [check])
    assert full.npus["stc1"].reason == "temperature above shutdown limit"
    assert full.npus["stc0"].healthy
    check.seen.clear()
    Inventory(full.npus).updated(npu_nodes(0), NAMING, {}, [check])
    assert check.seen == ["stc0"]


def test_describe_changes_lines() -> None:
    before = scan(Inventory(), npu_nodes(0))
    after = scan(before, npu_nodes(0)[1:] + npu_nodes(1))
    lines = describe_changes(before, after)
    assert lines == [
        "stc0 Healthy -> Unhealthy (missing stc0)",
        "stc1 appeared: Healthy, NUMA none, 6 nodes",
    ]


def test_npus_present_at_the_first_scan_need_no_settle_time() -> None:
    first = Inventory().updated(npu_nodes(0), NAMING, {}, now=100.0, settle=0.25)
    assert first.npus["stc0"].healthy
    assert first.settles_at() is None


def test_a_new_npu_is_healthy_only_after_its_nodes_settled() -> None:
    start = Inventory().updated(npu_nodes(0), NAMING, {}, now=0.0, settle=0.25)
    # The driver makes stc1's nodes one by one: own node first.
    partial = start.updated(npu_nodes(0) + npu_nodes(1)[:1], NAMING, {}, now=10.0, settle=0.25)
    assert partial.npus["stc1"].reason == SETTLING
    assert not partial.npus["stc1"].healthy
    assert partial.settles_at() == 10.25
    # Each new node restarts the wait.
    more = partial.updated(npu_nodes(0) + npu_nodes(1)[:4], NAMING, {}, now=10.2, settle=0.25)
    assert not more.npus["stc1"].healthy
    assert more.settles_at() == 10.45
    full = more.updated(npu_nodes(0) + npu_nodes(1), NAMING, {}, now=10.3, settle=0.25)
    assert not full.npus["stc1"].healthy
    settled = full.updated(npu_nodes(0) + npu_nodes(1), NAMING, {}, now=10.6, settle=0.25)
    assert settled.npus["stc1"].healthy
    assert settled.npus["stc1"].present_nodes == tuple(o.name for o in npu_nodes(1))
    assert settled.settles_at() is None


def test_a_known_npu_coming_back_needs_no_settle_time() -> None:
    start = Inventory().updated(npu_nodes(0), NAMING, {}, now=0.0, settle=0.25)
    gone = start.updated([], NAMING, {}, now=5.0, settle=0.25)
    back = gone.updated(npu_nodes(0), NAMING, {}, now=6.0, settle=0.25)
    assert back.npus["stc0"].healthy
    assert back.settles_at() is None


def test_a_settling_npu_that_loses_a_node_reports_the_loss() -> None:
    start = Inventory().updated(npu_nodes(0), NAMING, {}, now=0.0, settle=0.25)
    new = start.updated(npu_nodes(0) + npu_nodes(1), NAMING, {}, now=1.0, settle=0.25)
    lost = new.updated(npu_nodes(0) + npu_nodes(1)[1:], NAMING, {}, now=1.1, settle=0.25)
    assert lost.npus["stc1"].reason == "missing stc1"
    assert lost.settles_at() is None
