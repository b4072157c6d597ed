"""The chart and the agent on a real Kubernetes v1.36 node, in order: install
(helm 3), the agent's confinement, diagnose, helm test, the example pods in a
restricted namespace, kubelet restarts, unplug/replug, upgrade to unmapped, a
values typo, uninstall, and the same install with helm 4.

The tests share one cluster and run in file order; each leaves the node as
the next expects. Waits are generous; durations are reported, never asserted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from ci.e2e import transcript
from ci.e2e.cluster import DEVICE_MAJOR, PLUGIN_DIR, E2EError, wait_for
from ci.e2e.npus import HPE_DIR, HPE_MARKER

from stc_npu_agent.agent import SOCKET_PREFIX
from tests.e2e import kit
from tests.e2e.conftest import (
    CHART,
    E2E,
    NPU_COUNT,
    RELEASE,
    RELEASE_NAMESPACE,
    RESOURCE,
    strategy_value,
)

pytestmark = pytest.mark.timeout(900)

IMAGES = Path(__file__).resolve().parents[2] / "images"
RESTRICTED_NS = "npu-restricted"
KUBELET_RESTARTS = 3
# The agent's own process inside its container (the image's venv).
AGENT_MARKER = "/opt/stc-npu-agent/bin/stc-npu-agent"


def ns_args() -> list[str]:
    return ["-n", RELEASE_NAMESPACE]


def install(
    e2e: E2E,
    helm: str,
    *,
    hpe_mode: str = "mapped",
    device_list_strategy: Sequence[str] = (),
    vendor_probe_tool: str = "",
    registration: str = "",
) -> None:
    """helm install, then wait for the DaemonSet's pod to be Ready and the
    node to advertise every NPU; the durations go to the transcript."""
    started = time.monotonic()
    shown = f"hpe.mode={hpe_mode}"
    label = helm
    if device_list_strategy:
        shown += f", deviceListStrategy={strategy_value(device_list_strategy)}"
        label = f"{'+'.join(device_list_strategy)}: {helm}"
    if vendor_probe_tool:
        shown += f", health.vendorProbe.tool={vendor_probe_tool}"
        label = f"vendor probe: {helm}"
    if registration:
        shown += f", registration={registration}"
        label = f"{registration}: {helm}"
    with transcript.step(f"{helm} install {RELEASE} ({shown})"):
        e2e.cluster.helm(
            helm, "install", RELEASE, str(CHART), *ns_args(),
            *e2e.chart_values(
                hpe_mode=hpe_mode,
                device_list_strategy=device_list_strategy,
                vendor_probe_tool=vendor_probe_tool,
                registration=registration,
            ),
        )  # fmt: skip
    with transcript.step("agent DaemonSet pod Ready"):
        e2e.cluster.kubectl(
            *ns_args(), "rollout", "status", f"ds/{RELEASE}", "--timeout=300s", timeout=320
        )
    transcript.figure(f"{label} install -> agent pod Ready", kit.since(started))
    with transcript.step(f"node allocatable {RESOURCE} = {NPU_COUNT}"):
        wait_for(
            lambda: e2e.cluster.resource(RESOURCE) == NPU_COUNT,
            f"allocatable {RESOURCE} {NPU_COUNT}",
        )
    transcript.figure(f"{label} install -> allocatable {NPU_COUNT}", kit.since(started))


def uninstall(e2e: E2E, helm: str) -> None:
    started = time.monotonic()
    with transcript.step(f"{helm} uninstall {RELEASE}"):
        e2e.cluster.helm(helm, "uninstall", RELEASE, *ns_args(), "--wait", "--timeout=300s")
    with transcript.step("agent pod gone, no socket of ours, allocatable 0"):
        wait_for(
            lambda: not agent_pods(e2e),
            "the agent pods to be deleted",
            timeout=180,
        )
        wait_for(
            lambda: not our_sockets(),
            f"no {SOCKET_PREFIX}* socket in the kubelet's plugin dir",
            timeout=60,
        )
        wait_for(lambda: e2e.cluster.resource(RESOURCE) == 0, "allocatable 0", timeout=120)
    transcript.figure(f"{helm} uninstall -> allocatable 0", kit.since(started))


def our_sockets() -> list[str]:
    """The agent's sockets in the plugin dir (the kubelet keeps its own
    kubelet.sock and kubelet_internal_checkpoint there)."""
    return sorted(p.name for p in PLUGIN_DIR.iterdir() if p.name.startswith(SOCKET_PREFIX))


def delete_example_pods(e2e: E2E) -> None:
    # `sleep infinity` as PID 1 ignores SIGTERM: a short grace period, not 30 s.
    e2e.cluster.kubectl(
        "-n", RESTRICTED_NS, "delete", "pods", "--all", "--grace-period=1", "--wait=true",
        timeout=300,
    )  # fmt: skip


def agent_pods(e2e: E2E) -> list[dict[str, Any]]:
    pods = e2e.cluster.kubectl_json(
        *ns_args(), "get", "pods", "-l", "app.kubernetes.io/name=stc-npu"
    )["items"]
    return list(pods)


def helm_revision(e2e: E2E, helm: str) -> int:
    history = json.loads(
        e2e.cluster.helm(helm, "history", RELEASE, *ns_args(), "-o", "json").stdout
    )
    return int(history[-1]["revision"])


def agent_logs(e2e: E2E) -> str:
    """The agent pod's log (retried: right after a kubelet restart the
    kubelet's log endpoint answers NotFound for a moment)."""

    def fetch() -> str:
        try:
            return e2e.cluster.kubectl(*ns_args(), "logs", f"ds/{RELEASE}", "--tail=-1").stdout
        except E2EError as error:
            raise LookupError(str(error)) from error

    return kit.wait_result(fetch, "the agent's log")


# --- pods of the examples --------------------------------------------------


def apply_example(e2e: E2E, example: Path, namespace: str) -> tuple[str, float]:
    """Apply an example pod as written; returns its name and its start time
    (apply -> Running)."""
    started = time.monotonic()
    e2e.cluster.kubectl("-n", namespace, "apply", "-f", str(example))
    name = e2e.cluster.kubectl(
        "-n", namespace, "create", "--dry-run=client", "-f", str(example), "-o", "name"
    ).stdout.strip()
    e2e.cluster.kubectl(
        "-n", namespace, "wait", "--for=jsonpath={.status.phase}=Running", name,
        "--timeout=300s", timeout=320,
    )  # fmt: skip
    return name.split("/", 1)[1], kit.since(started)


def pod_exec(e2e: E2E, namespace: str, pod: str, script: str) -> str:
    return e2e.cluster.kubectl("-n", namespace, "exec", pod, "--", "sh", "-c", script).stdout


def check_pod_view(e2e: E2E, namespace: str, pod: str, npus: int, hpe_mounted: bool) -> list[str]:
    """The pod sees exactly its NPUs' nodes, STC_NPU_DEVICES naming them, and
    the HPE read-only (mapped) or not at all (unmapped); the devices cgroup
    lets exactly those nodes through. Returns the pod's NPU ids."""
    devices = pod_exec(e2e, namespace, pod, 'echo "$STC_NPU_DEVICES"').strip()
    npu_ids = devices.split(",") if devices else []
    assert len(npu_ids) == npus, f"{pod}: STC_NPU_DEVICES={devices!r}, expected {npus} NPU(s)"
    seen = set(pod_exec(e2e, namespace, pod, "ls /dev").split())
    stc_nodes = {name for name in seen if name.startswith("stc")}
    assert stc_nodes == kit.npu_node_names(npu_ids), f"{pod}: /dev has {sorted(stc_nodes)}"
    char_check = " && ".join(f"test -c /dev/{n}" for n in sorted(stc_nodes))
    pod_exec(e2e, namespace, pod, char_check)

    mounts = pod_exec(e2e, namespace, pod, "cat /proc/self/mountinfo")
    hpe_mounts = [line.split() for line in mounts.splitlines() if line.split()[4] == str(HPE_DIR)]
    if hpe_mounted:
        assert len(hpe_mounts) == 1, f"{pod}: expected one mount at {HPE_DIR}: {hpe_mounts}"
        assert "ro" in hpe_mounts[0][5].split(","), f"{pod}: HPE is not read-only: {hpe_mounts}"
        listing = pod_exec(e2e, namespace, pod, f"ls {HPE_DIR}").split()
        assert listing, f"{pod}: {HPE_DIR} is empty in the pod"
        if (HPE_DIR / HPE_MARKER).exists():
            assert HPE_MARKER in listing
    else:
        assert not hpe_mounts, f"{pod}: unexpected HPE mount {hpe_mounts}"

    # The host's view: the container's devices cgroup (cgroup v1, no cgroup
    # namespace, so the pod's /proc/self/cgroup names the host path).
    own = pod_exec(e2e, namespace, pod, "cat /proc/self/cgroup")
    expected = {e2e.npus.sim.devnum(n)[1] for n in kit.npu_node_names(npu_ids)}
    allowed = kit.container_devices_minors(own)
    assert allowed == expected, (
        f"{pod}: the devices cgroup allows minors {sorted(allowed)} of major "
        f"{DEVICE_MAJOR}, expected {sorted(expected)}"
    )
    return npu_ids


# --- the scenarios, in order -----------------------------------------------


def test_helm3_install_makes_the_agent_ready_and_advertises_every_npu(e2e: E2E) -> None:
    install(e2e, "helm3")
    node = e2e.cluster.node()["status"]
    assert int(node["capacity"][RESOURCE]) == NPU_COUNT
    assert int(node["allocatable"][RESOURCE]) == NPU_COUNT
    registered = [line for line in agent_logs(e2e).splitlines() if "registered" in line]
    assert registered, "the agent's log has no registration line"
    transcript.say(f"  agent: {registered[-1]}")


def test_agent_container_has_no_capabilities_no_new_privileges_read_only_root(
    e2e: E2E,
) -> None:
    with transcript.step("agent process on the host: /proc/<pid>/status, write attempt"):
        pids = kit.pod_processes(AGENT_MARKER)
        assert len(pids) == 1, f"expected one agent process in the node's pods, found {pids}"
        status = kit.proc_status(pids[0])
        transcript.say(
            f"  pid {pids[0]}: CapEff {status['CapEff']} CapBnd {status['CapBnd']} "
            f"CapPrm {status['CapPrm']} NoNewPrivs {status['NoNewPrivs']} "
            f"Seccomp {status['Seccomp']} Uid {status['Uid']}"
        )
        for field in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
            assert int(status[field], 16) == 0, f"{field} is {status[field]}"
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2", "not under a seccomp filter (RuntimeDefault)"
        write = e2e.cluster.kubectl(
            *ns_args(), "exec", f"ds/{RELEASE}", "--",
            "python", "-c", "open('/stc-npu-e2e-write-test', 'w')",
            check=False,
        )  # fmt: skip
        assert write.returncode != 0
        assert "Read-only file system" in write.stderr, write.stderr


def test_diagnose_in_the_agent_pod_reports_no_problem(e2e: E2E) -> None:
    with transcript.step("kubectl exec ds/stc-npu -- stc-npu-agent diagnose"):
        result = e2e.cluster.kubectl(
            *ns_args(), "exec", f"ds/{RELEASE}", "--", "stc-npu-agent", "diagnose", check=False
        )
        for line in result.stdout.splitlines():
            transcript.say(f"  | {line}")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "no problems found" in result.stdout


def helm_test(e2e: E2E, helm: str, *extra: str) -> None:
    with transcript.step(f"{helm} test {' '.join(extra)}".strip()):
        result = e2e.cluster.helm(helm, "test", RELEASE, *ns_args(), *extra, check=False)
        # The release's NOTES follow the test suite's lines: not repeated here.
        for line in (result.stdout.split("NOTES:")[0] + result.stderr).splitlines():
            if line.strip():
                transcript.say(f"  | {line}")
        assert result.returncode == 0, result.stderr
        assert "Succeeded" in result.stdout, result.stdout


def test_helm_test_passes(e2e: E2E) -> None:
    helm_test(e2e, "helm3")


def test_helm_test_with_logs_passes(e2e: E2E) -> None:
    helm_test(e2e, "helm3", "--logs")


def test_example_pods_in_a_restricted_namespace_see_exactly_their_npus(e2e: E2E) -> None:
    with transcript.step(f"namespace {RESTRICTED_NS} enforcing the restricted standard"):
        e2e.cluster.kubectl("create", "namespace", RESTRICTED_NS)
        e2e.cluster.kubectl(
            "label", "namespace", RESTRICTED_NS,
            "pod-security.kubernetes.io/enforce=restricted",
            "pod-security.kubernetes.io/enforce-version=latest",
        )  # fmt: skip
        # Enforcement is real: a pod with a hostPath volume is refused.
        refused = e2e.cluster.kubectl(
            "-n", RESTRICTED_NS, "run", "hostpath-probe", "--dry-run=server",
            "--image=busybox", "--overrides",
            json.dumps({"spec": {"volumes": [{"name": "d", "hostPath": {"path": "/dev"}}]}}),
            check=False,
        )  # fmt: skip
        assert refused.returncode != 0
        assert "violates PodSecurity" in refused.stderr, refused.stderr
    for example, npus in (
        (IMAGES / "pod-mapped" / "example-pod.yaml", 1),
        (IMAGES / "pod-mapped" / "example-pod-2npu.yaml", 2),
    ):
        with transcript.step(f"example pod {example.parent.name}/{example.name} ({npus} NPU)"):
            name, took = apply_example(e2e, example, RESTRICTED_NS)
            transcript.figure(f"pod start {example.parent.name}/{example.name}", took)
            npu_ids = check_pod_view(e2e, RESTRICTED_NS, name, npus, hpe_mounted=True)
            transcript.say(f"  {name}: STC_NPU_DEVICES={','.join(npu_ids)}")


def running_pods(e2e: E2E) -> dict[str, tuple[str, int, str]]:
    """Pods of the restricted namespace: name -> (uid, restarts, container id)."""
    pods = e2e.cluster.kubectl_json("-n", RESTRICTED_NS, "get", "pods")["items"]
    return {
        p["metadata"]["name"]: (
            p["metadata"]["uid"],
            p["status"]["containerStatuses"][0]["restartCount"],
            p["status"]["containerStatuses"][0]["containerID"],
        )
        for p in pods
    }


def restart_kubelet(e2e: E2E, figure: str, server_line: str, register_line: str) -> None:
    """Stop and start the kubelet; the delay from its ``server_line`` to its
    ``register_line`` for our resource (its own log) goes to the figure
    ``figure``; then the node is Ready with every NPU allocatable."""
    e2e.cluster.stop_kubelet()
    pid = e2e.cluster.start_kubelet()
    delay, _, _ = kit.wait_result(
        partial(kit.registration_delay, pid, server_line, register_line, RESOURCE),
        "the new kubelet's log to show our registration",
    )
    transcript.figure(figure, delay * 1000, unit="ms", note="kubelet log")
    e2e.cluster.wait_node_ready()
    wait_for(
        lambda: e2e.cluster.resource(RESOURCE) == NPU_COUNT,
        f"allocatable {NPU_COUNT} after the restart",
    )


def test_kubelet_restarts_are_followed_by_reregistration(e2e: E2E) -> None:
    before = running_pods(e2e)
    assert before, "the example pods should be running"
    for restart in range(1, KUBELET_RESTARTS + 1):
        with transcript.step(f"kubelet restart {restart}/{KUBELET_RESTARTS}"):
            restart_kubelet(
                e2e,
                f"kubelet restart {restart}: registration server -> our Register",
                "Starting device plugin registration server",
                "Got registration request from device plugin with resource",
            )
        after = running_pods(e2e)
        assert after == before, f"pods changed across the restart: {before} -> {after}"
    lines = [line for line in agent_logs(e2e).splitlines() if "registered" in line]
    for line in lines[-KUBELET_RESTARTS:]:
        transcript.say(f"  agent: {line}")


def test_unplug_drops_allocatable_and_replug_restores_it(e2e: E2E) -> None:
    in_use = set()
    for name in running_pods(e2e):
        in_use |= set(
            pod_exec(e2e, RESTRICTED_NS, name, 'echo "$STC_NPU_DEVICES"').strip().split(",")
        )
    free = next(i for i in range(NPU_COUNT) if f"stc{i}" not in in_use)
    with transcript.step(
        f"unplug stc{free} (not in use): allocatable {NPU_COUNT} -> {NPU_COUNT - 1}"
    ):
        started = time.monotonic()
        e2e.npus.unplug(free)
        wait_for(
            lambda: e2e.cluster.resource(RESOURCE) == NPU_COUNT - 1,
            f"allocatable {NPU_COUNT - 1}",
        )
        transcript.figure(
            "unplug -> allocatable drops", kit.since(started), note="node status every 2 s"
        )
    with transcript.step(f"replug stc{free}: allocatable back to {NPU_COUNT}"):
        started = time.monotonic()
        e2e.npus.replug(free)
        wait_for(lambda: e2e.cluster.resource(RESOURCE) == NPU_COUNT, f"allocatable {NPU_COUNT}")
        transcript.figure(
            "replug -> allocatable restored", kit.since(started), note="node status every 2 s"
        )


def test_upgrade_to_unmapped_rolls_the_agent_and_new_pods_get_no_hpe(e2e: E2E) -> None:
    old_pods = {p["metadata"]["name"] for p in agent_pods(e2e)}
    with transcript.step("free the NPUs: delete the mapped example pods"):
        delete_example_pods(e2e)
    started = time.monotonic()
    with transcript.step("helm3 upgrade --reuse-values --set hpe.mode=unmapped"):
        e2e.cluster.helm(
            "helm3", "upgrade", RELEASE, str(CHART), *ns_args(), "--reuse-values",
            "--set", "hpe.mode=unmapped",
        )  # fmt: skip
        e2e.cluster.kubectl(
            *ns_args(), "rollout", "status", f"ds/{RELEASE}", "--timeout=300s", timeout=320
        )
        new_pods = {p["metadata"]["name"] for p in agent_pods(e2e)}
        assert new_pods, "no agent pod after the upgrade"
        assert not new_pods & old_pods, f"agent not rolled: {old_pods} -> {new_pods}"
        wait_for(lambda: e2e.cluster.resource(RESOURCE) == NPU_COUNT, f"allocatable {NPU_COUNT}")
    transcript.figure("helm upgrade mapped -> unmapped: rolled and allocatable", kit.since(started))
    for example, npus in (
        (IMAGES / "pod-unmapped" / "example-pod.yaml", 1),
        (IMAGES / "pod-unmapped" / "example-pod-2npu.yaml", 2),
    ):
        with transcript.step(f"example pod {example.parent.name}/{example.name} ({npus} NPU)"):
            name, took = apply_example(e2e, example, RESTRICTED_NS)
            transcript.figure(f"pod start {example.parent.name}/{example.name}", took)
            npu_ids = check_pod_view(e2e, RESTRICTED_NS, name, npus, hpe_mounted=False)
            transcript.say(f"  {name}: STC_NPU_DEVICES={','.join(npu_ids)}")


def test_a_values_typo_fails_the_upgrade_and_changes_nothing(e2e: E2E) -> None:
    with transcript.step("helm3 upgrade --set hpe.mod=mapped (a typo) fails"):
        revision = helm_revision(e2e, "helm3")
        generation = e2e.cluster.kubectl_json(*ns_args(), "get", f"ds/{RELEASE}")["metadata"][
            "generation"
        ]
        pods = {p["metadata"]["uid"] for p in agent_pods(e2e)}
        result = e2e.cluster.helm(
            "helm3", "upgrade", RELEASE, str(CHART), *ns_args(), "--reuse-values",
            "--set", "hpe.mod=mapped", check=False,
        )  # fmt: skip
        transcript.say(f"  helm: {(result.stderr or result.stdout).strip().splitlines()[-1][:300]}")
        assert result.returncode != 0
        # The schema names the unknown key.
        assert "mod" in result.stderr, result.stderr
        assert helm_revision(e2e, "helm3") == revision
        ds = e2e.cluster.kubectl_json(*ns_args(), "get", f"ds/{RELEASE}")
        assert ds["metadata"]["generation"] == generation
        assert {p["metadata"]["uid"] for p in agent_pods(e2e)} == pods


def test_helm3_uninstall_leaves_no_socket_and_no_npu(e2e: E2E) -> None:
    with transcript.step("delete the example pods"):
        delete_example_pods(e2e)
    uninstall(e2e, "helm3")


def test_helm4_install_test_and_uninstall(e2e: E2E) -> None:
    install(e2e, "helm4")
    helm_test(e2e, "helm4")
    uninstall(e2e, "helm4")
