"""Device delivery by CDI on the real v1.36 node (containerd 2.x), in order:
install with deviceListStrategy={cdi-cri} (the spec in containerd's private
spec dir), the mapped example pods in the restricted namespace getting
exactly their NPUs' nodes and the HPE from the spec while the Allocate answer
carries NO DeviceSpecs, unplug and replug (the spec follows), both
strategies at once, and uninstall (the spec goes).

Runs after test_1_current_kubelet.py (file order: the restricted namespace
is there, nothing of ours is installed) and before test_2_old_kubelet.py
stops the v1.36 kubelet; it leaves nothing installed. Waits are generous;
durations are reported, never asserted.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from ci.e2e import transcript
from ci.e2e.cluster import CDI_SPEC_DIR, wait_for

from stc_npu_agent.core.allocation import qualified_name, spec_file_name
from tests.e2e import kit
from tests.e2e.conftest import CHART, E2E, NPU_COUNT, RELEASE, RESOURCE, strategy_value
from tests.e2e.test_1_current_kubelet import (
    IMAGES,
    RESTRICTED_NS,
    agent_logs,
    apply_example,
    check_pod_view,
    delete_example_pods,
    install,
    ns_args,
    pod_exec,
    running_pods,
    uninstall,
)

pytestmark = pytest.mark.timeout(900)

SPEC_FILE = CDI_SPEC_DIR / spec_file_name(RESOURCE)
CDI_ONLY = ("cdi-cri",)
BOTH = ("device-specs", "cdi-cri")
# The nodes of one NPU the DeviceSpecs name: stcN, stcNc0..3, stcNctrl.
NODES_PER_NPU = 6


def spec_devices() -> set[str]:
    """The device names of the CDI spec file on the host (raises while it is
    missing or half-read, for wait_result)."""
    spec: dict[str, Any] = json.loads(SPEC_FILE.read_text())
    if spec.get("kind") != RESOURCE:
        raise ValueError(f"{SPEC_FILE}: kind {spec.get('kind')!r}, expected {RESOURCE!r}")
    return {device["name"] for device in spec["devices"]}


def all_npus() -> set[str]:
    return {f"stc{index}" for index in range(NPU_COUNT)}


def allocate_line(e2e: E2E, npu_ids: list[str]) -> str:
    """The agent's log line of the Allocate that gave ``npu_ids`` (plugin.py:
    "Allocate IDS: N device nodes[, HPE mounted read-only][, CDI NAMES]")."""
    head = f"Allocate {','.join(sorted(npu_ids))}: "

    def fetch() -> str:
        lines = [line for line in agent_logs(e2e).splitlines() if head in line]
        if not lines:
            raise LookupError(f"no agent log line with {head!r}")
        return lines[-1]

    return kit.wait_result(fetch, f"the agent's log line {head!r}")


def cdi_names(npu_ids: list[str]) -> str:
    return ",".join(qualified_name(RESOURCE, npu) for npu in sorted(npu_ids))


def ensure_restricted_namespace(e2e: E2E) -> None:
    """test_1 made it; made here too when this module runs alone (-k)."""
    present = e2e.cluster.kubectl("get", "namespace", RESTRICTED_NS, check=False)
    if present.returncode != 0:
        e2e.cluster.kubectl("create", "namespace", RESTRICTED_NS)
        e2e.cluster.kubectl(
            "label", "namespace", RESTRICTED_NS,
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest",
        )  # fmt: skip


def run_mapped_examples(e2e: E2E, label: str, examples: tuple[tuple[str, int], ...]) -> None:
    """Apply the mapped example pods: each sees exactly its NPUs' nodes and
    the HPE read-only, and the agent's log shows the Allocate answer it got."""
    for file_name, npus in examples:
        example = IMAGES / "pod-mapped" / file_name
        with transcript.step(f"{label}: example pod pod-mapped/{file_name} ({npus} NPU)"):
            name, took = apply_example(e2e, example, RESTRICTED_NS)
            transcript.figure(f"{label}: pod start pod-mapped/{file_name}", took)
            npu_ids = check_pod_view(e2e, RESTRICTED_NS, name, npus, hpe_mounted=True)
            transcript.say(f"  {name}: STC_NPU_DEVICES={','.join(npu_ids)}")
            line = allocate_line(e2e, npu_ids)
            transcript.say(f"  agent: {line}")
            names = cdi_names(npu_ids)
            if label == "cdi-cri":
                assert f": 0 device nodes, CDI {names}" in line, (
                    f"{name}: the Allocate answer should carry no DeviceSpecs, no mount "
                    f"and the CDI names {names}: {line}"
                )
            else:
                nodes = NODES_PER_NPU * len(npu_ids)
                expected = f": {nodes} device nodes, HPE mounted read-only, CDI {names}"
                assert expected in line, f"{name}: expected {expected!r}: {line}"


def test_cdi_cri_install_writes_the_spec_into_containerds_spec_dir(e2e: E2E) -> None:
    assert not SPEC_FILE.exists(), f"{SPEC_FILE} is there before the install"
    started_wall = time.time()
    install(e2e, "helm3", device_list_strategy=CDI_ONLY)
    devices = kit.wait_result(spec_devices, f"the CDI spec {SPEC_FILE}")
    # Written before the install returned: its mtime says when.
    transcript.figure(
        "cdi-cri: helm3 install -> CDI spec written",
        SPEC_FILE.stat().st_mtime - started_wall,
        note="the spec file's mtime",
    )
    assert devices == all_npus(), f"{SPEC_FILE} names {sorted(devices)}"
    transcript.say(f"  {SPEC_FILE.name}: devices {','.join(sorted(devices))}")


def test_diagnose_shows_an_allocate_answer_of_cdi_names_only(e2e: E2E) -> None:
    with transcript.step("kubectl exec ds/stc-npu -- stc-npu-agent diagnose --allocate stc0"):
        result = e2e.cluster.kubectl(
            *ns_args(), "exec", f"ds/{RELEASE}", "--",
            "stc-npu-agent", "diagnose", "--allocate", "stc0", "--json",
            check=False,
        )  # fmt: skip
        assert result.stdout.strip(), result.stderr
        answer = json.loads(result.stdout)["allocate"]["stc0"]
        transcript.say(f"  answer: {json.dumps(answer, sort_keys=True)}")
        assert answer["source"] == "agent", answer
        assert answer["devices"] == [], answer
        assert answer["mounts"] == [], answer
        assert answer["cdiDevices"] == [qualified_name(RESOURCE, "stc0")], answer


def test_cdi_cri_example_pods_get_exactly_their_npus_with_no_device_specs(e2e: E2E) -> None:
    ensure_restricted_namespace(e2e)
    run_mapped_examples(e2e, "cdi-cri", (("example-pod.yaml", 1), ("example-pod-2npu.yaml", 2)))


def test_cdi_cri_unplug_drops_the_npu_from_the_spec_and_allocatable(e2e: E2E) -> None:
    in_use: set[str] = set()
    for name in running_pods(e2e):
        in_use |= set(
            pod_exec(e2e, RESTRICTED_NS, name, 'echo "$STC_NPU_DEVICES"').strip().split(",")
        )
    free = next(i for i in range(NPU_COUNT) if f"stc{i}" not in in_use)
    before = SPEC_FILE.read_bytes()
    with transcript.step(f"cdi-cri: unplug stc{free}: the spec drops it, allocatable drops"):
        started = time.monotonic()
        e2e.npus.unplug(free)
        wait_for(
            lambda: spec_devices() == all_npus() - {f"stc{free}"},
            f"{SPEC_FILE} without stc{free}",
        )
        transcript.figure("cdi-cri: unplug -> spec rewritten", kit.since(started))
        assert SPEC_FILE.read_bytes() != before
        wait_for(
            lambda: e2e.cluster.resource(RESOURCE) == NPU_COUNT - 1,
            f"allocatable {NPU_COUNT - 1}",
        )
        transcript.figure(
            "cdi-cri: unplug -> allocatable drops", kit.since(started), note="node status every 2 s"
        )
    with transcript.step(f"cdi-cri: replug stc{free}: back in the spec and allocatable"):
        started = time.monotonic()
        e2e.npus.replug(free)
        wait_for(lambda: spec_devices() == all_npus(), f"{SPEC_FILE} with every NPU")
        transcript.figure("cdi-cri: replug -> spec rewritten", kit.since(started))
        wait_for(lambda: e2e.cluster.resource(RESOURCE) == NPU_COUNT, f"allocatable {NPU_COUNT}")


def test_both_strategies_answer_device_specs_and_cdi_names(e2e: E2E) -> None:
    with transcript.step("free the NPUs: delete the example pods"):
        delete_example_pods(e2e)
    with transcript.step(f"helm3 upgrade --set deviceListStrategy={strategy_value(BOTH)}"):
        e2e.cluster.helm(
            "helm3", "upgrade", RELEASE, str(CHART), *ns_args(), "--reuse-values",
            "--set", f"deviceListStrategy={strategy_value(BOTH)}",
        )  # fmt: skip
        e2e.cluster.kubectl(
            *ns_args(), "rollout", "status", f"ds/{RELEASE}", "--timeout=300s", timeout=320
        )
        wait_for(lambda: e2e.cluster.resource(RESOURCE) == NPU_COUNT, f"allocatable {NPU_COUNT}")
        # Without the spec the agent would answer DeviceSpecs alone.
        kit.wait_result(spec_devices, f"the CDI spec {SPEC_FILE}")
    run_mapped_examples(e2e, "device-specs+cdi-cri", (("example-pod.yaml", 1),))


def test_uninstall_removes_the_spec(e2e: E2E) -> None:
    with transcript.step("delete the example pods"):
        delete_example_pods(e2e)
    uninstall(e2e, "helm3")
    with transcript.step(f"the agent's clean stop removed {SPEC_FILE.name}"):
        wait_for(lambda: not SPEC_FILE.exists(), f"{SPEC_FILE} removed", timeout=60)
