"""Publishing: Chart.yaml's metadata for chart repositories and Artifact Hub,
the LICENSE and CHANGELOG it points at, and `make chart-package`."""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import yaml

from tests.chart.chartkit import CHART, REPO


def _chart() -> dict[str, Any]:
    chart: dict[str, Any] = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    return chart


def test_chart_says_where_it_comes_from() -> None:
    chart = _chart()
    home = chart["home"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", home)
    assert chart["sources"] == [home]
    assert chart["maintainers"]
    assert all(m["name"] for m in chart["maintainers"])
    # The icon is the repository's own file, at its published address.
    owner_repo = home.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert chart["icon"].startswith(prefix)
    icon = REPO / chart["icon"].removeprefix(prefix)
    assert icon.stat().st_size < 4096
    svg = icon.read_text(encoding="utf-8")
    assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg"')
    assert svg.rstrip().endswith("</svg>")


def test_artifacthub_images_are_the_default_images() -> None:
    chart = _chart()
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    images = yaml.safe_load(chart["annotations"]["artifacthub.io/images"])
    agent = values["image"]
    test = values["test"]["image"]
    assert [image["image"] for image in images] == [
        f"{agent['repository']}:{agent['tag'] or chart['appVersion']}",
        f"{test['repository']}:{test['tag']}",
    ]


def test_artifacthub_changes_are_the_changelog_of_this_version() -> None:
    chart = _chart()
    changes = yaml.safe_load(chart["annotations"]["artifacthub.io/changes"])
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    section = changelog.split(f"## Chart {chart['version']} ", 1)[1].split("\n## ", 1)[0]
    kinds = {"added": "Added", "changed": "Changed", "fixed": "Fixed", "removed": "Removed"}
    listed = {
        (kind, line.removeprefix("- "))
        for kind, heading in kinds.items()
        if f"### {heading}\n" in section
        for line in section.split(f"### {heading}\n", 1)[1].split("\n\n", 1)[0].splitlines()
    }
    assert {(c["kind"], c["description"]) for c in changes} == listed
    assert "### Upgrading from" in section


def test_one_license_everywhere() -> None:
    license_text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text
    assert "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    pyproject = tomllib.loads((REPO / "agent" / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert _chart()["annotations"]["artifacthub.io/license"] == "Apache-2.0"
    dockerfile = (REPO / "images" / "plugin" / "Dockerfile").read_text(encoding="utf-8")
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in dockerfile


def test_make_chart_package_builds_a_clean_package_that_installs(tmp_path: Path) -> None:
    result = subprocess.run(
        ["make", "-s", "chart-package", f"CHART_DIST={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "MAKEFLAGS": ""},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (package,) = tmp_path.glob("stc-npu-*.tgz")
    assert package.name == f"stc-npu-{_chart()['version']}.tgz"
    assert "installs" in result.stdout
    with tarfile.open(package) as archive:
        names = archive.getnames()
    assert "stc-npu/Chart.yaml" in names
    assert "stc-npu/values.schema.json" in names
    assert "stc-npu/templates/tests/test-allocate.yaml" in names  # helm test ships
    assert not [name for name in names if name.startswith("stc-npu/ci/")]
    assert "stc-npu/icon.svg" not in names
