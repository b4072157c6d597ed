"""DRA, pure part: which devices of a claim are ours, and the checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from stc_npu_agent.core.config import StcSetDevices
from stc_npu_agent.core.devices import DeviceRules, Inventory
from stc_npu_agent.core.dra import (
    ClaimError,
    PreparedClaim,
    PreparedDevice,
    checkpoint_document,
    claim_spec,
    parse_checkpoint,
    prepare_claim,
)
from stc_npu_agent.discovery import DeviceScanner
from stc_npu_agent.draplugin import PreparedClaims
from stc_npu_agent.testing.simnode import SimNode

from . import cdi_checker
from .test_dra_e2e import claim

DRIVER = "npu.streamcomputing.com"
KIND = "streamcomputing.com/npu"


@pytest.fixture
def inventory(tmp_path: Path) -> Inventory:
    node = SimNode(tmp_path / "node")
    for index in range(2):
        node.add_npu(index, numa_node=0)
    rules = DeviceRules()
    scanner = DeviceScanner(node.dev_dir, node.sys_dir, rules)
    return Inventory().updated(scanner.scan(), rules, now=100.0, settle=0.0)


def prepare(document: dict[str, object], inventory: Inventory, uid: str = "u") -> PreparedClaim:
    return prepare_claim(
        document, uid=uid, driver=DRIVER, pool="node-a", kind=KIND, inventory=inventory
    )


def test_our_devices_only_with_their_cdi_ids(inventory: Inventory) -> None:
    document = claim("c", "u", ["stc1"])
    results = document["status"]["allocation"]["devices"]["results"]
    results.append({"request": "gpu", "driver": "gpu.example.com", "pool": "x", "device": "g0"})
    prepared = prepare(document, inventory)
    assert prepared == PreparedClaim(
        "u",
        "default",
        "c",
        (
            PreparedDevice(
                "npus",
                "node-a",
                "stc1",
                ("streamcomputing.com/npu=stc1", "streamcomputing.com/npu=claim-u-npus"),
            ),
        ),
        (("npus", ("STC_NPU_DEVICES=stc1",)),),
    )


@pytest.mark.parametrize(
    ("stc_set_devices", "env"),
    [
        ("none", ["STC_NPU_DEVICES=stc0,stc1"]),
        ("global", ["STC_NPU_DEVICES=stc0,stc1", "STC_SET_DEVICES=0,1,2,3,4,5,6,7"]),
        ("local", ["STC_NPU_DEVICES=stc0,stc1", "STC_SET_DEVICES=0,1,2,3,4,5,6,7"]),
    ],
)
def test_each_request_gets_the_env_that_lists_its_npus(
    inventory: Inventory, stc_set_devices: StcSetDevices, env: list[str]
) -> None:
    document = claim("c", "u", ["stc1", "stc0"])
    results = document["status"]["allocation"]["devices"]["results"]
    results.append({"request": "solo/a", "driver": DRIVER, "pool": "node-a", "device": "stc1"})
    prepared = prepare_claim(
        document,
        uid="u",
        driver=DRIVER,
        pool="node-a",
        kind=KIND,
        inventory=inventory,
        stc_set_devices=stc_set_devices,
    )
    spec = claim_spec(KIND, prepared)
    assert cdi_checker.problems(spec) == []
    envs = {device["name"]: device["containerEdits"]["env"] for device in spec["devices"]}
    solo = ["STC_NPU_DEVICES=stc1"]
    if stc_set_devices != "none":
        solo.append("STC_SET_DEVICES=" + ("4,5,6,7" if stc_set_devices == "global" else "0,1,2,3"))
    # A subrequest's "solo/a" is "solo.a" in a CDI name.
    assert envs == {"claim-u-npus": env, "claim-u-solo.a": solo}
    # Each device carries its NPU's ID and its own request's env ID.
    assert [d.cdi_device_ids[1] for d in prepared.devices] == [
        f"{KIND}=claim-u-npus",
        f"{KIND}=claim-u-npus",
        f"{KIND}=claim-u-solo.a",
    ]
    assert parse_checkpoint(checkpoint_document({"u": prepared})) == {"u": prepared}


def test_a_checkpoint_of_an_older_agent_has_no_request_env() -> None:
    older = (
        b'{"version": 1, "claims": {"u": {"namespace": "n", "name": "c", "devices": '
        b'[{"request": "r", "pool": "p", "device": "stc0", "cdiDeviceIds": ["k=stc0"]}]}}}'
    )
    (claim_read,) = parse_checkpoint(older).values()
    assert claim_read.request_env == ()
    assert claim_spec(KIND, claim_read)["devices"] == []


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (claim("c", "other", ["stc0"]), "claim default/c: UID is 'other', the kubelet asked"),
        ({"metadata": {"uid": "u", "namespace": "n", "name": "c"}}, "claim n/c: not allocated"),
        ("not a mapping", "claim /: UID is None"),
        (claim("c", "u", ["stc0"], pool="node-b"), "allocated in pool 'node-b'"),
        (claim("c", "u", ["stc7"]), "'stc7' is not an NPU of this node"),
        (claim("c", "u", ["x"], driver="other.example.com"), "no device of driver"),
    ],
)
def test_refusals_say_why_in_one_line(inventory: Inventory, document: object, message: str) -> None:
    with pytest.raises(ClaimError) as caught:
        prepare(document, inventory)  # type: ignore[arg-type]
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_checkpoint_round_trip() -> None:
    claims = {
        "u1": PreparedClaim("u1", "ns", "a", (PreparedDevice("r", "p", "stc0", ("k=stc0",)),)),
        "u2": PreparedClaim("u2", "ns", "b", ()),
    }
    assert parse_checkpoint(checkpoint_document(claims)) == claims


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{", "not JSON"),
        (b"[]", "not a version 1 checkpoint"),
        (b'{"version": 2, "claims": {}}', "not a version 1 checkpoint"),
        (b'{"version": 1, "claims": []}', "claims: expected a mapping"),
        (b'{"version": 1, "claims": {"u": {"name": "x"}}}', "claims: malformed entry"),
    ],
)
def test_bad_checkpoints_are_refused(content: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_checkpoint(content)


def test_an_unreadable_checkpoint_is_set_aside_not_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "checkpoint.json").write_text("{torn")
    store = PreparedClaims(tmp_path)
    with caplog.at_level(logging.WARNING):
        store.load()
    assert store.claims == {}
    assert (tmp_path / "checkpoint.json.bad").read_text() == "{torn"
    assert "set aside as checkpoint.json.bad" in caplog.text


def test_saving_is_atomic_and_private(tmp_path: Path) -> None:
    store = PreparedClaims(tmp_path / "state")
    store.save({"u": PreparedClaim("u", "ns", "c", ())})
    path = tmp_path / "state" / "checkpoint.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.json"]
    again = PreparedClaims(tmp_path / "state")
    again.load()
    assert list(again.claims) == ["u"]
