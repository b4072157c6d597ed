"""Upgrades from released versions keep what Kubernetes will not change.

previous/values-<version>.yaml is the values.yaml of each released chart
version (0.1.0 is this first one) and previous/immutable-<version>.yaml the
DaemonSet name and selector it rendered. When a version is released, add its
two files; never edit old ones. Each is rendered with the CURRENT chart: the
old values must still be accepted (an upgrade with `-f` the old values, or
with --reset-then-reuse-values, must not fail on a removed or renamed key)
and must give the same name and selector, or `helm upgrade` breaks installed
clusters.

`--reuse-values` is different: Helm then renders the new templates with the
OLD chart's defaults (pkg/action/upgrade.go: chart.Values = the old release's
coalesced values), so values added since are missing. The schema requires
those the templates cannot do without, so such an upgrade fails naming them
(docs/operations.md says to use --reset-then-reuse-values).
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


def _chart_copy(tmp_path: Path, version: str, app_version: str) -> Path:
    copy = tmp_path / f"stc-npu-{version}"
    shutil.copytree(CHART, copy)
    chart_yaml = copy / "Chart.yaml"
    chart = yaml.safe_load(chart_yaml.read_text(encoding="utf-8"))
    text = chart_yaml.read_text(encoding="utf-8")
    text = text.replace(f"version: {chart['version']}\n", f"version: {version}\n", 1)
    text = text.replace(f'appVersion: "{chart["appVersion"]}"', f'appVersion: "{app_version}"', 1)
    chart_yaml.write_text(text, encoding="utf-8")
    assert yaml.safe_load(text)["version"] == version
    return copy


def _pod_template(helm: str, chart: Path, sets: list[str]) -> dict[str, Any]:
    args = ["template", "stc-npu", str(chart), "-n", "kube-system"]
    for item in sets:
        args += ["--set", item]
    result = run_helm(helm, args)
    assert result.returncode == 0, result.stderr
    (daemonset,) = [
        doc for doc in yaml.safe_load_all(result.stdout) if doc and doc["kind"] == "DaemonSet"
    ]
    template: dict[str, Any] = daemonset["spec"]["template"]
    return template


def test_a_chart_only_release_keeps_the_pod_template(helm: str, tmp_path: Path) -> None:
    # A new chart version with the same image and config must not restart
    # every agent: the pod template, which the DaemonSet rolls on, is equal.
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    bumped = _chart_copy(tmp_path, "99.0.0", chart["appVersion"])
    assert _pod_template(helm, bumped, []) == _pod_template(helm, CHART, [])


def test_a_new_app_version_with_the_image_pinned_keeps_the_pod_template(
    helm: str, tmp_path: Path
) -> None:
    pinned = ["image.tag=0.1.0"]
    bumped = _chart_copy(tmp_path, "99.0.0", "99.0.0")
    assert _pod_template(helm, bumped, pinned) == _pod_template(helm, CHART, pinned)
    # ... while the default tag follows appVersion and so rolls the agents.
    assert _pod_template(helm, bumped, []) != _pod_template(helm, CHART, [])


def test_object_labels_still_say_the_chart_version() -> None:
    daemonset = render().kind("DaemonSet")
    assert daemonset["metadata"]["labels"]["helm.sh/chart"].startswith("stc-npu-")
    template_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert "helm.sh/chart" not in template_labels
    assert "app.kubernetes.io/version" not in template_labels


def test_reuse_values_from_0_1_0_fails_naming_the_new_values(helm: str, tmp_path: Path) -> None:
    # What `helm upgrade --reuse-values` renders: this chart's templates and
    # schema with 0.1.0's values as the defaults. Without the required keys
    # the agent would lose its security contexts silently.
    chart = tmp_path / "stc-npu"
    shutil.copytree(CHART, chart)
    shutil.copy(PREVIOUS / "values-0.1.0.yaml", chart / "values.yaml")
    result = run_helm(helm, ["template", "stc-npu", str(chart), "-n", "kube-system"])
    assert result.returncode != 0
    for key in ("podSecurityContext", "securityContext", "serviceAccount", "liveness"):
        assert key in result.stderr, result.stderr
