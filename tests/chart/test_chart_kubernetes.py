"""Every rendered scenario is a valid set of Kubernetes objects, strictly (no
unknown fields), for each Kubernetes minor from 1.25 to the newest that
kubernetes-validate ships; and Chart.yaml's kubeVersion says the same."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, all_versions, major_minor
from packaging.version import Version

from tests.chart.chartkit import CHART, SCENARIOS, render, run_helm, template_args

OLDEST = "1.25"
VERSIONS = sorted(
    {major_minor(v) for v in all_versions() if Version(v) >= Version(OLDEST)}, key=Version
)


# Prometheus Operator kinds: kubernetes-validate has no schema for CRDs;
# tests/chart/test_chart_metrics.py checks what they point at.
OPERATOR_API = "monitoring.coreos.com/"


def _problems(docs: tuple[dict[str, object], ...], version: str) -> list[str]:
    problems = []
    for doc in docs:
        if str(doc["apiVersion"]).startswith(OPERATOR_API):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            problems.append(f"{version} {doc['kind']}: {where}: {error.message}")
        except SchemaNotFoundError as error:
            problems.append(f"{version} {doc['kind']}: {error.message}")
    return problems


def test_versions_span_oldest_supported_to_newest_known() -> None:
    assert VERSIONS[0] == OLDEST
    assert VERSIONS[-1] == major_minor(all_versions()[-1])
    assert len(VERSIONS) >= 13  # 1.25 .. 1.37 with kubernetes-validate 1.37


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_validates_strictly_on_every_version(scenario: Path) -> None:
    docs = render(values_files=[scenario]).docs
    assert {doc["kind"] for doc in docs} >= {"ServiceAccount", "ConfigMap", "DaemonSet"}
    problems = [problem for version in VERSIONS for problem in _problems(docs, version)]
    assert not problems, "\n".join(problems)


def test_strict_validation_refuses_an_unknown_field() -> None:
    # The check above can fail: a misspelt field is an error in strict mode.
    daemonset = copy.deepcopy(render().kind("DaemonSet"))
    daemonset["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    assert _problems((daemonset,), VERSIONS[-1])


def test_chart_kube_version_is_the_oldest_validated() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    match = re.fullmatch(r">=(\d+\.\d+)\.0-0", chart["kubeVersion"])
    assert match is not None, chart["kubeVersion"]
    assert match[1] == VERSIONS[0]


def test_helm_enforces_kube_version(helm: str) -> None:
    too_old = run_helm(helm, template_args(extra=["--kube-version", "1.24.17"]))
    assert too_old.returncode != 0
    assert "kubeVersion" in too_old.stderr or "incompatible" in too_old.stderr
    for version in (VERSIONS[0], VERSIONS[-1]):
        ok = run_helm(helm, template_args(extra=["--kube-version", f"{version}.0"]))
        assert ok.returncode == 0, ok.stderr
