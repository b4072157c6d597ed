"""The commands the docs give, checked on rendered output.

Every `helm install`/`helm upgrade` of chart/stc-npu in README.md, the
chart's README and docs/operations.md is rendered with its --set flags. An
upgrade with --reset-then-reuse-values is rendered as Helm computes it
(pkg/action/upgrade.go): the new chart's defaults, under the upgrade's own
values coalesced over the previous release's user values
(chartutil.CoalesceTables, where a null removes the old value). The migration
from the vendor's DaemonSet is replayed on a node's labels: after each
documented command the node must run at most one plugin, and at the end
stc-npu's.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shlex
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.chart.chartkit import REPO, Render, render, render_error

DOCS = [
    REPO / "README.md",
    REPO / "chart" / "stc-npu" / "README.md",
    REPO / "docs" / "operations.md",
]
VALUE_FLAGS = {"--set", "--set-string"}


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^ *```(?:sh|bash)\n(.*?)^ *```", text, re.MULTILINE | re.DOTALL)


def _commands(block: str) -> list[list[str]]:
    """Shell commands of a block: continuation lines joined, quotes spanning
    lines kept together, comments dropped."""
    commands: list[list[str]] = []
    pending = ""
    for line in block.splitlines():
        pending += line.removesuffix("\\") + ("\n" if not line.endswith("\\") else " ")
        if line.endswith("\\"):
            continue
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if words:
            commands.append(words)
        pending = ""
    return commands


def _chart_commands(path: Path) -> list[list[str]]:
    return [
        words
        for block in _code_blocks(path.read_text(encoding="utf-8"))
        for words in _commands(block)
        if words[:1] == ["helm"] and words[1:2] in (["install"], ["upgrade"])
    ]


def _value_args(words: list[str]) -> list[tuple[str, str]]:
    return [(flag, value) for flag, value in itertools.pairwise(words) if flag in VALUE_FLAGS]


def _scalar(flag: str, text: str) -> object:
    """A --set value as helm's strvals reads the simple ones the docs use."""
    if flag == "--set-string":
        return text
    if text == "null":
        return None
    if text in ("true", "false"):
        return text == "true"
    return int(text) if text.isdigit() else text


def _values(flags: list[tuple[str, str]]) -> dict[str, Any]:
    """--set/--set-string flags as a values tree (dotted keys, \\. escapes)."""
    values: dict[str, Any] = {}
    for flag, item in flags:
        key, _, text = item.partition("=")
        path = [part.replace("\x00", ".") for part in key.replace("\\.", "\x00").split(".")]
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _scalar(flag, text)
    return values


def _coalesce_tables(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    """Helm's chartutil.CoalesceTables: src fills what dst lacks; a null in
    dst removes the key."""
    for key, value in src.items():
        if key in dst and dst[key] is None:
            del dst[key]
        elif key not in dst:
            dst[key] = value
        elif isinstance(value, dict) and isinstance(dst[key], dict):
            _coalesce_tables(dst[key], value)
    return dst


def _render(values: dict[str, Any]) -> Render:
    text = json.dumps(values, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"stc-npu-docs-{digest}.yaml"
    path.write_text(text, encoding="utf-8")  # JSON is YAML
    return render(values_files=[path])


def _upgrade_values(
    install: list[tuple[str, str]], upgrade: list[tuple[str, str]]
) -> dict[str, Any]:
    """The user values of `helm upgrade --reset-then-reuse-values`."""
    return _coalesce_tables(_values(upgrade), _values(install))


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_documented_helm_commands_render(path: Path) -> None:
    commands = [
        w for w in _chart_commands(path) if "chart/stc-npu" in w or any("oci://" in x for x in w)
    ]
    assert commands, f"{path.name}: no helm install/upgrade found"
    previous: list[tuple[str, str]] = []
    for words in commands:
        assert "--reuse-values" not in words, f"{shlex.join(words)}: use --reset-then-reuse-values"
        flags = _value_args(words)
        values = _values(flags)
        if words[1] == "install":
            previous = flags
        elif "--reset-then-reuse-values" in words:
            values = _upgrade_values(previous, flags)
        if any(word.startswith("-f") or word == "--values" for word in words):
            continue  # the user's own values file
        _render(values)  # fails with helm's error


def test_set_needs_set_string_for_a_true_label() -> None:
    # docs/operations.md: --set turns "true" into a boolean, which the schema
    # refuses for a label value; --set-string keeps it a string.
    error = render_error("helm3", ["nodeSelector.example\\.com/npu=true"])
    assert "nodeSelector" in error
    selector = render(extra=["--set-string", "nodeSelector.example\\.com/npu=true"]).kind(
        "DaemonSet"
    )["spec"]["template"]["spec"]["nodeSelector"]
    assert selector == {"example.com/npu": "true"}


def test_a_null_upgrade_removes_the_key() -> None:
    install = [("--set", "nodeSelector.streamcomputing\\.com/npu-plugin=stc-npu")]
    removal = [("--set", "nodeSelector.streamcomputing\\.com/npu-plugin=null")]
    assert _values(install) == {"nodeSelector": {"streamcomputing.com/npu-plugin": "stc-npu"}}
    before = _render(_values(install)).kind("DaemonSet")["spec"]["template"]["spec"]
    assert before["nodeSelector"] == {"streamcomputing.com/npu-plugin": "stc-npu"}
    after = _render(_upgrade_values(install, removal)).kind("DaemonSet")["spec"]["template"]
    assert "nodeSelector" not in after["spec"]


def test_the_coalesce_model_can_keep_and_remove() -> None:
    assert _coalesce_tables({"a": {"x": None}}, {"a": {"x": 1, "y": 2}}) == {"a": {"y": 2}}
    assert _coalesce_tables({"a": {"x": 3}}, {"a": {"x": 1}}) == {"a": {"x": 3}}


# --- the migration, replayed on one node's labels ---------------------------


def _matches(expression: dict[str, Any], labels: dict[str, str]) -> bool:
    key, operator = expression["key"], expression["operator"]
    values = expression.get("values", [])
    if operator == "In":
        return labels.get(key) in values
    if operator == "NotIn":
        return labels.get(key) not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    raise AssertionError(f"operator {operator} not modelled")


def _schedulable(pod_spec: dict[str, Any], labels: dict[str, str]) -> bool:
    """The node selector and required node affinity of a pod spec, on these labels."""
    if any(labels.get(k) != v for k, v in (pod_spec.get("nodeSelector") or {}).items()):
        return False
    required = (
        (pod_spec.get("affinity") or {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution")
    )
    if not required:
        return True
    return any(
        all(_matches(e, labels) for e in term.get("matchExpressions", []))
        for term in required["nodeSelectorTerms"]
    )


def _migration(option: str) -> list[list[str]]:
    text = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    section = text.split("## Migrating from the vendor's", 1)[1]
    part = section.split(f"**Option {option}", 1)[1].split("\n**", 1)[0]
    return [words for block in _code_blocks(part) for words in _commands(block)]


def _replay(commands: list[list[str]], labels: dict[str, str]) -> list[tuple[str, bool, bool]]:
    """(command, stc-npu runs, vendor plugin runs) after each command."""
    vendor: dict[str, Any] | None = {}  # the vendor's pod spec: no placement of its own
    agent: dict[str, Any] | None = None
    install: list[tuple[str, str]] = []
    states = []
    for words in commands:
        line = shlex.join(words)
        if words[:3] == ["kubectl", "label", "node"]:
            key, _, value = words[4].partition("=")
            assert "--overwrite" in words or key not in labels, f"{line}: label exists"
            labels[key] = value
        elif words[:2] == ["helm", "install"]:
            install = _value_args(words)
            agent = _render(_values(install)).kind("DaemonSet")["spec"]["template"]["spec"]
        elif words[:2] == ["helm", "upgrade"]:
            assert "--reset-then-reuse-values" in words
            values = _upgrade_values(install, _value_args(words))
            agent = _render(values).kind("DaemonSet")["spec"]["template"]["spec"]
        elif "patch" in words and "stc-device-plugin-daemonset" in words:
            patch = json.loads(words[words.index("-p") + 1])
            vendor = patch["spec"]["template"]["spec"]
        elif "delete" in words and "stc-device-plugin-daemonset" in words:
            vendor = None
        states.append(
            (
                line,
                agent is not None and _schedulable(agent, labels),
                vendor is not None and _schedulable(vendor, labels),
            )
        )
    return states


@pytest.mark.parametrize("option", ["A", "B"])
@pytest.mark.parametrize(
    "node",
    [{}, {"feature.node.kubernetes.io/pci-1200_23e2.present": "true"}],
    ids=["unlabelled-node", "nfd-node"],
)
def test_migration_never_strands_a_node(option: str, node: dict[str, str]) -> None:
    commands = _migration(option)
    assert any(words[:2] == ["helm", "install"] for words in commands)
    states = _replay(commands, dict(node))
    both = [line for line, agent, vendor in states if agent and vendor]
    assert not both, f"two plugins on the node after: {both}"
    _, agent, vendor = states[-1]
    assert agent, f"option {option}: stc-npu does not run on the node at the end:\n" + "\n".join(
        f"{a!s:5} {v!s:5} {cmd}" for cmd, a, v in states
    )
    assert not vendor


def test_readme_install_starts_with_the_image_and_the_labels() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Install on a cluster", 1)[1].split("\n## ", 1)[0]
    image = section.index("ctr -n k8s.io images import")
    label = section.index("kubectl label node <node> streamcomputing.com/npu.present=true")
    install = section.index("helm install stc-npu chart/stc-npu")
    assert image < label < install
    assert "docker save" in section
    assert "appVersion" in section  # what the default tag means
    assert "0 of 0" in section  # why a missing label goes unnoticed
    upgrade = section.index("helm upgrade")
    assert "not a step" in section[install:upgrade]


def test_operations_has_uninstall_and_publishing() -> None:
    text = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    uninstall = text.split("## Uninstall", 1)[1].split("\n## ", 1)[0]
    for needle in ("helm uninstall", "Running pods keep their NPUs", "capacity", "vendor's plugin"):
        assert needle in uninstall
    publishing = text.split("## Publishing the chart to an OCI registry", 1)[1].split("\n## ", 1)[0]
    assert "make chart-package" in publishing
    assert "helm push dist/chart/stc-npu-" in publishing
    assert "helm install stc-npu oci://" in publishing
    assert "--set-string" in text
