"""GitOps safety: deterministic renders, no cluster- or time-dependent
template functions, no hooks except the helm test pods, and a working Argo CD
example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.chart.chartkit import CHART, REPO, SCENARIOS, render, run_helm, template_args

# Template functions and objects whose output depends on the cluster, the
# clock, chance or install-versus-upgrade. One exception:
# .Capabilities.KubeVersion, the version the render is for (the cluster's on
# install, --kube-version for `helm template`, which Argo CD sets to the
# destination's), so that older clusters get what their API server knows.
BANNED = re.compile(
    r"\b(lookup|rand\w*|uuid\w*|now|date\w*|unixEpoch|genCA|genPrivateKey|genSelfSignedCert"
    r"|genSignedCert|derivePassword|htpasswd)\b"
    r"|\.Release\.(IsInstall|IsUpgrade|Revision)\b|\.Capabilities\b(?!\.KubeVersion\.Version\b)"
)
# Template comments ({{/* ... */}}) are prose, not actions.
COMMENT = re.compile(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", re.DOTALL)
ACTION = re.compile(r"\{\{.*?\}\}", re.DOTALL)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_two_renders_are_byte_identical(helm: str, scenario: Path) -> None:
    args = template_args([scenario])
    first, second = run_helm(helm, args), run_helm(helm, args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_helm3_and_helm4_render_the_same(scenario: Path) -> None:
    assert render("helm3", [scenario]).text == render("helm4", [scenario]).text


def test_no_banned_functions_in_templates() -> None:
    found = []
    for path in sorted((CHART / "templates").rglob("*")):
        if path.is_file():
            text = COMMENT.sub("", path.read_text(encoding="utf-8"))
            for action in ACTION.findall(text):
                found += [f"{path.name}: {action}" for _ in BANNED.finditer(action)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "action",
    [
        '{{ lookup "v1" "Secret" "ns" "x" }}',
        "{{ randAlphaNum 8 }}",
        "{{ uuidv4 }}",
        "{{ now | date }}",
        "{{ if .Release.IsInstall }}",
        '{{ .Capabilities.APIVersions.Has "x" }}',
        "{{ .Capabilities.KubeVersion.GitVersion }}",
    ],
)
def test_the_ban_catches(action: str) -> None:
    assert BANNED.search(action)


def test_the_ban_allows_the_kube_version() -> None:
    assert not BANNED.search('{{ semverCompare "<1.19.0-0" .Capabilities.KubeVersion.Version }}')


def test_the_same_kube_version_renders_the_same(helm: str) -> None:
    # --kube-version is an input like a value: equal inputs, equal bytes.
    args = template_args(extra=["--kube-version", "1.18.20"])
    first, second = run_helm(helm, args), run_helm(helm, args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


def test_the_only_hooks_are_the_test_pods() -> None:
    # Only Pods: `helm test --logs` asks for every test hook's log as a pod's.
    for path in sorted((CHART / "templates").rglob("*.yaml")):
        if "helm.sh/hook:" in path.read_text(encoding="utf-8"):
            assert path.parent.name == "tests", path
    hooked = [
        doc for doc in render().docs if "helm.sh/hook" in (doc["metadata"].get("annotations") or {})
    ]
    assert [
        (doc["kind"], doc["metadata"]["name"], doc["metadata"]["annotations"]["helm.sh/hook"])
        for doc in hooked
    ] == [("Pod", "stc-npu-test-agents", "test"), ("Pod", "stc-npu-test", "test")]


def test_test_pods_stay_for_helm_test_logs() -> None:
    # helm 3 deletes hook-succeeded hooks before `helm test --logs` reads the
    # logs, and then fails; so the pods are deleted only before the next run.
    for pod in render().docs:
        annotations = pod["metadata"].get("annotations") or {}
        if "helm.sh/hook" in annotations:
            assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation", pod
    weights = {
        doc["metadata"]["name"]: int(doc["metadata"]["annotations"]["helm.sh/hook-weight"])
        for doc in render().docs
        if doc["kind"] == "Pod"
    }
    # The agents check runs first: helm runs test hooks by weight, stops at a failure.
    assert weights["stc-npu-test-agents"] < weights["stc-npu-test"]


def test_argocd_example_renders(helm: str, tmp_path: Path) -> None:
    app = yaml.safe_load((REPO / "examples" / "argocd-application.yaml").read_text("utf-8"))
    assert app["apiVersion"] == "argoproj.io/v1alpha1"
    assert app["kind"] == "Application"
    source = app["spec"]["source"]
    assert (REPO / source["path"]).resolve() == CHART
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(source["helm"]["valuesObject"]), encoding="utf-8")
    args = template_args(
        [values],
        release=source["helm"]["releaseName"],
        namespace=app["spec"]["destination"]["namespace"],
    )
    result = run_helm(helm, args)
    assert result.returncode == 0, result.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc]
    assert kinds == ["ServiceAccount", "ConfigMap", "DaemonSet"]  # test pod disabled
