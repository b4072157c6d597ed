"""Config parsing (pure) and loading (file shell): defaults, refusals, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from stc_npu_agent.core.config import (
    MAX_REPLICAS,
    Config,
    ConfigError,
    DiscoveryConfig,
    HpeConfig,
    SharingConfig,
    extended_resource_name_problem,
    parse_config,
)
from stc_npu_agent.settings import load_config


def test_empty_document_means_defaults() -> None:
    config = parse_config(None)
    assert config == Config()
    assert config.resource_name == "streamcomputing.com/npu"
    assert config.hpe == HpeConfig("mapped", "/usr/local/hpe", "/usr/local/hpe")


def test_full_document_is_parsed() -> None:
    config = parse_config(
        {
            "resourceName": "example.com/accel",
            "hpe": {"mode": "unmapped", "hostPath": "/opt/hpe", "containerPath": "/usr/local/hpe"},
            "discovery": {
                "npuPattern": r"npu(?P<index>\d+)",
                "memberPattern": r"npu(?P<index>\d+)x",
                "requiredMembers": ["npu{index}x"],
                "pciVendors": ["0x23e2", "0x1e3a"],
                "drivers": ["stc", "stc_next"],
            },
        }
    )
    assert config.resource_name == "example.com/accel"
    assert config.hpe == HpeConfig("unmapped", "/opt/hpe", "/usr/local/hpe")
    assert config.discovery == DiscoveryConfig(
        r"npu(?P<index>\d+)",
        r"npu(?P<index>\d+)x",
        required_members=("npu{index}x",),
        pci_vendors=("0x23e2", "0x1e3a"),
        drivers=("stc", "stc_next"),
    )


def test_discovery_defaults_are_the_documented_npu() -> None:
    discovery = parse_config(None).discovery
    assert discovery.required_members == (
        "stc{index}c0",
        "stc{index}c1",
        "stc{index}c2",
        "stc{index}c3",
        "stc{index}ctrl",
    )
    assert discovery.pci_vendors == ("0x23e2",)
    assert discovery.drivers == ("stc",)
    # An NPU with its own node only, for other card generations.
    assert parse_config({"discovery": {"requiredMembers": []}}).discovery.required_members == ()


def test_round_trip_through_to_mapping() -> None:
    config = parse_config({"hpe": {"mode": "unmapped"}})
    assert parse_config(config.to_mapping()) == config


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"resourceNmae": "a.com/b"}, "resourceNmae: unknown key"),
        ({"hpe": {"mod": "mapped"}}, "hpe.mod: unknown key"),
        ({"discovery": {"pattern": "x"}}, "discovery.pattern: unknown key"),
        ({"hpe": {"mode": "bogus"}}, "hpe.mode: expected one of mapped, unmapped, got 'bogus'"),
        ({"hpe": {"mode": True}}, "hpe.mode: expected one of mapped, unmapped, got a boolean"),
        ({"hpe": "mapped"}, "hpe: expected a mapping, got 'mapped'"),
        ({"hpe": {"hostPath": "usr/local/hpe"}}, "hpe.hostPath: must be an absolute path"),
        ({"hpe": {"hostPath": "/usr/../etc"}}, "hpe.hostPath: must be a normalized"),
        ({"hpe": {"containerPath": 5}}, "hpe.containerPath: expected a string, got a number"),
        ({"resourceName": 7}, "resourceName: expected a string, got a number (7)"),
        ({"resourceName": "npu"}, "resourceName: invalid resource name 'npu'"),
        ({"resourceName": "kubernetes.io/npu"}, "reserved for native resources"),
        ({"resourceName": "requests.a.com/npu"}, "must not start with 'requests.'"),
        ({"resourceName": "Example.com/npu"}, "is not a valid DNS subdomain"),
        ({"resourceName": "a.com/" + "n" * 64}, "at most 63 characters"),
        (
            {"discovery": {"npuPattern": "stc("}},
            "discovery.npuPattern: not a valid regular expression",
        ),
        ({"discovery": {"memberPattern": "stc[0-9]+c"}}, "group named 'index'"),
        # An index that can be empty: the node "stc" would have no index.
        (
            {"discovery": {"npuPattern": "stc(?P<index>[0-9]*)"}},
            "discovery.npuPattern: the group 'index' can match an empty string",
        ),
        (
            {"discovery": {"memberPattern": "stc(?P<index>[0-9]?)c[0-9]"}},
            "discovery.memberPattern: the group 'index' can match an empty string",
        ),
        (
            {"discovery": {"npuPattern": "stc(?P<index>[0-9]+)?"}},
            "discovery.npuPattern: the group 'index' is optional",
        ),
        (
            {"discovery": {"npuPattern": "stc(x|(?P<index>[0-9]+))"}},
            "discovery.npuPattern: the group 'index' is optional",
        ),
        (["a"], "top level: expected a mapping, got a list"),
        ({"discovery": {"requiredMembers": "c0"}}, "discovery.requiredMembers: expected a list"),
        (
            {"discovery": {"requiredMembers": [5]}},
            "discovery.requiredMembers[0]: expected a string",
        ),
        (
            {"discovery": {"requiredMembers": ["stc{index}c0", "stc0c1"]}},
            "discovery.requiredMembers[1]: must contain {index} once",
        ),
        (
            {"discovery": {"requiredMembers": ["stc{index}c0", "stc{index}c0"]}},
            "discovery.requiredMembers: listed twice: stc{index}c0",
        ),
        (
            {"discovery": {"requiredMembers": ["stc{index}c0", "stc{index}x"]}},
            "discovery.requiredMembers[1]: 'stc0x' is not a member of NPU 0 by memberPattern",
        ),
        (
            {"discovery": {"requiredMembers": ["stc{index}"]}},
            "discovery.requiredMembers[0]: 'stc0' is an NPU's own node by npuPattern",
        ),
        (
            # Custom patterns need their own member names: the defaults are stc's.
            {"discovery": {"memberPattern": "npu(?P<index>[0-9]+)c[0-9]"}},
            "discovery.requiredMembers[0]: 'stc0c0' is not a member of NPU 0",
        ),
        ({"discovery": {"pciVendors": []}}, "discovery.pciVendors: must list at least one"),
        ({"discovery": {"pciVendors": ["23e2"]}}, "discovery.pciVendors[0]: a PCI vendor ID"),
        ({"discovery": {"pciVendors": ["0x23E2"]}}, "lower-case hex digits"),
        ({"discovery": {"pciVendors": "0x23e2"}}, "discovery.pciVendors: expected a list"),
        ({"discovery": {"drivers": []}}, "discovery.drivers: must list at least one"),
        ({"discovery": {"drivers": ["../stc"]}}, "discovery.drivers[0]: not a kernel driver"),
        ({"discovery": {"drivers": [""]}}, "discovery.drivers[0]: must not be empty"),
    ],
)
def test_bad_documents_are_refused_naming_the_key(document: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "name", ["streamcomputing.com/npu", "a.b/c", "example.com/npu-2.x_y", "x.io/" + "n" * 63]
)
def test_valid_resource_names(name: str) -> None:
    assert extended_resource_name_problem(name) is None


@pytest.mark.parametrize(
    "name", ["", "a/b/c", "/npu", "a.com/", "a.com/-npu", "sub.kubernetes.io/npu", "a_b.com/npu"]
)
def test_invalid_resource_names(name: str) -> None:
    assert extended_resource_name_problem(name) is not None


def test_load_config_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("resourceName: example.com/npu\nhpe:\n  mode: unmapped\n")
    config = load_config(path)
    assert config.resource_name == "example.com/npu"
    assert config.hpe.mode == "unmapped"


def test_load_config_empty_file_is_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("")
    assert load_config(path) == Config()


def test_load_config_none_is_defaults() -> None:
    assert load_config(None) == Config()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("hpe: [unclosed\n", "line 2: invalid YAML"),
        ("hpe:\n  mode: bogus\n", "hpe.mode: expected one of"),
        ("hpe:\n  bad: 1\n", "hpe.bad: unknown key"),
    ],
)
def test_load_config_errors_name_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"config {path}")
    assert message in str(caught.value)


def test_load_config_directory_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")


# --- device delivery: deviceListStrategy, stcSetDevices, cdi ---


def test_delivery_defaults() -> None:
    config = parse_config(None)
    assert config.device_list_strategy == ("device-specs",)
    assert config.stc_set_devices == "none"
    assert config.cdi.spec_dir == "/var/run/cdi"
    assert not config.uses_cdi


def test_delivery_keys_are_parsed() -> None:
    config = parse_config(
        {
            "deviceListStrategy": ["cdi-cri", "device-specs"],
            "stcSetDevices": "local",
            "cdi": {"specDir": "/run/test/cdi"},
        }
    )
    assert config.device_list_strategy == ("cdi-cri", "device-specs")
    assert config.stc_set_devices == "local"
    assert config.cdi.spec_dir == "/run/test/cdi"
    assert config.uses_cdi
    assert parse_config(config.to_mapping()) == config


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"deviceListStrategy": []}, "deviceListStrategy: must name at least one of"),
        ({"deviceListStrategy": "cdi-cri"}, "deviceListStrategy: expected a list of"),
        ({"deviceListStrategy": None}, "deviceListStrategy: expected a list of"),
        (
            {"deviceListStrategy": ["cdi-cri", "cdi-cri"]},
            "deviceListStrategy: cdi-cri listed more than once",
        ),
        (
            {"deviceListStrategy": ["device-specs", "cdi-annotations"]},
            "deviceListStrategy: unknown strategy 'cdi-annotations' (known: device-specs, cdi-cri)",
        ),
        ({"deviceListStrategy": [1]}, "unknown strategy a number (1)"),
        ({"stcSetDevices": "all"}, "stcSetDevices: expected one of none, global, local, got 'all'"),
        ({"stcSetDevices": False}, "stcSetDevices: expected one of none, global, local"),
        ({"cdi": {"specDir": "cdi"}}, "cdi.specDir: must be an absolute path"),
        ({"cdi": {"dir": "/etc/cdi"}}, "cdi.dir: unknown key"),
        ({"cdi": "/etc/cdi"}, "cdi: expected a mapping"),
        (
            {"deviceListStrategy": ["cdi-cri"], "resourceName": "3com.example/npu"},
            "deviceListStrategy: cdi-cri names devices by the CDI kind '3com.example/npu'",
        ),
        (
            {"deviceListStrategy": ["cdi-cri"], "resourceName": "example.com/2npu"},
            "class '2npu' must start with a letter",
        ),
    ],
)
def test_bad_delivery_is_refused_in_one_line(document: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_resource_name_cdi_refuses_is_fine_without_cdi() -> None:
    assert parse_config({"resourceName": "3com.example/npu"}).resource_name == "3com.example/npu"


def test_sharing_defaults_to_none() -> None:
    config = parse_config(None)
    assert config.sharing == SharingConfig(1, rename_shared=False)
    assert not config.sharing.shared
    assert config.advertised_resource == "streamcomputing.com/npu"


def test_sharing_keys_are_parsed_and_round_trip() -> None:
    config = parse_config(
        {"sharing": {"replicas": 4, "renameShared": True, "failRequestsGreaterThanOne": True}}
    )
    assert config.sharing == SharingConfig(
        4, rename_shared=True, fail_requests_greater_than_one=True
    )
    assert config.advertised_resource == "streamcomputing.com/npu.shared"
    assert parse_config(config.to_mapping()) == config
    # The highest bound is allowed.
    assert parse_config({"sharing": {"replicas": MAX_REPLICAS}}).sharing.replicas == MAX_REPLICAS


def test_rename_shared_renames_only_what_is_shared() -> None:
    config = parse_config({"sharing": {"replicas": 1, "renameShared": True}})
    assert config.advertised_resource == "streamcomputing.com/npu"


OUT_OF_RANGE = "sharing.replicas: must be 1 (no sharing) to 100"
NOT_A_NUMBER = "sharing.replicas: expected a whole number 1-100, got "


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"sharing": {"replica": 2}}, "sharing.replica: unknown key"),
        ({"sharing": 2}, "sharing: expected a mapping, got a number (2)"),
        ({"sharing": {"replicas": 0}}, "sharing.replicas: must be 1 (no sharing) to 100, got 0"),
        (
            {"sharing": {"replicas": 101}},
            "sharing.replicas: must be 1 (no sharing) to 100, got 101",
        ),
        (
            {"sharing": {"replicas": "4"}},
            "sharing.replicas: expected a whole number 1-100, got '4'",
        ),
        (
            {"sharing": {"replicas": 2.0}},
            "sharing.replicas: expected a whole number 1-100, got a number",
        ),
        (
            {"sharing": {"replicas": True}},
            "sharing.replicas: expected a whole number 1-100, got a boolean",
        ),
        (
            {"sharing": {"renameShared": "yes"}},
            "sharing.renameShared: expected true or false, got 'yes'",
        ),
        (
            {"sharing": {"failRequestsGreaterThanOne": 1}},
            "sharing.failRequestsGreaterThanOne: expected true or false, got a number (1)",
        ),
        (
            # 57 + ".shared" is 64 characters: the kubelet would refuse the name.
            {"resourceName": "a.com/" + "n" * 57, "sharing": {"replicas": 2, "renameShared": True}},
            "sharing.renameShared: the shared resource 'a.com/" + "n" * 57 + ".shared' "
            "(resourceName + '.shared') is not a valid resource name: name ",
        ),
    ],
)
def test_bad_sharing_is_refused_in_one_line(document: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_long_resource_name_is_fine_unrenamed() -> None:
    name = "a.com/" + "n" * 57
    assert (
        parse_config({"resourceName": name, "sharing": {"replicas": 2}}).advertised_resource == name
    )
