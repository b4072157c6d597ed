"""Every rendered scenario is a valid set of Kubernetes objects, strictly (no
unknown fields), for each Kubernetes minor from 1.18 (the oldest the chart
supports; the vendor's plugin ran on 1.18 and 1.22-1.24) to the newest that
kubernetes-validate ships; and Chart.yaml's kubeVersion says the same.

Each minor gets its own render (`--kube-version`), since the chart renders
what an older API server lacks its own way (the seccomp profile as the alpha
annotation before 1.19). The schemas of 1.25 and newer come from the
kubernetes-validate in .venv; those of 1.18-1.24 only from its 1.24.1
release, which is installed on first use into a tool venv of its own
(requirements-kubernetes-validate-old.txt) and run as a subprocess.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, all_versions, major_minor
from packaging.version import Version

from tests.chart.chartkit import CHART, REPO, SCENARIOS, render, run_helm, template_args

OLDEST = "1.18"
OLD_VERSIONS = [f"1.{minor}" for minor in range(18, 25)]
NEW_VERSIONS = sorted(
    {major_minor(v) for v in all_versions() if Version(v) >= Version("1.25")}, key=Version
)
VERSIONS = OLD_VERSIONS + NEW_VERSIONS
# Mode dra's objects are resource.k8s.io/v1, which Kubernetes serves from 1.34
# (mode dra needs it; tests/chart/test_chart_dra.py checks they are refused before).
DRA_OLDEST = "1.34"
OLD_REQUIREMENTS = Path(__file__).with_name("requirements-kubernetes-validate-old.txt")
OLD_VENV = REPO / ".tools" / "kubernetes-validate-1.24"

# Run by the old release's interpreter: {version: [objects]} on stdin, the
# problems as a JSON list on stdout.
OLD_VALIDATE = """
import json, sys, warnings
warnings.simplefilter("ignore")
import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError
problems = []
for version, docs in json.load(sys.stdin).items():
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            problems.append(f"{version} {doc['kind']}: {where}: {error.message}")
        except SchemaNotFoundError as error:
            problems.append(f"{version} {doc['kind']}: {error.message}")
json.dump(problems, sys.stdout)
"""


# Prometheus Operator kinds: kubernetes-validate has no schema for CRDs;
# tests/chart/test_chart_metrics.py checks what they point at.
OPERATOR_API = "monitoring.coreos.com/"


def old_python() -> Path:
    """The tool venv with kubernetes-validate 1.24.1, installed when missing or stale."""
    python = OLD_VENV / "bin" / "python"
    stamp = OLD_VENV / ".requirements"
    wanted = OLD_REQUIREMENTS.read_text(encoding="utf-8")
    if python.exists() and stamp.exists() and stamp.read_text(encoding="utf-8") == wanted:
        return python
    shutil.rmtree(OLD_VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(OLD_VENV)], check=True, timeout=120)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-r", str(OLD_REQUIREMENTS)],
        check=True,
        timeout=600,
    )  # fmt: skip
    stamp.write_text(wanted, encoding="utf-8")
    return python


def _new_problems(docs: tuple[dict[str, Any], ...], version: str) -> list[str]:
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


def _old_problems(docs_by_version: dict[str, tuple[dict[str, Any], ...]]) -> list[str]:
    result = subprocess.run(
        [str(old_python()), "-c", OLD_VALIDATE],
        input=json.dumps(
            {
                version: [d for d in docs if not str(d["apiVersion"]).startswith(OPERATOR_API)]
                for version, docs in docs_by_version.items()
            }
        ),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    problems: list[str] = json.loads(result.stdout)
    return problems


# Mode dra's objects that an API server older than DRA_OLDEST cannot have
# (ValidatingAdmissionPolicy is v1 from 1.30): mode dra is for 1.34+ only.
DRA_ONLY_KINDS = {"DeviceClass", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}


def _served(doc: dict[str, Any], version: str) -> bool:
    return doc["kind"] not in DRA_ONLY_KINDS or Version(version) >= Version(DRA_OLDEST)


def _docs(scenario: Path | None, version: str) -> tuple[dict[str, Any], ...]:
    files = [scenario] if scenario else []
    docs = render(values_files=files, extra=["--kube-version", f"{version}.0"]).docs
    return tuple(doc for doc in docs if _served(doc, version))


def test_versions_span_oldest_supported_to_newest_known() -> None:
    assert VERSIONS[0] == OLDEST
    assert NEW_VERSIONS[0] == "1.25"  # no gap between the two releases' schemas
    assert VERSIONS[-1] == major_minor(all_versions()[-1])
    assert len(VERSIONS) >= 20  # 1.18 .. 1.37 with kubernetes-validate 1.37


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_validates_strictly_on_every_version(scenario: Path) -> None:
    problems = []
    for version in NEW_VERSIONS:
        docs = _docs(scenario, version)
        assert {doc["kind"] for doc in docs} >= {"ConfigMap", "DaemonSet"}
        problems += _new_problems(docs, version)
    problems += _old_problems({version: _docs(scenario, version) for version in OLD_VERSIONS})
    assert not problems, "\n".join(problems)


def test_strict_validation_refuses_an_unknown_field() -> None:
    # The checks above can fail: a misspelt field is an error in strict mode.
    daemonset = copy.deepcopy(render().kind("DaemonSet"))
    daemonset["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    assert _new_problems((daemonset,), VERSIONS[-1])
    assert _old_problems({OLDEST: (daemonset,)})


def test_before_1_19_seccomp_is_the_alpha_annotation() -> None:
    # 1.18 has no seccompProfile field (its API server would drop it, leaving
    # the agent unconfined): the same profile goes into the annotations.
    old, new = _docs(None, "1.18"), _docs(None, "1.19")
    assert _old_problems({"1.18": tuple(d for d in new if d["kind"] == "DaemonSet")}), (
        "the 1.18 schema must refuse seccompProfile, or this test proves nothing"
    )
    for docs, legacy in ((old, True), (new, False)):
        template = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        container = template["spec"]["containers"][0]
        if legacy:
            assert annotations["seccomp.security.alpha.kubernetes.io/pod"] == "runtime/default"
            assert (
                annotations["container.seccomp.security.alpha.kubernetes.io/agent"]
                == "runtime/default"
            )
            assert "seccompProfile" not in template["spec"].get("securityContext", {})
            assert "seccompProfile" not in container["securityContext"]
        else:
            assert not any("seccomp" in key for key in annotations)
            assert template["spec"]["securityContext"]["seccompProfile"] == {
                "type": "RuntimeDefault"
            }
        for pod in (d for d in docs if d["kind"] == "Pod"):
            pod_annotations = pod["metadata"]["annotations"]
            assert ("seccomp.security.alpha.kubernetes.io/pod" in pod_annotations) is legacy
            assert ("seccompProfile" in pod["spec"]["securityContext"]) is not legacy


def test_a_localhost_profile_before_1_19() -> None:
    sets = [
        "securityContext.seccompProfile.type=Localhost",
        "securityContext.seccompProfile.localhostProfile=profiles/stc-npu.json",
    ]
    template = render(sets=sets, extra=["--kube-version", "1.18.0"]).kind("DaemonSet")["spec"][
        "template"
    ]
    annotations = template["metadata"]["annotations"]
    assert (
        annotations["container.seccomp.security.alpha.kubernetes.io/agent"]
        == "localhost/profiles/stc-npu.json"
    )


def test_chart_kube_version_is_the_oldest_validated() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    match = re.fullmatch(r">=(\d+\.\d+)\.0-0", chart["kubeVersion"])
    assert match is not None, chart["kubeVersion"]
    assert match[1] == VERSIONS[0]


def test_helm_enforces_kube_version(helm: str) -> None:
    too_old = run_helm(helm, template_args(extra=["--kube-version", "1.17.17"]))
    assert too_old.returncode != 0
    assert "kubeVersion" in too_old.stderr or "incompatible" in too_old.stderr
    for version in (VERSIONS[0], "1.22", "1.24", VERSIONS[-1]):
        ok = run_helm(helm, template_args(extra=["--kube-version", f"{version}.0"]))
        assert ok.returncode == 0, ok.stderr
