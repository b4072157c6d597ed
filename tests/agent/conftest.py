"""Fixtures for end-to-end tests: the real agent process on a simulated node,
driven by the kubelet emulator over real unix sockets."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from stc_npu_agent.testing.kubelet import KubeletEmulator
from stc_npu_agent.testing.simnode import SimNode

RESOURCE = "streamcomputing.com/npu"
# Four NPUs, two per NUMA node, as on a two-socket STCP920 host.
NUMA_OF = {0: 0, 1: 0, 2: 1, 3: 1}


@dataclass
class AgentProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"agent log never said {text!r}; log:\n{self.log()}")

    def terminate(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


AgentFactory = Callable[..., AgentProcess]


@pytest.fixture
def unused_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def node(tmp_path: Path) -> SimNode:
    sim = SimNode(tmp_path / "node")
    for index, numa in NUMA_OF.items():
        sim.add_npu(index, numa_node=numa)
    return sim


@pytest.fixture
def kubelet_dir() -> Iterator[Path]:
    # Not under tmp_path: pytest's paths are long, and a unix socket path has
    # at most 107 bytes (the agent refuses longer ones with a clear error).
    short = Path(tempfile.mkdtemp(prefix="stc-npu-"))
    yield short / "device-plugins"
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def kubelet(kubelet_dir: Path) -> Iterator[KubeletEmulator]:
    with KubeletEmulator(kubelet_dir, version="1.32") as emulator:
        yield emulator


@pytest.fixture
def start_agent(tmp_path: Path, node: SimNode, kubelet_dir: Path) -> Iterator[AgentFactory]:
    started: list[AgentProcess] = []

    def start(
        config: dict[str, object] | str | None = None,
        *,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        kubelet_dir_override: Path | None = None,
        prefix: Sequence[str] = (),
        config_path: Path | None = None,
    ) -> AgentProcess:
        """The agent process; ``config`` is written to a file, ``config_path``
        is passed as is (it may be anything: a directory, a missing file);
        ``prefix`` is a wrapper command (setpriv, unshare, ...)."""
        number = len(started)
        args = [
            *prefix,
            sys.executable, "-m", "stc_npu_agent",
            "--kubelet-dir", str(kubelet_dir_override or kubelet_dir),
            "--dev-dir", str(node.dev_dir),
            "--sys-dir", str(node.sys_dir),
            *extra_args,
        ]  # fmt: skip
        if config is not None:
            config_path = tmp_path / f"config-{number}.yaml"
            text = config if isinstance(config, str) else yaml.safe_dump(config)
            config_path.write_text(text)
            args += ["--config", str(config_path)]
        elif config_path is not None:
            args += ["--config", str(config_path)]
        log_path = tmp_path / f"agent-{number}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                args,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        agent = AgentProcess(process, log_path, args)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait(10)
        # Shown by pytest only when the test failed.
        print(f"--- agent log {agent.log_path.name} ---\n{agent.log()}")
