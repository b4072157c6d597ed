"""The real cluster for the e2e scenarios: brought up once per session, and
ALWAYS torn down (also on a failed step, Ctrl-C or SIGTERM).

`make e2e` (ci/e2e/run.py) builds the images and runs this suite; `make
test` never collects it (norecursedirs in pyproject.toml).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest
from ci.e2e import cluster, transcript
from ci.e2e.cluster import Cluster
from ci.e2e.npus import HostNpus, make_hpe_dir

RESOURCE = "streamcomputing.com/npu"
NPU_COUNT = 4
RELEASE = "stc-npu"
RELEASE_NAMESPACE = "kube-system"
CHART = cluster.REPO / "chart" / "stc-npu"


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    # pytest tears fixtures down on KeyboardInterrupt; SIGTERM (CI's timeout,
    # `kill`) must take the same road.
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


def strategy_value(device_list_strategy: Sequence[str]) -> str:
    """A list as `helm --set` takes it: {device-specs,cdi-cri}."""
    return "{" + ",".join(device_list_strategy) + "}"


def read_images(images_dir: Path) -> dict[str, tuple[str, Path]]:
    """ROLE -> (image name, tarball) from images.txt (`ROLE NAME TARBALL`)."""
    images = {}
    for line in (images_dir / "images.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            role, name, tarball = line.split()
            images[role] = (name, images_dir / tarball)
    return images


@dataclass
class E2E:
    """What the scenarios get: the cluster, the simulated NPUs, the images."""

    cluster: Cluster
    npus: HostNpus
    images: dict[str, tuple[str, Path]]

    def chart_values(
        self,
        *,
        hpe_mode: str = "mapped",
        device_list_strategy: Sequence[str] = (),
        vendor_probe_tool: str = "",
        registration: str = "",
        mode: str = "device-plugin",
    ) -> list[str]:
        """THE one place where the scenarios' helm values are set.

        The images' names are the chart's defaults (the image builder reads
        them from the chart), so they need no value here. The agent checks
        each node against sysfs: it reads the NPUs' simulated sysfs tree.
        A ``device_list_strategy`` (the chart's default when empty) with
        cdi-cri writes the CDI spec into containerd's private spec dir.
        A ``vendor_probe_tool`` turns the vendor probe on with that stc-smi
        (under hpe.hostPath, which the agent sees at the same path), probing
        every second so a reading turns a signal within a few seconds.
        A ``registration`` (the chart's default when empty) with
        plugin-watcher puts the agent's socket in the kubelet's
        plugins_registry (under the node's kubelet root dir).
        ``mode`` dra registers in that plugins_registry too (the checkpoint
        dir is beside it) and writes the CDI spec into containerd's private
        spec dir.
        """
        values = {
            "hpe.mode": hpe_mode,
            "sysDir": str(self.npus.sys_dir),
        }
        if device_list_strategy:
            values["deviceListStrategy"] = strategy_value(device_list_strategy)
        if "cdi-cri" in device_list_strategy:
            values["cdi.specDir"] = str(cluster.CDI_SPEC_DIR)
        if registration:
            values["registration"] = registration
            values["pluginRegistryDir"] = str(self.cluster.plugin_registry_dir)
        if mode != "device-plugin":
            values["mode"] = mode
            values["pluginRegistryDir"] = str(self.cluster.plugin_registry_dir)
            values["cdi.specDir"] = str(cluster.CDI_SPEC_DIR)
        if vendor_probe_tool:
            values["health.vendorProbe.enabled"] = "true"
            values["health.vendorProbe.tool"] = vendor_probe_tool
            values["health.vendorProbe.intervalSeconds"] = "1"
            values["health.vendorProbe.timeoutSeconds"] = "1"
            for signal in ("cardStatus", "clusterStatus"):
                values[f"health.signals.{signal}.failThreshold"] = "2"
                values[f"health.signals.{signal}.recoverThreshold"] = "2"
        return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="session")
def e2e() -> Iterator[E2E]:
    transcript.configure(cluster.OUT_DIR / "transcript.log", cluster.OUT_DIR / "figures.jsonl")
    images_dir = os.environ.get("STC_E2E_IMAGES")
    if not images_dir:
        pytest.fail("STC_E2E_IMAGES is not set: run the e2e with `make e2e`")
    images = read_images(Path(images_dir))
    node = Cluster()
    try:
        node.up([tarball for _, tarball in images.values()])
        with transcript.step(f"simulated NPUs: {NPU_COUNT} in /dev (major 240), sysfs, HPE dir"):
            npus = HostNpus(NPU_COUNT)
            make_hpe_dir()
        yield E2E(node, npus, images)
    finally:
        with transcript.step("teardown"):
            problems = cluster.down()
        for problem in problems:
            transcript.say(f"  could not undo: {problem}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Each test's outcome and duration in the transcript (setup and teardown
    only when they fail)."""
    if report.when == "call" or report.outcome == "failed":
        outcome = "XFAIL" if hasattr(report, "wasxfail") else report.outcome.upper()
        transcript.say(f"=== {outcome} {report.nodeid} ({report.when}, {report.duration:.1f} s)")


@pytest.fixture(autouse=True)
def _announce(request: pytest.FixtureRequest) -> None:
    transcript.say(f"=== {request.node.name}")
