"""Node labels through NFD's local feature file: the labels (pure), the sink
(atomic writes, refresh before expiry, removal), and the real agent process.

Every file is read back as nfd-worker reads it (``read_feature_file``, after
NFD's documented local feature source: ``name[=value]`` lines, value ``true``
when absent, ``#`` comments, the ``# +expiry-time=<RFC 3339>`` directive
after which the labels that follow are dropped once it has passed, files
over 64 kB and dot-files ignored).
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from stc_npu_agent.core import nfd
from stc_npu_agent.core.config import Config, ConfigError, NfdConfig, parse_config
from stc_npu_agent.core.devices import Inventory, NodeObservation
from stc_npu_agent.nfd import NfdFeatureFile
from stc_npu_agent.testing.kubelet import KubeletEmulator
from stc_npu_agent.testing.simnode import SimNode
from tests.agent.conftest import RESOURCE, AgentFactory
from tests.agent.test_inventory import npu_nodes, scan, stc_pci

MAX_FEATURE_FILE = 65536
DIRECTIVE = "# +"


def read_feature_file(path: Path, now: datetime) -> dict[str, str]:
    """The labels nfd-worker takes from ``path`` at ``now``."""
    if path.name.startswith(".") or path.stat().st_size > MAX_FEATURE_FILE:
        return {}
    labels: dict[str, str] = {}
    expiry: datetime | None = None
    for raw in path.read_text().split("\n"):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if line.startswith(DIRECTIVE):
                key, sep, text = line[len(DIRECTIVE) :].partition("=")
                assert key == "expiry-time", f"unknown directive {line!r}"
                assert sep, f"a directive without a value: {line!r}"
                expiry = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
            continue
        if expiry is not None and expiry < now:
            continue
        name, sep, value = line.partition("=")
        labels[name] = value if sep else "true"
    return labels


def labels_now(path: Path) -> dict[str, str]:
    return read_feature_file(path, datetime.now(UTC))


def stcp920(index: int) -> list[NodeObservation]:
    """NPU ``index``'s nodes: an STCP920 on NUMA node index // 2."""
    return npu_nodes(index, stc_pci(index, device="0x0100", numa_node=index // 2))


def inventory(*indices: int) -> Inventory:
    return scan(Inventory(), [n for index in indices for n in stcp920(index)])


def prefixed(**labels: str) -> dict[str, str]:
    return {f"{RESOURCE}.{key.replace('_', '-')}": value for key, value in labels.items()}


MODELS = dict(NfdConfig().models)


def test_labels_of_a_node() -> None:
    two = scan(inventory(0, 1), [*stcp920(0), *stcp920(1)[:-1]])
    versions = {nfd.DRIVER_VERSION: "1.9.2", nfd.HPE_VERSION: None}
    assert nfd.feature_labels(two, RESOURCE, MODELS, versions) == prefixed(
        present="true", count="2", healthy="1", model="STCP920", numa_nodes="1",
        driver_version="1.9.2",
    )  # fmt: skip


def test_no_npus_says_not_present() -> None:
    assert nfd.feature_labels(Inventory(), RESOURCE, MODELS, {}) == prefixed(
        present="false", count="0", healthy="0"
    )


def test_model_names_unknown_and_mixed() -> None:
    unknown = inventory(0)
    assert nfd.feature_labels(unknown, RESOURCE, {}, {})[f"{RESOURCE}.model"] == "0x0100"
    mixed = scan(
        Inventory(), [*stcp920(0), *npu_nodes(2, stc_pci(2, device="0x0200", numa_node=1))]
    )
    labels = nfd.feature_labels(mixed, RESOURCE, MODELS, {})
    assert labels[f"{RESOURCE}.model"] == "mixed"
    assert labels[f"{RESOURCE}.numa-nodes"] == "2"


@pytest.mark.parametrize("version", ["", "1.2 beta", "v1/2", "-1", "x" * 64])
def test_a_version_that_is_no_label_value_is_left_out(version: str) -> None:
    labels = nfd.feature_labels(inventory(0), RESOURCE, MODELS, {nfd.HPE_VERSION: version})
    assert f"{RESOURCE}.hpe-version" not in labels


def test_file_format_expires(tmp_path: Path) -> None:
    labels = prefixed(present="true", count="1")
    expires = datetime(2030, 7, 29, 11, 22, 33, tzinfo=UTC)
    text = nfd.feature_file(labels, expires)
    assert text.splitlines()[0] == "# +expiry-time=2030-07-29T11:22:33Z"
    path = tmp_path / "stc-npu"
    path.write_text(text)
    assert read_feature_file(path, datetime(2030, 7, 29, tzinfo=UTC)) == labels
    assert read_feature_file(path, datetime(2030, 7, 30, tzinfo=UTC)) == {}


def test_the_reader_can_fail(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("# +expiry-time=2000-01-01T00:00:00Z\na=b\n")
    assert labels_now(path) == {}
    path.write_text("a\n# c=d\nb=c\n")
    assert labels_now(path) == {"a": "true", "b": "c"}


# --- the sink -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def make_sink(
    tmp_path: Path, clock: Clock, *, other_agent: bool = False, **nfd_values: object
) -> NfdFeatureFile:
    features = tmp_path / "features.d"
    features.mkdir(exist_ok=True)
    config = parse_config(
        {
            "nfd": {"enabled": True, "featureFile": str(features / "stc-npu"), **nfd_values},
            "hpe": {"mode": "mapped"},
        }
    )
    return NfdFeatureFile(
        config,
        lambda: other_agent,
        sys_dir=tmp_path / "sys",
        hpe_dir=tmp_path / "hpe",
        clock=clock,
    )


def test_sink_writes_versions_the_node_shows(tmp_path: Path) -> None:
    (tmp_path / "sys/module/stc").mkdir(parents=True)
    (tmp_path / "sys/module/stc/version").write_text("2.3.0\n")
    (tmp_path / "hpe").mkdir()
    (tmp_path / "hpe/version").write_text("1.7.0\nbuilt somewhere\n")
    sink = make_sink(tmp_path, Clock())
    sink.update(inventory(0, 1))
    labels = labels_now(sink.path)
    assert labels[f"{RESOURCE}.driver-version"] == "2.3.0"
    assert labels[f"{RESOURCE}.hpe-version"] == "1.7.0"
    assert labels[f"{RESOURCE}.count"] == "2"
    assert os.stat(sink.path).st_mode & 0o777 == 0o644
    assert sorted(p.name for p in sink.path.parent.iterdir()) == ["stc-npu"]  # no temp left


def test_sink_rewrites_on_change_and_before_expiry_only(tmp_path: Path) -> None:
    clock = Clock()
    sink = make_sink(tmp_path, clock, expirySeconds=300)
    two = inventory(0, 1)
    sink.update(two)
    first = sink.path.stat().st_ino
    clock.now += 100
    sink.update(two)  # nothing changed, half-life not reached
    assert sink.path.stat().st_ino == first
    clock.now += 60  # 160 s: past half of 300
    sink.update(two)
    refreshed = sink.path.stat().st_ino
    assert refreshed != first  # a new file, renamed in
    expiry = sink.path.read_text().splitlines()[0].removeprefix("# +expiry-time=")
    assert datetime.fromisoformat(expiry.replace("Z", "+00:00")).timestamp() == pytest.approx(
        clock.now + 300, abs=1
    )
    one_gone = scan(two, stcp920(0))
    sink.update(one_gone)
    assert labels_now(sink.path)[f"{RESOURCE}.healthy"] == "1"
    # Deleted by someone: back at the next update.
    sink.path.unlink()
    sink.update(one_gone)
    assert labels_now(sink.path)[f"{RESOURCE}.count"] == "2"


def test_labels_vanish_when_the_agent_stops_refreshing(tmp_path: Path) -> None:
    clock = Clock()
    sink = make_sink(tmp_path, clock, expirySeconds=120)
    sink.update(inventory(0))
    later = datetime.fromtimestamp(clock.now + 121, UTC)
    assert read_feature_file(sink.path, later) == {}


def test_stop_removes_the_file_unless_another_agent_serves(tmp_path: Path) -> None:
    sink = make_sink(tmp_path, Clock())
    sink.update(inventory(0))
    sink.stop()
    assert not sink.path.exists()
    other = make_sink(tmp_path, Clock(), other_agent=True)
    other.update(inventory(0))
    other.stop()
    assert other.path.exists()


def test_a_missing_directory_is_one_warning_then_written_when_it_appears(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = make_sink(tmp_path, Clock())
    directory = sink.path.parent
    directory.rmdir()
    with caplog.at_level(logging.WARNING, logger="stc_npu_agent.nfd"):
        for _ in range(3):
            sink.update(inventory(0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(sink.path) in warnings[0]
    assert "No such file or directory" in warnings[0]
    directory.mkdir()
    sink.update(inventory(0))
    assert labels_now(sink.path)[f"{RESOURCE}.present"] == "true"


# --- config -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"nfd": {"enabled": "yes"}}, "nfd.enabled: expected true or false"),
        ({"nfd": {"expirySeconds": 30}}, "nfd.expirySeconds: must be at least 60"),
        ({"nfd": {"expirySeconds": True}}, "nfd.expirySeconds: expected a whole number"),
        ({"nfd": {"featureFile": "features.d/x"}}, "nfd.featureFile: must be an absolute path"),
        ({"nfd": {"models": {"0x100": "STCP920"}}}, "nfd.models: a PCI device ID is 0x"),
        ({"nfd": {"models": {"0x0100": "STC P920"}}}, "nfd.models.0x0100: a model name"),
        ({"nfd": {"models": ["STCP920"]}}, "nfd.models: expected a mapping"),
        ({"nfd": {"hpeVersionFile": "/version"}}, "nfd.hpeVersionFile: must be a normalized"),
        ({"nfd": {"hpeVersionFile": "../version"}}, "nfd.hpeVersionFile: must be a normalized"),
        ({"nfd": {"label": "x"}}, "nfd.label: unknown key"),
        ({"metrics": {"enabled": 1}}, "metrics.enabled: expected true or false"),
        ({"metrics": {"port": 9836}}, "metrics.port: unknown key"),
        (
            {"resourceName": f"example.com/{'n' * 50}", "nfd": {"enabled": True}},
            "resourceName: with nfd.enabled, the label names",
        ),
    ],
)
def test_bad_values_are_one_line_errors(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.")) as error:
        parse_config(raw)
    assert "\n" not in str(error.value)


def test_defaults() -> None:
    config = Config()
    assert config.metrics.enabled is False
    assert config.nfd.enabled is False
    assert config.nfd.feature_file == "/etc/kubernetes/node-feature-discovery/features.d/stc-npu"
    assert dict(config.nfd.models) == {"0x0100": "STCP920"}
    assert parse_config(config.to_mapping()) == config


# --- the real agent process ---------------------------------------------------


def wait_labels(path: Path, expected: dict[str, str], timeout: float = 30.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    labels: dict[str, str] = {}
    while time.monotonic() < deadline:
        labels = labels_now(path) if path.exists() else {}
        if all(labels.get(key) == value for key, value in expected.items()):
            return labels
        time.sleep(0.05)
    raise AssertionError(f"labels never had {expected}: {labels}")


def test_agent_labels_its_node_and_removes_them_on_stop(
    kubelet: KubeletEmulator, node: SimNode, start_agent: AgentFactory, tmp_path: Path
) -> None:
    (node.sys_dir / "module/stc").mkdir(parents=True)
    (node.sys_dir / "module/stc/version").write_text("2.3.0\n")
    features = tmp_path / "features.d"
    features.mkdir()
    path = features / "stc-npu"
    agent = start_agent({"nfd": {"enabled": True, "featureFile": str(path)}})
    labels = wait_labels(path, prefixed(count="4", healthy="4"))
    assert labels == prefixed(
        present="true", count="4", healthy="4", model="STCP920", numa_nodes="2",
        driver_version="2.3.0",
    )  # fmt: skip
    node.unplug(3)
    wait_labels(path, prefixed(count="4", healthy="3"))
    kubelet.wait_registered(RESOURCE)
    assert agent.terminate() == 0
    assert not path.exists()
    assert sorted(features.iterdir()) == []
