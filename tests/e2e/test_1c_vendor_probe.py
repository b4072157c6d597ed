"""The vendor probe on the real v1.36 node, in order: install (mapped) with
health.vendorProbe on and a fake stc-smi in the simulated HPE dir, the agent
running privileged, a card reported off turning the node's allocatable down
and back up with diagnose naming the signal, the same for a DEAD cluster, and
uninstall.

The fake (stc_npu_agent.testing.fake_stc_smi) is a script run by the agent
image's own python, with its state file beside it: both under the host's
hpe.hostPath, which the agent sees read-only at the same path. The test edits
the state file on the host; each stc-smi run reads it anew.

Runs after test_1b_cdi.py (nothing of ours installed) and before
test_2_old_kubelet.py stops the v1.36 kubelet; it leaves nothing installed
and removes its fake. Waits are generous; durations are reported, never
asserted.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ci.e2e import transcript
from ci.e2e.cluster import record, wait_for
from ci.e2e.npus import HPE_DIR

from stc_npu_agent.testing.fake_stc_smi import FakeStcSmi
from tests.e2e import kit
from tests.e2e.conftest import E2E, NPU_COUNT, RELEASE, RESOURCE
from tests.e2e.test_1_current_kubelet import AGENT_MARKER, install, ns_args, uninstall

pytestmark = pytest.mark.timeout(900)

# A directory of our own under the HPE dir's bin/: a host with a real HPE
# keeps its own stc-smi, and teardown removes exactly this directory.
FAKE_DIR = HPE_DIR / "bin" / "stc-npu-e2e"
# The agent image's venv interpreter (images/plugin/Dockerfile): it runs the
# fake inside the agent container, where stc_npu_agent is importable.
IMAGE_PYTHON = "/opt/stc-npu-agent/bin/python"
# linux/capability.h
CAP_SYS_ADMIN = 21


@pytest.fixture(scope="module")
def fake_tool(e2e: E2E) -> Iterator[FakeStcSmi]:
    shutil.rmtree(FAKE_DIR, ignore_errors=True)
    record("dirs", str(FAKE_DIR))
    fake = FakeStcSmi(FAKE_DIR, NPU_COUNT, python=IMAGE_PYTHON)
    try:
        yield fake
    finally:
        shutil.rmtree(FAKE_DIR, ignore_errors=True)


def diagnose(e2e: E2E) -> tuple[dict[str, Any], str]:
    """diagnose in the agent pod: the JSON report and the text a person reads."""
    shown = e2e.cluster.kubectl(
        *ns_args(), "exec", f"ds/{RELEASE}", "--", "stc-npu-agent", "diagnose", check=False
    )
    as_json = e2e.cluster.kubectl(
        *ns_args(), "exec", f"ds/{RELEASE}", "--",
        "stc-npu-agent", "diagnose", "--json",
        check=False,
    )  # fmt: skip
    assert as_json.stdout.strip(), as_json.stderr
    return json.loads(as_json.stdout), shown.stdout


def npu_entry(report: dict[str, Any], npu_id: str) -> dict[str, Any]:
    entries = [npu for npu in report["npus"] if npu["id"] == npu_id]
    assert entries, f"diagnose has no entry for {npu_id}: {[n['id'] for n in report['npus']]}"
    entry: dict[str, Any] = entries[0]
    return entry


def bad_reading_turns_allocatable_down_and_up(
    e2e: E2E,
    *,
    label: str,
    index: int,
    signal: str,
    make_bad: Callable[[], None],
    make_good: Callable[[], None],
) -> None:
    """A bad reading of ``signal`` for NPU ``index``: allocatable drops by
    one and diagnose names the signal for it; the good reading again:
    allocatable is back (the agent recovers on its own)."""
    npu_id = f"stc{index}"
    with transcript.step(f"{label}: stc-smi reports {npu_id} bad -> allocatable {NPU_COUNT - 1}"):
        started = time.monotonic()
        make_bad()
        wait_for(
            lambda: e2e.cluster.resource(RESOURCE) == NPU_COUNT - 1,
            f"allocatable {NPU_COUNT - 1}",
        )
        transcript.figure(
            f"vendor probe: {label} -> allocatable drops",
            kit.since(started),
            note="probe every 1 s, failThreshold 2, node status every 2 s",
        )
    with transcript.step(f"diagnose names {signal} for {npu_id}"):
        report, text = diagnose(e2e)
        for line in text.splitlines():
            if line.strip().startswith(("stc", "why:", "signals:", "- ", "vendor probe")):
                transcript.say(f"  | {line}")
        entry = npu_entry(report, npu_id)
        assert entry["health"] == "Unhealthy", entry
        assert entry["signals"][signal]["counts"], entry["signals"]
        assert signal in entry["reason"], entry["reason"]
        assert any(npu_id in p and signal in p for p in report["problems"]), report["problems"]
        assert f"{npu_id} is Unhealthy: " in text, text
        assert f"{signal} BAD" in text, text
        others = [n for n in report["npus"] if n["id"] != npu_id and n["health"] != "Healthy"]
        assert not others, f"only {npu_id} should be Unhealthy: {others}"
    with transcript.step(f"{label}: stc-smi reports {npu_id} good -> allocatable {NPU_COUNT}"):
        started = time.monotonic()
        make_good()
        wait_for(lambda: e2e.cluster.resource(RESOURCE) == NPU_COUNT, f"allocatable {NPU_COUNT}")
        transcript.figure(
            f"vendor probe: {label} recovered -> allocatable back",
            kit.since(started),
            note="recoverThreshold 2",
        )
        report, _ = diagnose(e2e)
        assert npu_entry(report, npu_id)["health"] == "Healthy", npu_entry(report, npu_id)


def test_vendor_probe_install_advertises_every_npu(e2e: E2E, fake_tool: FakeStcSmi) -> None:
    install(e2e, "helm3", vendor_probe_tool=str(fake_tool.path))
    with transcript.step("the agent runs the fake stc-smi and finds every card good"):
        # The probe's first readings: every NPU Healthy with its signals ok.
        def probed() -> bool:
            report, _ = diagnose(e2e)
            npus = report["npus"]
            return len(npus) == NPU_COUNT and all(
                npu["health"] == "Healthy" and npu["signals"].get("cardStatus", {}).get("state")
                for npu in npus
            )

        wait_for(probed, "diagnose: every NPU Healthy with a cardStatus reading", interval=1)
        _, text = diagnose(e2e)
        for line in text.splitlines():
            if "signals:" in line or line.startswith("vendor probe"):
                transcript.say(f"  | {line}")


def test_agent_runs_privileged_with_the_vendor_probe(e2e: E2E) -> None:
    with transcript.step("agent container: privileged in the pod spec and on the host"):
        spec = e2e.cluster.kubectl_json(*ns_args(), "get", f"ds/{RELEASE}")
        containers = spec["spec"]["template"]["spec"]["containers"]
        context = containers[0].get("securityContext", {})
        transcript.say(f"  securityContext: {json.dumps(context, sort_keys=True)}")
        assert context.get("privileged") is True, context
        pids = kit.pod_processes(AGENT_MARKER)
        assert len(pids) == 1, f"expected one agent process in the node's pods, found {pids}"
        status = kit.proc_status(pids[0])
        transcript.say(
            f"  pid {pids[0]}: CapEff {status['CapEff']} NoNewPrivs {status['NoNewPrivs']} "
            f"Seccomp {status['Seccomp']}"
        )
        # Privileged: the runtime's full capability set (CAP_SYS_ADMIN among
        # them) and no no_new_privs; the default install has no capability
        # at all (test_1's confinement scenario).
        assert int(status["CapEff"], 16) & (1 << CAP_SYS_ADMIN), status["CapEff"]
        assert status["NoNewPrivs"] == "0", status["NoNewPrivs"]


def test_card_off_turns_allocatable_down_and_back_up(e2e: E2E, fake_tool: FakeStcSmi) -> None:
    bad_reading_turns_allocatable_down_and_up(
        e2e,
        label="stc1 Status off",
        index=1,
        signal="cardStatus",
        make_bad=lambda: fake_tool.set(1, status="off"),
        make_good=lambda: fake_tool.set(1, status="on"),
    )


def test_dead_cluster_turns_allocatable_down_and_back_up(e2e: E2E, fake_tool: FakeStcSmi) -> None:
    bad_reading_turns_allocatable_down_and_up(
        e2e,
        label="stc2 Cluster 3 DEAD",
        index=2,
        signal="clusterStatus",
        make_bad=lambda: fake_tool.set(2, clusters=["WORK", "WORK", "WORK", "DEAD"]),
        make_good=lambda: fake_tool.reset(2),
    )


def test_vendor_probe_uninstall(e2e: E2E) -> None:
    uninstall(e2e, "helm3")
