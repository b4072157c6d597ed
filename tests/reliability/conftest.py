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
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from stc_npu_agent.testing.simnode import SimNode
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


# A start_agent that can run the agent under a wrapper command (a private
# user namespace, dropped capabilities) and with --config pointing anywhere.
WrappedFactory = Callable[..., AgentProcess]


@pytest.fixture
def start_wrapped(
    tmp_path: Path,
    node: SimNode,  # noqa: F811
    kubelet_dir: Path,  # noqa: F811
) -> Iterator[WrappedFactory]:
    started: list[AgentProcess] = []

    def start(
        prefix: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        config_path: Path | None = None,
    ) -> AgentProcess:
        number = len(started)
        args = [
            *prefix,
            sys.executable, "-m", "stc_npu_agent",
            "--kubelet-dir", str(kubelet_dir),
            "--dev-dir", str(node.dev_dir),
            "--sys-dir", str(node.sys_dir),
            *extra_args,
        ]  # fmt: skip
        if config_path is not None:
            args += ["--config", str(config_path)]
        log_path = tmp_path / f"wrapped-{number}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT)
        agent = AgentProcess(process, log_path, args)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait(10)
        print(f"--- agent log {agent.log_path.name} ---\n{agent.log()}")
