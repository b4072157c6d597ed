"""Reliability suites: the real agent process under faults, storms and bad input.

Fixtures come from tests/agent/conftest.py (the agent process, the simulated
node, the kubelet emulator), re-exported here so both suites start the agent
the same way.

Slow tests (``@pytest.mark.slow``: the soak) are skipped unless the marker
expression asks for them (``pytest -m slow``, what ``make soak`` runs) or
STC_NPU_SOAK=1 is set: ``make test`` runs plain ``pytest`` and stays fast.
"""

from __future__ import annotations

import os

import pytest

from tests.agent.conftest import (  # noqa: F401  (fixtures are found by name)
    AgentProcess,
    kubelet,
    kubelet_dir,
    node,
    start_agent,
    unused_tcp_port,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = str(config.getoption("markexpr") or "")
    if "slow" in markexpr or os.environ.get("STC_NPU_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="slow (soak): run with `make soak` or `pytest -m slow`")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)
