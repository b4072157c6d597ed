"""DRA, pure part: which devices of a claim are ours, and the checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from stc_npu_agent.core.devices import DeviceRules, Inventory
from stc_npu_agent.core.dra import (
    ClaimError,
    PreparedClaim,
    PreparedDevice,
    checkpoint_document,
    parse_checkpoint,
    prepare_claim,
)
from stc_npu_agent.discovery import DeviceScanner
from stc_npu_agent.draplugin import PreparedClaims
from stc_npu_agent.testing.simnode import SimNode

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
        (PreparedDevice("npus", "node-a", "stc1", ("streamcomputing.com/npu=stc1",)),),
    )


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
