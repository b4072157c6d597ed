"""The inventory (pure): discovery rules, health both ways, stable IDs."""

from __future__ import annotations

from stc_npu_agent.core.config import DiscoveryConfig, SignalPolicy
from stc_npu_agent.core.devices import (
    HEALTHY,
    SETTLING,
    UNHEALTHY,
    DeviceRules,
    Inventory,
    Naming,
    NodeKind,
    NodeObservation,
    PciInfo,
    describe_changes,
    node_sort_key,
)
from stc_npu_agent.core.health import HealthBook, Reading

RULES = DeviceRules()
NAMING = RULES.naming
# Only the own node is required: nothing says how many nodes an NPU will have.
OWN_NODE_ONLY = DeviceRules(DiscoveryConfig(required_members=()))


def stc_pci(index: int, **facts: object) -> PciInfo:
    """A genuine NPU's PCI function: Stream Computing's, bound to stc."""
    genuine: dict[str, object] = {
        "vendor": "0x23e2",
        "address": f"0000:{index + 3:02x}:00.0",
        "driver": "stc",
    }
    return PciInfo(**{**genuine, **facts})  # type: ignore[arg-type]


def char(name: str, pci: PciInfo | None = None, minor: int = 0) -> NodeObservation:
    classified = NAMING.classify(name)
    index = classified[0] if classified else 0
    return NodeObservation(name, NodeKind.CHAR_DEVICE, (240, minor), pci or stc_pci(index))


def npu_nodes(index: int, pci: PciInfo | None = None) -> list[NodeObservation]:
    names = [f"stc{index}", *(f"stc{index}c{k}" for k in range(4)), f"stc{index}ctrl"]
    return [char(name, pci, index * 8 + k) for k, name in enumerate(names)]


def scan(inventory: Inventory, observations: list[NodeObservation]) -> Inventory:
    return inventory.updated(observations, RULES)


def test_naming_classifies_own_and_member_nodes() -> None:
    assert NAMING.classify("stc0") == (0, True)
    assert NAMING.classify("stc12") == (12, True)
    assert NAMING.classify("stc3c1") == (3, False)
    assert NAMING.classify("stc3ctrl") == (3, False)
    assert NAMING.classify("stcx") is None
    assert NAMING.classify("tty0") is None
    assert NAMING.classify("stc0c") is None


def test_leading_zeros_are_not_ours() -> None:
    # stc01 next to stc1 would both map to index 1 and mix their nodes.
    for name in ("stc01", "stc00", "stc01c0", "stc007ctrl"):
        assert NAMING.classify(name) is None, name
    assert NAMING.classify("stc0") == (0, True)
    assert NAMING.classify("stc10c0") == (10, False)


def test_an_index_that_is_no_decimal_number_is_not_ours() -> None:
    # Patterns are checked when the config is read, but whatever a pattern
    # lets through, classifying one name must never raise (a raise would fail
    # the whole scan): an index that is not a plain decimal number, or a
    # group that did not take part in the match, is simply not an NPU node.
    loose = Naming(r"stc(?P<index>[0-9a-z٠-٩]+)", r"stc(?P<index>[0-9]+)?c[0-9]")
    assert loose.classify("stcx") is None
    assert loose.classify("stc٣") is None  # an Arabic-Indic digit: int() takes it
    assert loose.classify("stcc0") is None  # the optional group took no part
    assert loose.classify("stc4") == (4, True)
    assert loose.classify("stc4c0") == (4, False)


def test_full_npu_is_healthy_with_nodes_in_order() -> None:
    inventory = scan(Inventory(), list(reversed(npu_nodes(0, stc_pci(0, numa_node=1)))))
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
    full = scan(Inventory(), npu_nodes(0, stc_pci(0, numa_node=1)))
    gone = scan(full, [])
    assert gone.npus["stc0"].numa_node == 1
    assert gone.npus["stc0"].pci.vendor == "0x23e2"


def test_vendor_signals_that_count_make_the_npu_unhealthy_with_their_reason() -> None:
    policies = {
        "cardStatus": SignalPolicy(fail_threshold=1),
        "temperature": SignalPolicy(action="ignore", fail_threshold=1),
    }
    book = HealthBook().observed("stc1", [Reading("cardStatus", True, "off")], policies)
    book = book.observed("stc0", [Reading("temperature", True, "90 C (alert 85 C)")], policies)
    inventory = Inventory().updated(npu_nodes(0) + npu_nodes(1), RULES, book)
    assert not inventory.npus["stc1"].healthy
    assert inventory.npus["stc1"].reason == "cardStatus off"
    # Ignored: shown in the signals, not in the health.
    assert inventory.npus["stc0"].healthy
    assert inventory.npus["stc0"].signals["temperature"].bad
    # The nodes' own signals are there too, and say why when bad.
    gone = Inventory(inventory.npus).updated(npu_nodes(0), RULES, book)
    assert gone.npus["stc1"].signals["presence"].bad
    assert (
        gone.npus["stc1"].reason
        == "missing "
        + ", ".join(f"stc1{suffix}" for suffix in ("", "c0", "c1", "c2", "c3", "ctrl"))
        + "; cardStatus off"
    )


def test_describe_changes_lines() -> None:
    before = scan(Inventory(), npu_nodes(0))
    after = scan(before, npu_nodes(0)[1:] + npu_nodes(1))
    lines = describe_changes(before, after)
    assert lines == [
        "stc0 Healthy -> Unhealthy (missing stc0)",
        "stc1 appeared: Healthy, NUMA none, 6 nodes",
    ]


def test_npus_present_at_the_first_scan_need_no_settle_time() -> None:
    first = Inventory().updated(npu_nodes(0), RULES, now=100.0, settle=0.25)
    assert first.npus["stc0"].healthy
    assert first.settles_at() is None


def test_a_new_npu_is_healthy_only_after_its_nodes_settled() -> None:
    # With no required members, only the settle time keeps a partial NPU out.
    start = Inventory().updated(npu_nodes(0), OWN_NODE_ONLY, now=0.0, settle=0.25)
    # The driver makes stc1's nodes one by one: own node first.
    partial = start.updated(npu_nodes(0) + npu_nodes(1)[:1], OWN_NODE_ONLY, now=10.0, settle=0.25)
    assert partial.npus["stc1"].reason == SETTLING
    assert not partial.npus["stc1"].healthy
    assert partial.settles_at() == 10.25
    # Each new node restarts the wait.
    more = partial.updated(npu_nodes(0) + npu_nodes(1)[:4], OWN_NODE_ONLY, now=10.2, settle=0.25)
    assert not more.npus["stc1"].healthy
    assert more.settles_at() == 10.45
    full = more.updated(npu_nodes(0) + npu_nodes(1), OWN_NODE_ONLY, now=10.3, settle=0.25)
    assert not full.npus["stc1"].healthy
    settled = full.updated(npu_nodes(0) + npu_nodes(1), OWN_NODE_ONLY, now=10.6, settle=0.25)
    assert settled.npus["stc1"].healthy
    assert settled.npus["stc1"].present_nodes == tuple(o.name for o in npu_nodes(1))
    assert settled.settles_at() is None


def test_a_known_npu_coming_back_needs_no_settle_time() -> None:
    start = Inventory().updated(npu_nodes(0), RULES, now=0.0, settle=0.25)
    gone = start.updated([], RULES, now=5.0, settle=0.25)
    back = gone.updated(npu_nodes(0), RULES, now=6.0, settle=0.25)
    assert back.npus["stc0"].healthy
    assert back.settles_at() is None


def test_a_settling_npu_that_loses_a_node_reports_the_loss() -> None:
    start = Inventory().updated(npu_nodes(0), RULES, now=0.0, settle=0.25)
    new = start.updated(npu_nodes(0) + npu_nodes(1), RULES, now=1.0, settle=0.25)
    lost = new.updated(npu_nodes(0) + npu_nodes(1)[1:], RULES, now=1.1, settle=0.25)
    assert lost.npus["stc1"].reason == "missing stc1"
    assert lost.settles_at() is None


def test_a_partial_npu_is_unhealthy_from_the_first_scan() -> None:
    # The required members (by default c0..c3 and ctrl) are known before any
    # node is seen: an NPU found without its ctrl node is never advertised whole.
    without_ctrl = [obs for obs in npu_nodes(0) if obs.name != "stc0ctrl"]
    npu = scan(Inventory(), without_ctrl).npus["stc0"]
    assert not npu.healthy
    assert npu.reason == "missing stc0ctrl"
    assert npu.expected_nodes[-1] == "stc0ctrl"
    # The same NPU with only its own node required is whole.
    assert Inventory().updated(without_ctrl, OWN_NODE_ONLY).npus["stc0"].healthy


def test_leading_zero_nodes_do_not_join_an_npu() -> None:
    impostors = [char("stc01", minor=8), char("stc01c0", minor=9), char("stc001ctrl", minor=13)]
    inventory = scan(Inventory(), npu_nodes(1) + impostors)
    assert list(inventory.npus) == ["stc1"]
    assert inventory.npus["stc1"].present_nodes == tuple(o.name for o in npu_nodes(1))
    assert inventory.npus["stc1"].healthy


def test_each_node_is_recorded_with_its_device_numbers() -> None:
    npu = scan(Inventory(), npu_nodes(1)).npus["stc1"]
    assert npu.devnums == {name: (240, 8 + k) for k, name in enumerate(npu.present_nodes)}


def foreign(name: str, why: str) -> NodeObservation:
    return NodeObservation(name, NodeKind.CHAR_DEVICE, (1, 3), None, why)


def test_impostors_are_never_healthy_and_say_why() -> None:
    other_vendor = stc_pci(4, vendor="0x1234")
    observations = [
        *npu_nodes(0),
        foreign("stc7", "1:3 is not a PCI device"),
        *npu_nodes(4, other_vendor),
        *npu_nodes(1, stc_pci(1, driver=None)),
        *npu_nodes(2, stc_pci(2, driver="vfio-pci")),
        *[
            char("stc3c1", stc_pci(0), minor=1) if obs.name == "stc3c1" else obs
            for obs in npu_nodes(3)
        ],
    ]
    inventory = scan(Inventory(), observations)
    assert inventory.healthy_ids() == {"stc0"}
    reasons = {npu.id: npu.reason for npu in inventory.ordered()}
    # A function's own problem is named once, at its first node.
    assert reasons["stc4"] == "stc4: PCI 0000:07:00.0 vendor 0x1234 is not allowed (0x23e2)"
    assert reasons["stc1"] == "stc1: PCI 0000:04:00.0 has no driver bound"
    assert reasons["stc2"] == "stc2: PCI 0000:05:00.0 is bound to vfio-pci, not stc"
    assert reasons["stc3"] == "stc3c1: on PCI 0000:03:00.0, not stc3's 0000:06:00.0"
    # It may be no NPU at all: that comes before what it lacks.
    assert reasons["stc7"] == (
        "stc7: 1:3 is not a PCI device; missing stc7c0, stc7c1, stc7c2, stc7c3, stc7ctrl"
    )


def test_allowed_vendors_and_drivers_are_configuration() -> None:
    rules = DeviceRules(DiscoveryConfig(pci_vendors=("0x1234", "0x23e2"), drivers=("stc2",)))
    inventory = Inventory().updated(
        npu_nodes(0, stc_pci(0, vendor="0x1234", driver="stc2")) + npu_nodes(1), rules
    )
    assert inventory.healthy_ids() == {"stc0"}
    assert inventory.npus["stc1"].reason == "stc1: PCI 0000:04:00.0 is bound to stc, not stc2"


def test_a_node_turning_into_an_impostor_and_back() -> None:
    full = scan(Inventory(), npu_nodes(0))
    swapped = [foreign("stc0c2", "1:3 is not a PCI device") if o.name == "stc0c2" else o
               for o in npu_nodes(0)]  # fmt: skip
    bad = scan(full, swapped)
    assert bad.npus["stc0"].reason == "stc0c2: 1:3 is not a PCI device"
    assert bad.npus["stc0"].pci.address == "0000:03:00.0"
    both = [foreign(o.name, "1:3 is not a PCI device") if o.name in {"stc0c2", "stc0c3"} else o
            for o in npu_nodes(0)]  # fmt: skip
    worse = scan(bad, both)
    back = scan(worse, npu_nodes(0))
    assert back.npus["stc0"].healthy
    assert describe_changes(full, bad) == [
        "stc0 Healthy -> Unhealthy (stc0c2: 1:3 is not a PCI device)"
    ]
    # A new impostor while already Unhealthy is one line too; a rescan that
    # changes nothing is none.
    assert describe_changes(bad, worse) == [
        "stc0 still Unhealthy, nodes that are not its own: stc0c2: 1:3 is not a PCI device; "
        "stc0c3: 1:3 is not a PCI device"
    ]
    assert describe_changes(worse, scan(worse, both)) == []
    assert describe_changes(worse, back) == ["stc0 Unhealthy -> Healthy"]


def test_an_own_node_without_pci_keeps_the_known_pci_facts() -> None:
    full = scan(Inventory(), npu_nodes(0, stc_pci(0, numa_node=1)))
    swapped = [foreign("stc0", "1:3 is not a PCI device") if o.name == "stc0" else o
               for o in npu_nodes(0, stc_pci(0, numa_node=1))]  # fmt: skip
    npu = scan(full, swapped).npus["stc0"]
    assert npu.numa_node == 1
    assert npu.reason == "stc0: 1:3 is not a PCI device"


def test_a_node_of_no_device_is_dead_and_logged_with_health_only() -> None:
    full = scan(Inventory(), npu_nodes(0))
    dying = [NodeObservation(o.name, NodeKind.NO_DEVICE, o.rdev) if o.name == "stc0ctrl" else o
             for o in npu_nodes(0)]  # fmt: skip
    half = scan(full, dying)
    assert half.npus["stc0"].reason == "no device behind stc0ctrl"
    gone = scan(half, [o for o in npu_nodes(0) if o.name != "stc0ctrl"])
    assert describe_changes(full, half) == ["stc0 Healthy -> Unhealthy (no device behind stc0ctrl)"]
    assert describe_changes(half, gone) == []
