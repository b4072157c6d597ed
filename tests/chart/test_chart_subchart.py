"""The chart as a dependency of another chart (an umbrella chart, or the
Argo CD "wrapper chart" pattern): Helm passes the parent's `global` values to
every subchart, and the parent sets our values under our name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.chart.chartkit import CHART, run_helm

PARENT_CHART = {
    "apiVersion": "v2",
    "name": "platform",
    "version": "1.0.0",
    "dependencies": [{"name": "stc-npu", "version": ">=0.1.0", "repository": "file://../stc-npu"}],
}
PARENT_VALUES = {
    "global": {"imageRegistry": "registry.example.com", "storageClass": "fast"},
    "stc-npu": {"logLevel": "debug", "resourceName": "example.com/npu"},
}


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    chart = tmp_path / "platform"
    shutil.copytree(CHART, chart / "charts" / "stc-npu")
    (chart / "Chart.yaml").write_text(yaml.safe_dump(PARENT_CHART), encoding="utf-8")
    (chart / "values.yaml").write_text(yaml.safe_dump(PARENT_VALUES), encoding="utf-8")
    (chart / "templates").mkdir()
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: platform\n"
        "data:\n  registry: {{ .Values.global.imageRegistry | quote }}\n",
        encoding="utf-8",
    )
    return chart


def test_parent_chart_sets_our_values(helm: str, parent: Path) -> None:
    result = run_helm(helm, ["template", "platform", str(parent), "-n", "kube-system"])
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    (daemonset,) = [doc for doc in docs if doc["kind"] == "DaemonSet"]
    env = {
        item["name"]: item.get("value")
        for item in daemonset["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["STC_NPU_LOG_LEVEL"] == "debug"
    # Release "platform" without "stc-npu" in it: objects are platform-stc-npu.
    assert daemonset["metadata"]["name"] == "platform-stc-npu"
    (config,) = [
        doc
        for doc in docs
        if doc["metadata"]["name"] == "platform-stc-npu" and doc["kind"] == "ConfigMap"
    ]
    assert 'resourceName: "example.com/npu"' in config["data"]["config.yaml"]


def test_parent_chart_lints(helm: str, parent: Path) -> None:
    result = run_helm(helm, ["lint", "--strict", str(parent)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_typo_under_our_name_is_still_refused(helm: str, parent: Path) -> None:
    # Only `global` is open: everything else stays closed in a parent too.
    values = {**PARENT_VALUES, "stc-npu": {"logLevl": "debug"}}
    (parent / "values.yaml").write_text(yaml.safe_dump(values), encoding="utf-8")
    result = run_helm(helm, ["template", "platform", str(parent)])
    assert result.returncode != 0
    assert "logLevl" in result.stderr
