"""GitOps safety: deterministic renders, no cluster- or time-dependent
template functions, no hooks except the helm test pod, and a working Argo CD
example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.chart.chartkit import CHART, REPO, SCENARIOS, render, run_helm, template_args

# Template functions and objects whose output depends on the cluster, the
# clock, chance or install-versus-upgrade.
BANNED = re.compile(
    r"\b(lookup|rand\w*|uuid\w*|now|date\w*|unixEpoch|genCA|genPrivateKey|genSelfSignedCert"
    r"|genSignedCert|derivePassword|htpasswd)\b"
    r"|\.Release\.(IsInstall|IsUpgrade|Revision)\b|\.Capabilities\b"
)
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
            for action in ACTION.findall(path.read_text(encoding="utf-8")):
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
    ],
)
def test_the_ban_catches(action: str) -> None:
    assert BANNED.search(action)


def test_the_only_hook_is_the_test_pod() -> None:
    for path in sorted((CHART / "templates").rglob("*.yaml")):
        if "helm.sh/hook" in path.read_text(encoding="utf-8"):
            assert path.parent.name == "tests", path
    hooked = [
        doc for doc in render().docs if "helm.sh/hook" in (doc["metadata"].get("annotations") or {})
    ]
    assert [(doc["kind"], doc["metadata"]["annotations"]["helm.sh/hook"]) for doc in hooked] == [
        ("Pod", "test")
    ]


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
