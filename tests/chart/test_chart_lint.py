"""`helm lint --strict` of the chart, with its defaults and every ci/ scenario."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chart.chartkit import CHART, SCENARIOS, run_helm

# The cases the chart must be linted, rendered and validated with (one
# ci/<name>-values.yaml each); more scenarios are welcome.
REQUIRED_SCENARIOS = {"default", "hpe-unmapped", "kubelet-dir", "resource-name", "scheduling"}


def test_required_scenarios_exist() -> None:
    names = {path.name.removesuffix("-values.yaml") for path in SCENARIOS}
    assert names >= REQUIRED_SCENARIOS, f"missing ci/*-values.yaml: {REQUIRED_SCENARIOS - names}"


@pytest.mark.parametrize(
    "scenario", [None, *SCENARIOS], ids=["chart-defaults", *(p.stem for p in SCENARIOS)]
)
def test_lint_strict(helm: str, scenario: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)]
    if scenario is not None:
        args += ["--values", str(scenario)]
    result = run_helm(helm, args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout
    assert "[ERROR]" not in result.stdout


def test_lint_strict_fails_on_a_bad_value(helm: str) -> None:
    # Proves lint checks values at all, so the passes above mean something.
    result = run_helm(helm, ["lint", "--strict", str(CHART), "--set", "hpe.mode=bogus"])
    assert result.returncode != 0
    assert "mode" in result.stdout + result.stderr
