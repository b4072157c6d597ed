"""The chart and the agent cannot drift: the ConfigMap the chart renders is
loaded by the agent's own config loader, and the STC_NPU_* environment the
chart renders gives the agent (and `diagnose` run in its pod, which inherits
the environment but not args) exactly the settings the chart intends."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from stc_npu_agent.cli import FLAGS, build_parser
from stc_npu_agent.core.config import ConfigError
from stc_npu_agent.probes import parse_address
from stc_npu_agent.settings import load_config
from tests.chart.chartkit import CHART, SCENARIOS, agent_container, render

CONFIG_KEYS = (
    "resourceName",
    "hpe",
    "discovery",
    "deviceListStrategy",
    "stcSetDevices",
    "cdi",
    "health",
    "sharing",
    "mode",
    "registration",
    "pluginRegistryDir",
)


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
    expected: dict[str, Any] = {key: values[key] for key in CONFIG_KEYS}
    dra = values["mode"] == "dra"
    if dra:
        expected["registration"] = "plugin-watcher"  # the only way in mode dra
    # The DRA driver's own dir, beside plugins_registry.
    kubelet_root = values["pluginRegistryDir"].rpartition("/")[0]
    expected["dra"] = {
        "stateDir": f"{kubelet_root}/plugins/npu.streamcomputing.com",
        "sliceIntervalSeconds": values["dra"]["sliceIntervalSeconds"],
    }
    nfd = values["nfd"]
    expected["metrics"] = {"enabled": values["metrics"]["enabled"]}
    expected["nfd"] = {
        "enabled": nfd["enabled"],
        "featureFile": f"{nfd['hostPath']}/stc-npu",
        "expirySeconds": nfd["expirySeconds"],
        "models": nfd["models"],
        "hpeVersionFile": nfd["hpeVersionFile"],
    }
    assert config.to_mapping() == expected
    assert config.uses_cdi == (dra or "cdi-cri" in values["deviceListStrategy"])
    # Every key the agent knows is written out, none it does not know.
    assert yaml.safe_load(data["config.yaml"]) == config.to_mapping()


def test_the_loader_would_catch_a_bad_render(tmp_path: Path) -> None:
    data = render().kind("ConfigMap")["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(data.replace("containerPath:", "containerPth:"), encoding="utf-8")
    with pytest.raises(ConfigError, match="containerPth"):
        load_config(path)


# The chart's own variables, in the order it renders them (before extraEnv).
CHART_ENV = (
    "STC_NPU_KUBELET_DIR",
    "STC_NPU_DEV_DIR",
    "STC_NPU_CONFIG",
    "STC_NPU_LOG_LEVEL",
    "STC_NPU_LOG_FORMAT",
    "STC_NPU_PROBE_ADDRESS",
    "STC_NPU_SYS_DIR",
    "STC_NPU_HPE_DIR",  # mapped mode only
    "STC_NPU_NODE_NAME",  # mode dra only, from the pod's spec.nodeName
)
# What the test puts in for a fieldRef to the pod's node.
NODE = "node-a"


def _agent_env(container: dict[str, Any]) -> list[dict[str, Any]]:
    """The container's env entries that are the agent's own variables."""
    names = {flag.env for flag in FLAGS}
    return [item for item in container.get("env", []) if item["name"] in names]


def _intended(values: dict[str, Any]) -> dict[str, str | None]:
    """What the chart means the agent's settings to be, by argparse dest."""
    return {
        "kubelet_dir": values["kubeletDir"],
        "dev_dir": "/host/dev",  # devDir's mount
        "sys_dir": "/host/sys",  # sysDir's mount
        "config": "/etc/stc-npu/config.yaml",  # the ConfigMap's mount
        "log_level": values["logLevel"],
        "log_format": values["logFormat"],
        "hpe_dir": "/host/hpe" if values["hpe"]["mode"] == "mapped" else None,
        "probe_address": f":{values['probes']['port']}",
        "node_name": NODE if values["mode"] == "dra" else None,
        # In cluster the API server is found from the pod's own environment.
        "kube_api_server": None,
    }


def _settings(parsed: argparse.Namespace) -> dict[str, str | None]:
    return {dest: getattr(parsed, dest) for dest in (f.name.replace("-", "_") for f in FLAGS)}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_chart_passes_settings_as_env_only(scenario: Path) -> None:
    container = agent_container(render(values_files=[scenario]))
    assert "args" not in container  # kubectl exec would not see them
    assert "command" not in container  # the image's ENTRYPOINT, stc-npu-agent
    names = [item["name"] for item in container["env"]]
    values = _values(scenario)
    left_out = {
        "STC_NPU_HPE_DIR": values["hpe"]["mode"] != "mapped",
        "STC_NPU_NODE_NAME": values["mode"] != "dra",
    }
    own = [name for name in CHART_ENV if not left_out.get(name)]
    # The chart's variables first, in a fixed order, then extraEnv's.
    assert names[: len(own)] == own
    assert not any(name.startswith("STC_NPU_") for name in names[len(own) :])
    assert set(own) <= {flag.env for flag in FLAGS}
    for item in container["env"][: len(own)]:
        if item["name"] == "STC_NPU_NODE_NAME":
            assert item["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
            continue
        assert set(item) == {"name", "value"}, item
        assert isinstance(item["value"], str), item


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_agent_settings_from_the_rendered_env(
    scenario: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The agent's own parser reads the STC_NPU_* defaults when it is built:
    # set exactly the container's environment, then parse no args at all, as
    # the container does, and as `kubectl exec ... stc-npu-agent diagnose` does.
    for flag in FLAGS:
        monkeypatch.delenv(flag.env, raising=False)
    for item in _agent_env(agent_container(render(values_files=[scenario]))):
        from_node = item.get("valueFrom") == {"fieldRef": {"fieldPath": "spec.nodeName"}}
        monkeypatch.setenv(item["name"], NODE if from_node else item["value"])

    agent = build_parser().parse_args([])
    diagnose = build_parser().parse_args(["diagnose"])

    assert agent.command is None  # runs the agent, not a subcommand
    assert diagnose.command == "diagnose"
    expected = _intended(_values(scenario))
    assert set(expected) == set(_settings(agent)), "a new agent flag: say what the chart intends"
    assert _settings(agent) == expected
    assert _settings(diagnose) == expected
    # The checks main() applies to environment values (argparse does not).
    for flag in FLAGS:
        if flag.choices:
            assert getattr(agent, flag.name.replace("-", "_")) in flag.choices
    parse_address(agent.probe_address)


def test_reserved_env_names_are_the_variables_the_chart_sets() -> None:
    text = (CHART / "templates" / "validate.yaml").read_text(encoding="utf-8")
    reserved = set(re.findall(r'"(STC_NPU_[A-Z_]+)"', text))
    assert reserved == set(CHART_ENV)
    rendered = {item["name"] for item in _agent_env(agent_container(render(sets=["mode=dra"])))}
    assert reserved == rendered
