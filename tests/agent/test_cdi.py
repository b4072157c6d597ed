"""The CDI spec (pure core), checked against the CDI specification's rules,
and the Allocate plans of each deviceListStrategy and stcSetDevices mode."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stc_npu_agent.core.allocation import (
    SET_DEVICES_ENV,
    Delivery,
    cluster_ids,
    plan_allocation,
    spec_file_name,
)
from stc_npu_agent.core.cdi import build_spec, cdi_device_name_problem
from stc_npu_agent.core.config import (
    DEFAULT_MEMBER_PATTERN,
    Config,
    DiscoveryConfig,
    HpeConfig,
    cdi_kind_problem,
    parse_config,
)
from stc_npu_agent.core.devices import DeviceRules, Inventory, NodeKind, NodeObservation, PciInfo

from .cdi_checker import problems, required_version

KIND = "streamcomputing.com/npu"
MAPPED = HpeConfig("mapped", "/usr/local/hpe", "/usr/local/hpe")
UNMAPPED = HpeConfig("unmapped")
SUFFIXES = ["", "c0", "c1", "c2", "c3", "ctrl"]


def rules(npu_pattern: str = r"stc(?P<index>[0-9]+)", member_pattern: str = "") -> DeviceRules:
    """Naming rules only: no member is required, so partial NPUs stay listed."""
    return DeviceRules(
        DiscoveryConfig(
            npu_pattern=npu_pattern,
            member_pattern=member_pattern or DEFAULT_MEMBER_PATTERN,
            required_members=(),
        )
    )


def node(name: str, rules_: DeviceRules, minor: int = 0) -> NodeObservation:
    """A genuine NPU node: a char device of Stream Computing's PCI function."""
    classified = rules_.classify(name)
    index = classified[0] if classified else 0
    pci = PciInfo(vendor="0x23e2", address=f"0000:{index + 3:02x}:00.0", driver="stc")
    return NodeObservation(name, NodeKind.CHAR_DEVICE, (240, minor), pci, kernel_name=name)


def inventory(indexes: range | list[int], pattern: str = r"stc(?P<index>[0-9]+)") -> Inventory:
    rules_ = rules(pattern)
    observations = [
        node(f"stc{index}{suffix}", rules_, 8 * index + k)
        for index in indexes
        for k, suffix in enumerate(SUFFIXES)
    ]
    return Inventory().updated(observations, rules_)


@pytest.mark.parametrize("count", [1, 4, 8])
@pytest.mark.parametrize("hpe", [MAPPED, UNMAPPED], ids=["mapped", "unmapped"])
def test_spec_for_n_npus_is_valid_cdi(count: int, hpe: HpeConfig) -> None:
    spec = build_spec(inventory(range(count)), KIND, hpe)
    document = spec.document
    assert problems(document) == []
    assert document["cdiVersion"] == "0.3.0"  # the lowest: nothing newer is used
    assert document["kind"] == KIND
    assert spec.device_names == [f"stc{index}" for index in range(count)]
    for index, device in enumerate(document["devices"]):
        nodes = [node["path"] for node in device["containerEdits"]["deviceNodes"]]
        assert nodes == [f"/dev/stc{index}{suffix}" for suffix in SUFFIXES]
        # Nothing per device but its nodes (see the module docstring of core/cdi.py).
        assert set(device["containerEdits"]) == {"deviceNodes"}
    if hpe.mode == "mapped":
        assert document["containerEdits"] == {
            "env": ["LD_LIBRARY_PATH=/usr/local/hpe/lib", "RISCV=/usr/local/hpe"],
            "mounts": [
                {
                    "hostPath": "/usr/local/hpe",
                    "containerPath": "/usr/local/hpe",
                    "options": ["ro", "nosuid", "nodev", "rbind", "rprivate"],
                }
            ],
        }
    else:
        assert "containerEdits" not in document
    # It is JSON as written, and reads back the same.
    assert json.loads(json.dumps(document)) == document


def test_spec_lists_present_nodes_and_leaves_out_nodeless_npus() -> None:
    full = inventory(range(3))
    rules_ = rules()
    observations = [
        node(f"stc{index}{suffix}", rules_, 8 * index + SUFFIXES.index(suffix))
        for index, suffixes in ((0, SUFFIXES), (1, ["", "c0", "c1", "ctrl"]))
        for suffix in suffixes
    ]  # stc1 lost two clusters, stc2 is unplugged
    partial = full.updated(observations, rules_)
    spec = build_spec(partial, KIND, UNMAPPED)
    assert spec.device_names == ["stc0", "stc1"]
    stc1 = spec.document["devices"][1]["containerEdits"]["deviceNodes"]
    assert [node["path"] for node in stc1] == [
        "/dev/stc1",
        "/dev/stc1c0",
        "/dev/stc1c1",
        "/dev/stc1ctrl",
    ]
    assert problems(spec.document) == []


def test_no_npu_means_no_devices() -> None:
    spec = build_spec(Inventory(), KIND, MAPPED)
    assert spec.device_names == []
    assert "devices: at least one device is required" in problems(spec.document)


def test_version_rises_only_for_features_used() -> None:
    # A class with a dot needs 0.6.0; device names starting with a digit 0.5.0.
    dotted = build_spec(inventory([0]), "example.com/npu.v2", UNMAPPED).document
    assert dotted["cdiVersion"] == "0.6.0"
    assert problems(dotted) == []
    rules_ = rules(r"(?P<index>[0-9]+)", r"(?P<index>[0-9]+)c[0-9]")
    numbered = [node(name, rules_, minor) for minor, name in enumerate(("0", "0c0"))]
    digits = build_spec(Inventory().updated(numbered, rules_), KIND, UNMAPPED)
    assert digits.device_names == ["0"]
    assert digits.document["cdiVersion"] == "0.5.0"
    assert problems(digits.document) == []


def test_spec_file_name() -> None:
    assert spec_file_name(KIND) == "streamcomputing.com-npu.json"


# --- the checker can fail: each rule, broken once ---

VALID: dict[str, Any] = {
    "cdiVersion": "0.3.0",
    "kind": "example.com/npu",
    "devices": [{"name": "stc0", "containerEdits": {"deviceNodes": [{"path": "/dev/stc0"}]}}],
}


def _broken(change: str) -> dict[str, Any]:  # noqa: PLR0912 (one branch per rule)
    document = copy.deepcopy(VALID)
    device = document["devices"][0]
    edits = device["containerEdits"]
    if change == "no version":
        del document["cdiVersion"]
    elif change == "unknown version":
        document["cdiVersion"] = "0.2.0"
    elif change == "not semver":
        document["cdiVersion"] = "1"
    elif change == "kind without class":
        document["kind"] = "example.com"
    elif change == "vendor starting with a digit":
        document["kind"] = "3com.example/npu"
    elif change == "class with a slash":
        document["kind"] = "example.com/npu/x"
    elif change == "vendor not a DNS subdomain":
        document["kind"] = "Example_com/npu"
    elif change == "dotted class at 0.3.0":
        document["kind"] = "example.com/npu.v2"
    elif change == "no devices":
        document["devices"] = []
    elif change == "device without edits":
        device["containerEdits"] = {}
    elif change == "bad device name":
        device["name"] = "stc0/../x"
    elif change == "digit name at 0.3.0":
        device["name"] = "0"
    elif change == "duplicate device":
        document["devices"].append(copy.deepcopy(device))
    elif change == "relative node path":
        edits["deviceNodes"][0]["path"] = "dev/stc0"
    elif change == "node hostPath at 0.3.0":
        edits["deviceNodes"][0]["hostPath"] = "/dev/stc0"
    elif change == "bad permissions":
        edits["deviceNodes"][0]["permissions"] = "rwx"
    elif change == "env without =":
        edits["env"] = ["RISCV"]
    elif change == "env set twice":
        edits["env"] = ["A=1", "A=2"]
    elif change == "mount type at 0.3.0":
        edits["mounts"] = [{"hostPath": "/a", "containerPath": "/a", "type": "bind"}]
    elif change == "mount without containerPath":
        edits["mounts"] = [{"hostPath": "/a"}]
    elif change == "unknown field":
        document["containerSpec"] = {}
    elif change == "unknown device field":
        device["nameShort"] = ["x"]
    else:
        raise AssertionError(change)
    return document


BREAKS = [
    "no version",
    "unknown version",
    "not semver",
    "kind without class",
    "vendor starting with a digit",
    "class with a slash",
    "vendor not a DNS subdomain",
    "dotted class at 0.3.0",
    "no devices",
    "device without edits",
    "bad device name",
    "digit name at 0.3.0",
    "duplicate device",
    "relative node path",
    "node hostPath at 0.3.0",
    "bad permissions",
    "env without =",
    "env set twice",
    "mount type at 0.3.0",
    "mount without containerPath",
    "unknown field",
    "unknown device field",
]


def test_checker_passes_the_valid_document() -> None:
    assert problems(VALID) == []


@pytest.mark.parametrize("change", BREAKS)
def test_checker_catches(change: str) -> None:
    assert problems(_broken(change)), f"the checker missed: {change}"


def test_checker_version_table() -> None:
    assert required_version(VALID) == "0.3.0"
    assert required_version(_broken("node hostPath at 0.3.0")) == "0.5.0"
    assert required_version(_broken("mount type at 0.3.0")) == "0.4.0"
    assert required_version(_broken("dotted class at 0.3.0")) == "0.6.0"
    newer = _broken("node hostPath at 0.3.0")
    newer["cdiVersion"] = "0.5.0"
    assert problems(newer) == []


# --- names: the agent's rules agree with the checker's ---


@pytest.mark.parametrize(
    "kind",
    ["streamcomputing.com/npu", "a.b/c", "example.com/npu.v2", "x.io/n_p-u", "3com.example/npu"],
)
def test_kind_rule_agrees_with_the_checker(kind: str) -> None:
    document = {**VALID, "kind": kind, "cdiVersion": "0.6.0"}
    assert (cdi_kind_problem(kind) is None) == (problems(document) == [])


@pytest.mark.parametrize("name", ["stc0", "0", "npu:0", "a.b-c_d", "-x", "x-", "a/b", "a b", ""])
def test_device_name_rule_agrees_with_the_checker(name: str) -> None:
    device = {"name": name, "containerEdits": {"deviceNodes": [{"path": "/dev/x"}]}}
    document = {**VALID, "devices": [device], "cdiVersion": "0.5.0"}
    assert (cdi_device_name_problem(name) is None) == (problems(document) == [])


def test_npus_with_names_cdi_refuses_are_left_out_and_said() -> None:
    naming_pattern = r"stc(?P<index>[0-9]+)"
    good = inventory([0], naming_pattern)
    rules_ = rules(r"(?:stc|npu_)(?P<index>[0-9]+)_?")
    observations = [
        node("stc0", rules_, 0),
        node("npu_1_", rules_, 8),  # ends in "_": CDI refuses
    ]
    both = good.updated(observations, rules_)
    spec = build_spec(both, KIND, UNMAPPED)
    assert spec.device_names == ["stc0"]
    assert len(spec.skipped) == 1
    assert spec.skipped[0].startswith("npu_1_: CDI device name 'npu_1_'")
    assert problems(spec.document) == []


# --- Allocate plans per strategy ---


def delivery(document: dict[str, Any]) -> tuple[Config, Delivery]:
    config = parse_config(document)
    return config, Delivery.from_config(config)


def test_cdi_cri_alone_answers_names_only() -> None:
    config, how = delivery({"deviceListStrategy": ["cdi-cri"]})
    plan = plan_allocation(inventory(range(4)), ["stc3", "stc1"], config.hpe, how)
    assert plan.cdi_devices == ("streamcomputing.com/npu=stc1", "streamcomputing.com/npu=stc3")
    assert plan.devices == ()
    assert plan.mounts == ()  # the spec's containerEdits carry the HPE mount
    assert dict(plan.envs) == {"STC_NPU_DEVICES": "stc1,stc3"}


def test_both_strategies_answer_both() -> None:
    config, how = delivery({"deviceListStrategy": ["device-specs", "cdi-cri"]})
    plan = plan_allocation(inventory(range(2)), ["stc0"], config.hpe, how)
    assert plan.cdi_devices == ("streamcomputing.com/npu=stc0",)
    assert len(plan.devices) == 6
    assert len(plan.mounts) == 1
    assert dict(plan.envs)["RISCV"] == "/usr/local/hpe"


def test_device_specs_alone_answers_no_cdi_names() -> None:
    config, how = delivery({})
    plan = plan_allocation(inventory(range(2)), ["stc0"], config.hpe, how)
    assert plan.cdi_devices == ()
    assert len(plan.devices) == 6


@pytest.mark.parametrize(
    ("mode", "ids", "expected"),
    [
        ("global", ["stc1"], "4,5,6,7"),
        ("global", ["stc3", "stc1"], "4,5,6,7,12,13,14,15"),
        ("global", ["stc0"], "0,1,2,3"),
        ("local", ["stc1"], "0,1,2,3"),
        ("local", ["stc3", "stc1"], "0,1,2,3,4,5,6,7"),
        ("none", ["stc3", "stc1"], None),
    ],
)
def test_stc_set_devices(mode: str, ids: list[str], expected: str | None) -> None:
    for strategy in (["device-specs"], ["cdi-cri"]):
        config, how = delivery({"stcSetDevices": mode, "deviceListStrategy": strategy})
        plan = plan_allocation(inventory(range(4)), ids, config.hpe, how)
        assert dict(plan.envs).get(SET_DEVICES_ENV) == expected


def test_cluster_ids_follow_the_order_given() -> None:
    npus = inventory([2, 5]).ordered()
    assert cluster_ids(npus, "global") == [8, 9, 10, 11, 20, 21, 22, 23]
    assert cluster_ids(list(reversed(npus)), "global") == [20, 21, 22, 23, 8, 9, 10, 11]
    assert cluster_ids(npus, "local") == list(range(8))
    assert cluster_ids(npus, "none") == []


def test_spec_never_sets_what_allocate_computes_per_container() -> None:
    # Per-device env would be overwritten device by device in a multi-NPU
    # container (and would override Allocate's env): the spec has none.
    document = build_spec(inventory(range(8)), KIND, MAPPED).document
    env = [
        entry for device in document["devices"] for entry in device["containerEdits"].get("env", [])
    ]
    env += document["containerEdits"]["env"]
    assert not [
        entry for entry in env if entry.startswith(("STC_SET_DEVICES=", "STC_NPU_DEVICES="))
    ]


# --- any node the agent can see gives a valid spec ---

node_sets = st.dictionaries(
    st.integers(min_value=0, max_value=63),
    st.sets(st.sampled_from(SUFFIXES), min_size=1),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(
    first=node_sets,
    then=node_sets,
    mapped=st.booleans(),
    kind=st.sampled_from([KIND, "example.com/npu.v2", "a.b/c"]),
)
def test_any_inventory_gives_a_valid_spec_with_exactly_the_present_nodes(
    first: dict[int, set[str]], then: dict[int, set[str]], mapped: bool, kind: str
) -> None:
    """Two scans (NPUs come, go, lose nodes): the spec after the second is
    valid CDI, or has no device at all, and lists each NPU's present nodes."""
    rules_ = rules()

    def scan(nodes: dict[int, set[str]]) -> list[NodeObservation]:
        return [
            node(f"stc{index}{suffix}", rules_, 8 * index + SUFFIXES.index(suffix))
            for index, suffixes in nodes.items()
            for suffix in suffixes
        ]

    inventory_ = Inventory().updated(scan(first), rules_).updated(scan(then), rules_)
    spec = build_spec(inventory_, kind, MAPPED if mapped else UNMAPPED)
    listed = {
        device["name"]: [node["path"] for node in device["containerEdits"]["deviceNodes"]]
        for device in spec.document["devices"]
    }
    expected = {
        npu.id: [f"/dev/{name}" for name in npu.present_nodes]
        for npu in inventory_.ordered()
        if npu.present_nodes
    }
    assert listed == expected
    if listed:
        assert problems(spec.document) == []
