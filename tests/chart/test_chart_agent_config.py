"""The chart and the agent cannot drift: the ConfigMap the chart renders is
loaded by the agent's own config loader, and the flags the chart passes are
flags the agent has."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from stc_npu_agent.cli import FLAGS, build_parser
from stc_npu_agent.core.config import ConfigError
from stc_npu_agent.settings import load_config
from tests.chart.chartkit import CHART, SCENARIOS, agent_container, render

CONFIG_KEYS = ("resourceName", "hpe", "discovery")


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of a values file over the defaults (null deletes a key)."""
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _values(scenario: Path) -> dict[str, Any]:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    return _merge(defaults, yaml.safe_load(scenario.read_text(encoding="utf-8")) or {})


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_agent_loads_the_rendered_config(scenario: Path, tmp_path: Path) -> None:
    data = render(values_files=[scenario]).kind("ConfigMap")["data"]
    assert list(data) == ["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(data["config.yaml"], encoding="utf-8")

    config = load_config(path)

    values = _values(scenario)
    expected = {key: values[key] for key in CONFIG_KEYS}
    assert config.to_mapping() == expected
    # Every key the agent knows is written out, none it does not know.
    assert yaml.safe_load(data["config.yaml"]) == config.to_mapping()


def test_the_loader_would_catch_a_bad_render(tmp_path: Path) -> None:
    data = render().kind("ConfigMap")["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(data.replace("containerPath:", "containerPth:"), encoding="utf-8")
    with pytest.raises(ConfigError, match="containerPth"):
        load_config(path)


def test_chart_passes_only_flags_the_agent_has() -> None:
    known = {flag.name for flag in FLAGS}
    args = agent_container(render())["args"]
    passed = {re.sub(r"^--([a-z-]+)=.*$", r"\1", arg) for arg in args}
    assert passed <= known, passed - known
    # --sys-dir keeps its default: the container's own /sys is the host's, read-only.
    assert passed >= {
        "kubelet-dir",
        "dev-dir",
        "config",
        "log-level",
        "log-format",
        "probe-address",
    }


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_agent_parses_the_rendered_args(scenario: Path) -> None:
    # The agent's own parser: an unknown flag or a bad choice exits here.
    args = agent_container(render(values_files=[scenario]))["args"]
    parsed = build_parser().parse_args(args)
    assert parsed.command is None  # runs the agent, not a subcommand
    values = _values(scenario)
    assert parsed.kubelet_dir == values["kubeletDir"]
    assert parsed.log_level == values["logLevel"]
    assert parsed.log_format == values["logFormat"]


def test_reserved_env_names_are_the_agent_flags_the_chart_sets() -> None:
    text = (CHART / "templates" / "validate.yaml").read_text(encoding="utf-8")
    reserved = set(re.findall(r'"(STC_NPU_[A-Z_]+)"', text))
    passed = {re.sub(r"^--([a-z-]+)=.*$", r"\1", arg) for arg in agent_container(render())["args"]}
    assert reserved == {flag.env for flag in FLAGS if flag.name in passed}
