"""Upgrades from released versions keep what Kubernetes will not change.

previous/values-<version>.yaml is the values.yaml of each released chart
version (0.1.0 is this first one) and previous/immutable-<version>.yaml the
DaemonSet name and selector it rendered. When a version is released, add its
two files; never edit old ones. Each is rendered with the CURRENT chart: the
old values must still be accepted (an upgrade with `-f` the old values, or
with --reuse-values, must not fail on a removed or renamed key) and must give
the same name and selector, or `helm upgrade` breaks installed clusters.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.chartkit import CHART, render, run_helm, template_args

PREVIOUS = Path(__file__).parent / "previous"
RELEASES = sorted(PREVIOUS.glob("values-*.yaml"))


def _immutable(values_file: Path) -> dict[str, Any]:
    version = values_file.stem.removeprefix("values-")
    data: dict[str, Any] = yaml.safe_load((PREVIOUS / f"immutable-{version}.yaml").read_text())
    return data


def test_first_release_is_recorded() -> None:
    assert [path.name for path in RELEASES][:1] == ["values-0.1.0.yaml"]


@pytest.mark.parametrize("values_file", RELEASES, ids=[p.stem for p in RELEASES])
def test_previous_values_keep_the_daemonset_identity(helm: str, values_file: Path) -> None:
    committed = _immutable(values_file)
    result = run_helm(
        helm,
        template_args(
            [values_file], release=committed["release"], namespace=committed["namespace"]
        ),
    )
    assert result.returncode == 0, f"values of {values_file.name} refused:\n{result.stderr}"
    (daemonset,) = [
        doc for doc in yaml.safe_load_all(result.stdout) if doc and doc["kind"] == "DaemonSet"
    ]
    assert daemonset["metadata"]["name"] == committed["daemonSet"]["name"]
    assert daemonset["metadata"]["namespace"] == committed["namespace"]
    assert daemonset["spec"]["selector"] == {"matchLabels": committed["daemonSet"]["selector"]}
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert committed["daemonSet"]["selector"].items() <= labels.items()


def test_selector_ignores_every_value() -> None:
    # The selector depends only on the release name: podLabels, image and
    # the rest of the values must not reach it.
    sets = ["podLabels.team=x", "image.tag=9.9.9", "resourceName=example.com/npu"]
    changed = render(sets=sets).kind("DaemonSet")["spec"]["selector"]
    assert changed == render().kind("DaemonSet")["spec"]["selector"]


@pytest.mark.parametrize("values_file", RELEASES, ids=[p.stem for p in RELEASES])
def test_reuse_values_renders_the_defaults_of_new_keys(
    helm: str, values_file: Path, tmp_path: Path
) -> None:
    # `helm upgrade --reuse-values` (helm 3) renders the new templates with
    # the old release's values: keys added since are absent, not defaulted.
    chart = tmp_path / "stc-npu"
    shutil.copytree(CHART, chart)
    shutil.copy(values_file, chart / "values.yaml")
    result = run_helm(helm, ["template", "stc-npu", str(chart), "--namespace", "kube-system"])
    assert result.returncode == 0, f"old values refused by the new templates:\n{result.stderr}"
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    (config_map,) = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert config["deviceListStrategy"] == ["device-specs"]
    assert config["stcSetDevices"] == "none"
    assert config["cdi"] == {"specDir": "/var/run/cdi"}
