"""Fixtures of the chart tests: the two helm majors that every behaviour that
can differ between them (lint, schema errors, rendering) is run with."""

from __future__ import annotations

import re

import pytest

from tests.chart.chartkit import HELMS, run_helm

EXPECTED_MAJOR = {"helm3": "3", "helm4": "4"}


@pytest.fixture(params=HELMS)
def helm(request: pytest.FixtureRequest) -> str:
    """The name of a helm binary on PATH (helm3, helm4); checked to be that major."""
    name: str = request.param
    result = run_helm(name, ["version", "--short"])
    assert result.returncode == 0, result.stderr
    match = re.match(r"v(\d+)\.", result.stdout.strip())
    assert match is not None, result.stdout
    assert match[1] == EXPECTED_MAJOR[name], (
        f"{name} reports {result.stdout.strip()!r}; expected helm {EXPECTED_MAJOR[name]}"
    )
    return name
