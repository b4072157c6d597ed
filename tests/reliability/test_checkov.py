"""The rendered chart, every ci/*-values.yaml scenario, scanned with checkov:
no failed check without a written, specific justification in the chart.

The justifications are ``checkov.io/skip<N>: <CHECK>=<reason>`` annotations on
the chart's DaemonSet and test pod. Each scenario is scanned twice: as
rendered (no failure may remain) and with those annotations stripped (what
fails must be exactly what is skipped, so no skip outlives its reason).

checkov cannot live in .venv (it pins packaging<24; pytest 9 needs >=24), so
it is installed once into .tools/checkov from requirements-checkov.txt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "chart" / "stc-npu"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
REQUIREMENTS = Path(__file__).with_name("requirements-checkov.txt")
CHECKOV_VENV = ROOT / ".tools" / "checkov"
RELEASE = "stc-npu"

SKIP_ANNOTATION = re.compile(r"^(\s*)checkov\.io/skip[0-9]+: (CKV2?_K8S_[0-9]+)=(.*)$", re.M)


def checkov() -> Path:
    binary = CHECKOV_VENV / "bin" / "checkov"
    stamp = CHECKOV_VENV / ".requirements"
    if binary.exists() and stamp.exists() and stamp.read_text() == REQUIREMENTS.read_text():
        return binary
    shutil.rmtree(CHECKOV_VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(CHECKOV_VENV)], check=True)
    subprocess.run(
        [str(CHECKOV_VENV / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
         "-r", str(REQUIREMENTS)],
        check=True,
    )  # fmt: skip
    stamp.write_text(REQUIREMENTS.read_text())
    return binary


def helm3() -> str:
    found = shutil.which("helm3") or str(ROOT / ".tools" / "bin" / "helm3")
    if not Path(found).exists():
        pytest.fail("helm3 not found: run `make tools`")
    return found


def scan(checkov_bin: Path, manifest: Path) -> dict[str, list[dict[str, Any]]]:
    result = subprocess.run(
        [str(checkov_bin), "-f", str(manifest), "--framework", "kubernetes", "-o", "json",
         "--skip-download"],
        check=False,  # 1 means failed checks: judged by the caller
        capture_output=True,
        text=True,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr[-2000:]
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    assert reports[0]["summary"]["passed"] > 0  # it really scanned the chart
    return {
        kind: [check for one in reports for check in one["results"][kind]]
        for kind in ("failed_checks", "skipped_checks")
    }


def findings(checks: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(check, kind/name of the resource) pairs."""
    return {(c["check_id"], c["resource"].split(".")[0] + "/" + c["resource"].split(".")[2])
            for c in checks}  # fmt: skip


@pytest.fixture(scope="module")
def checkov_bin() -> Path:
    return checkov()


@pytest.mark.timeout(600)  # the first run installs checkov
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_chart_passes_checkov_or_says_why_in_the_chart(
    scenario: Path, checkov_bin: Path, tmp_path: Path
) -> None:
    rendered = subprocess.run(
        [helm3(), "template", RELEASE, str(CHART), "-n", "kube-system", "-f", str(scenario)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    reasons = SKIP_ANNOTATION.findall(rendered)
    assert reasons, "the chart carries no checkov justifications: did the annotations go?"
    for _indent, check, reason in reasons:
        assert len(reason) >= 40, f"{check}: the reason is not specific: {reason!r}"

    as_rendered = tmp_path / "rendered.yaml"
    as_rendered.write_text(rendered)
    result = scan(checkov_bin, as_rendered)
    assert not result["failed_checks"], (
        "checkov failures without a justification (fix the chart, or add a specific reason "
        "as a checkov.io/skip annotation): "
        f"{sorted(findings(result['failed_checks']))}"
    )

    stripped = tmp_path / "stripped.yaml"
    stripped.write_text(SKIP_ANNOTATION.sub("", rendered))
    unjustified = scan(checkov_bin, stripped)
    assert findings(unjustified["failed_checks"]) == findings(result["skipped_checks"]), (
        "every skip annotation must answer a real finding, and every finding a skip"
    )
