"""DRA mode (chart value mode=dra) on the real v1.36 node, in order:
install (the kubelet registers the DRA plugin, the node's ResourceSlice
appears with the simulated sysfs' attributes, no extended resource), the
examples examples/dra/*.yaml in the restricted namespace, a pod asking for
the extended resource served by DRA (KEP-5004), unplug (a device taint in
the slice; a new claim avoids the NPU) and replug, a kubelet restart and an
agent restart with a prepared claim, and uninstall.

Runs after test_1c_vendor_probe.py (nothing of ours is installed) and before
test_2_old_kubelet.py stops the v1.36 kubelet; it leaves nothing installed.
Waits are generous; durations are reported, never asserted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from ci.e2e import transcript
from ci.e2e.cluster import CDI_SPEC_DIR, NODE_NAME, wait_for
from ci.e2e.npus import DRIVER_VERSION, HPE_DIR

from stc_npu_agent.agent import SOCKET_PREFIX
from stc_npu_agent.core.allocation import qualified_name, spec_file_name
from stc_npu_agent.core.config import DRA_DRIVER_NAME
from stc_npu_agent.core.dra import claim_spec_file_name
from stc_npu_agent.core.slices import PCIE_ROOT_ATTRIBUTE, UNHEALTHY_TAINT_KEY
from tests.e2e import kit
from tests.e2e.conftest import CHART, E2E, NPU_COUNT, RELEASE, RESOURCE
from tests.e2e.test_1_current_kubelet import (
    AGENT_MARKER,
    RESTRICTED_NS,
    agent_logs,
    agent_pods,
    ns_args,
)
from tests.e2e.test_1b_cdi import ensure_restricted_namespace

pytestmark = pytest.mark.timeout(900)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "dra"
SPEC_FILE = CDI_SPEC_DIR / spec_file_name(RESOURCE)
HELM = "helm4"
# What the simulated sysfs gives (ci/e2e/npus.py, SimNode): device 0x0100,
# two NPUs per NUMA node, BDF 0000:<index + 3>:00.0 under root pci0000:00.
MODEL = "STCP920"
# The example pods end after a look at /dev: kept running here so that the
# test can look too (the examples' own commands run first).
KEEP_RUNNING = "; exec sleep 3600"
# Longer than the kubelet's health timeout (30 s).
HEALTH_QUIET = 35.0


def our_slices(e2e: E2E) -> list[dict[str, Any]]:
    items = e2e.cluster.kubectl_json("get", "resourceslices")["items"]
    return [s for s in items if s["spec"].get("driver") == DRA_DRIVER_NAME]


def node_slice(e2e: E2E) -> dict[str, Any]:
    """The node's one slice of our driver (raises while there is none)."""
    slices = our_slices(e2e)
    if len(slices) != 1:
        raise LookupError(f"{len(slices)} ResourceSlices of {DRA_DRIVER_NAME}")
    return slices[0]


def slice_devices(e2e: E2E) -> dict[str, dict[str, Any]]:
    return {device["name"]: device for device in node_slice(e2e)["spec"].get("devices", [])}


def every_npu_in_the_slice(e2e: E2E) -> None:
    """Returns once the node's slice lists every NPU (raises before)."""
    devices = slice_devices(e2e)
    if len(devices) != NPU_COUNT:
        raise LookupError(f"the slice lists {sorted(devices)}")


def attribute_values(device: dict[str, Any]) -> dict[str, Any]:
    """{name: value} of a slice device's attributes (the one-key value objects)."""
    return {
        name: next(iter(value.values())) for name, value in device.get("attributes", {}).items()
    }


def expected_attributes(index: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "index": index,
        "numaNode": index // 2,
        PCIE_ROOT_ATTRIBUTE: "pci0000:00",
        "pciAddress": f"0000:{index + 3:02x}:00.0",
        "driverVersion": DRIVER_VERSION,
    }


def kubelet_dra_registration(pid: int) -> kit.LogLine:
    """The kubelet's log line of our DRA plugin's registration (its DRA
    plugin manager, once connected to the endpoint GetInfo named)."""
    lines = kit.kubelet_log(pid)
    return kit.first_line(
        lines, '"Connection changed"', f'driverName="{DRA_DRIVER_NAME}"', "connected=true"
    )


def install_dra(e2e: E2E) -> None:
    started = time.monotonic()
    with transcript.step(f"{HELM} install {RELEASE} (mode=dra)"):
        e2e.cluster.helm(
            HELM, "install", RELEASE, str(CHART), *ns_args(), *e2e.chart_values(mode="dra")
        )
    with transcript.step("agent DaemonSet pod Ready"):
        e2e.cluster.kubectl(
            *ns_args(), "rollout", "status", f"ds/{RELEASE}", "--timeout=300s", timeout=320
        )
    transcript.figure("dra: install -> agent pod Ready", kit.since(started))
    with transcript.step(f"the node's ResourceSlice with {NPU_COUNT} devices"):
        kit.wait_result(lambda: every_npu_in_the_slice(e2e), "the node's ResourceSlice")
    transcript.figure("dra: install -> ResourceSlice published", kit.since(started))


# --- pods, claims and what a container sees -----------------------------------


def example_objects(file_name: str) -> list[dict[str, Any]]:
    """The example's objects, its pods' containers kept running after their
    own command."""
    objects = [o for o in yaml.safe_load_all((EXAMPLES / file_name).read_text()) if o]
    for obj in objects:
        if obj["kind"] == "Pod":
            for container in obj["spec"]["containers"]:
                container["command"][-1] += KEEP_RUNNING
    return objects


def example_output_nodes(e2e: E2E, pod_name: str, container: str) -> set[str]:
    """The /dev/stc* nodes the example's own `ls -l /dev/stc*` listed (its log)."""

    def fetch() -> set[str]:
        log = e2e.cluster.kubectl("-n", RESTRICTED_NS, "logs", pod_name, "-c", container).stdout
        nodes = {line.rsplit("/", 1)[1] for line in log.splitlines() if " /dev/stc" in line}
        if not nodes:
            raise LookupError(f"{pod_name}/{container} has logged no /dev/stc* yet: {log!r}")
        return nodes

    return kit.wait_result(fetch, f"the ls of {pod_name}/{container}")


def apply_objects(e2e: E2E, objects: list[dict[str, Any]]) -> None:
    e2e.cluster.kubectl(
        "-n", RESTRICTED_NS, "apply", "-f", "-",
        input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
    )  # fmt: skip


def run_pod(e2e: E2E, objects: list[dict[str, Any]]) -> tuple[str, float]:
    """Apply ``objects`` (one pod among them); the pod's name and its start
    time (apply -> Running)."""
    started = time.monotonic()
    apply_objects(e2e, objects)
    name = next(o["metadata"]["name"] for o in objects if o["kind"] == "Pod")
    e2e.cluster.kubectl(
        "-n", RESTRICTED_NS, "wait", "--for=jsonpath={.status.phase}=Running", f"pod/{name}",
        "--timeout=300s", timeout=320,
    )  # fmt: skip
    return name, kit.since(started)


def sleeping_pod(name: str, *, claim_template: str = "", npus: int = 0) -> dict[str, Any]:
    """A restricted busybox pod: with a claim from ``claim_template``, or
    asking for ``npus`` of the extended resource."""
    container: dict[str, Any] = {
        "name": "main",
        "image": "docker.io/library/busybox:1.37.0",
        "command": ["sh", "-c", "exec sleep 3600"],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 1,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
    }
    if claim_template:
        spec["resourceClaims"] = [{"name": "npus", "resourceClaimTemplateName": claim_template}]
        container["resources"] = {"claims": [{"name": "npus"}]}
    if npus:
        container["resources"] = {"limits": {RESOURCE: str(npus)}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def claim_template(name: str, count: int, selector: str = "") -> dict[str, Any]:
    """A ResourceClaimTemplate for ``count`` NPUs (those ``selector``, a CEL
    expression, matches)."""
    template: dict[str, Any] = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {"name": name},
        "spec": {
            "spec": {
                "devices": {
                    "requests": [
                        {
                            "name": "npus",
                            "exactly": {
                                "deviceClassName": DRA_DRIVER_NAME,
                                "allocationMode": "ExactCount",
                                "count": count,
                            },
                        }
                    ]
                }
            }
        },
    }
    if selector:
        request = template["spec"]["spec"]["devices"]["requests"][0]
        request["exactly"]["selectors"] = [{"cel": {"expression": selector}}]
    return template


def pod(e2e: E2E, name: str) -> dict[str, Any]:
    result: dict[str, Any] = e2e.cluster.kubectl_json("-n", RESTRICTED_NS, "get", "pod", name)
    return result


def pod_claim_names(e2e: E2E, name: str) -> list[str]:
    """The ResourceClaims of a pod: its own (status.resourceClaimStatuses)
    and the one the scheduler made for its extended resources."""
    status = pod(e2e, name)["status"]
    names = [s["resourceClaimName"] for s in status.get("resourceClaimStatuses", [])]
    extended = status.get("extendedResourceClaimStatus")
    if extended:
        names.append(extended["resourceClaimName"])
    return names


def claim(e2e: E2E, name: str) -> dict[str, Any]:
    result: dict[str, Any] = e2e.cluster.kubectl_json(
        "-n", RESTRICTED_NS, "get", "resourceclaim", name
    )
    return result


def allocated_npus(claim_object: dict[str, Any]) -> list[str]:
    """The NPUs of our driver in this node's pool that a claim was given."""
    results = claim_object["status"]["allocation"]["devices"]["results"]
    for result in results:
        assert result["driver"] == DRA_DRIVER_NAME, result
        assert result["pool"] == NODE_NAME, result
    return sorted(result["device"] for result in results)


def container_exec(e2e: E2E, pod_name: str, container: str, script: str) -> str:
    return e2e.cluster.kubectl(
        "-n", RESTRICTED_NS, "exec", pod_name, "-c", container, "--", "sh", "-c", script
    ).stdout


def wait_exec(e2e: E2E, pod_name: str, container: str) -> None:
    """Wait until ``kubectl exec`` reaches the container (right after a
    kubelet restart the kubelet answers "pod does not exist" for a moment)."""

    def probe() -> None:
        result = e2e.cluster.kubectl(
            "-n", RESTRICTED_NS, "exec", pod_name, "-c", container, "--", "true", check=False
        )
        if result.returncode != 0:
            raise LookupError(result.stderr.strip())

    kit.wait_result(probe, f"kubectl exec into {pod_name}/{container}")


def check_container_view(e2e: E2E, pod_name: str, container: str, npu_ids: list[str]) -> None:
    """The container sees exactly ``npu_ids``' nodes of /dev/stc*, the HPE
    read-only (the CDI spec's mount, hpe.mode mapped), STC_NPU_DEVICES naming
    them (the claim's own spec), and its devices cgroup lets exactly those
    nodes through."""
    listed = container_exec(e2e, pod_name, container, 'echo "$STC_NPU_DEVICES"').strip()
    in_order = ",".join(sorted(npu_ids, key=lambda npu: int(npu.removeprefix("stc"))))
    assert listed == in_order, f"{pod_name}/{container}: STC_NPU_DEVICES={listed!r}"
    seen = set(container_exec(e2e, pod_name, container, "ls /dev").split())
    stc_nodes = {name for name in seen if name.startswith("stc")}
    expected_nodes = kit.npu_node_names(npu_ids)
    assert stc_nodes == expected_nodes, f"{pod_name}/{container}: /dev has {sorted(stc_nodes)}"
    char_check = " && ".join(f"test -c /dev/{n}" for n in sorted(stc_nodes))
    container_exec(e2e, pod_name, container, char_check)
    mounts = container_exec(e2e, pod_name, container, "cat /proc/self/mountinfo")
    hpe_mounts = [line.split() for line in mounts.splitlines() if line.split()[4] == str(HPE_DIR)]
    assert len(hpe_mounts) == 1, f"{pod_name}/{container}: mounts at {HPE_DIR}: {hpe_mounts}"
    assert "ro" in hpe_mounts[0][5].split(","), f"{pod_name}: HPE not read-only: {hpe_mounts}"
    own = container_exec(e2e, pod_name, container, "cat /proc/self/cgroup")
    expected = {e2e.npus.sim.devnum(n)[1] for n in expected_nodes}
    allowed = kit.container_devices_minors(own)
    assert allowed == expected, (
        f"{pod_name}/{container}: the devices cgroup allows minors {sorted(allowed)}, "
        f"expected {sorted(expected)}"
    )


def agent_line(e2e: E2E, needle: str) -> str:
    """The agent's last log line holding ``needle`` (waits for it)."""

    def fetch() -> str:
        lines = [line for line in agent_logs(e2e).splitlines() if needle in line]
        if not lines:
            raise LookupError(f"no agent log line with {needle!r}")
        return lines[-1].strip()

    return kit.wait_result(fetch, f"the agent's log line {needle!r}")


def check_prepared(e2e: E2E, claim_name: str, npu_ids: list[str]) -> None:
    # draplugin.py: "prepared claim NS/NAME (UID): CDI IDS"
    line = agent_line(e2e, f"prepared claim {RESTRICTED_NS}/{claim_name} ")
    transcript.say(f"  agent: {line.strip()}")
    # Each NPU's ID, and the ID of its request's env in the claim's own spec.
    uid = line.split(f"{claim_name} (", 1)[1].split(")", 1)[0]
    ids = set(line.rstrip().rsplit(": ", 1)[1].split(","))
    env_prefix = qualified_name(RESOURCE, f"claim-{uid}-")
    env_ids = {i for i in ids if i.startswith(env_prefix)}
    names = {qualified_name(RESOURCE, npu) for npu in npu_ids}
    assert ids - env_ids == names, f"expected the CDI IDs {sorted(names)}: {line}"
    assert env_ids, f"no env ID {env_prefix}<request>: {line}"
    claim_spec = CDI_SPEC_DIR / claim_spec_file_name(RESOURCE, uid)
    assert claim_spec.is_file(), f"{claim_spec} is missing"


def delete_pods(e2e: E2E, *names: str) -> None:
    e2e.cluster.kubectl(
        "-n", RESTRICTED_NS, "delete", "pod", *names, "--grace-period=1", "--wait=true",
        "--ignore-not-found", timeout=300,
    )  # fmt: skip


def delete_all(e2e: E2E) -> None:
    """Every pod, claim and claim template of the restricted namespace."""
    for kind in ("pods", "resourceclaims", "resourceclaimtemplates"):
        e2e.cluster.kubectl(
            "-n", RESTRICTED_NS, "delete", kind, "--all", "--grace-period=1", "--wait=true",
            timeout=300,
        )  # fmt: skip


def prepare_latency(e2e: E2E) -> tuple[float, int]:
    """The kubelet's own mean NodePrepareResources latency (its
    dra_grpc_operations_duration_seconds histogram) and the call count."""
    metrics = e2e.cluster.kubectl("get", "--raw", f"/api/v1/nodes/{NODE_NAME}/proxy/metrics").stdout
    total = count = 0.0
    for line in metrics.splitlines():
        if line.startswith("dra_grpc_operations_duration_seconds_") and (
            "NodePrepareResources" in line and f'driver_name="{DRA_DRIVER_NAME}"' in line
        ):
            value = float(line.rsplit(" ", 1)[1])
            if line.startswith("dra_grpc_operations_duration_seconds_sum"):
                total += value
            elif line.startswith("dra_grpc_operations_duration_seconds_count"):
                count += value
    if not count:
        raise LookupError("no NodePrepareResources in the kubelet's metrics")
    return total / count, int(count)


@pytest.fixture(autouse=True)
def _no_claims_left(e2e: E2E) -> Iterator[None]:
    """Each scenario ends with no pod or claim of ours, also when it failed:
    the next one counts claims and NPUs."""
    yield
    if e2e.cluster.kubectl("get", "namespace", RESTRICTED_NS, check=False).returncode == 0:
        delete_all(e2e)


# --- the scenarios, in order -------------------------------------------------


def test_dra_install_publishes_the_slice_and_registers_with_the_kubelet(e2e: E2E) -> None:
    assert not our_slices(e2e), "a ResourceSlice of our driver before the install"
    install_dra(e2e)
    with transcript.step("the kubelet registered the DRA plugin (its log)"):
        line = kit.wait_result(
            lambda: kubelet_dra_registration(e2e.cluster.kubelet_pid()),
            "the kubelet's registration line",
        )
        transcript.say(f"  kubelet: {line.text[:300]}")
    with transcript.step("the slice: driver, pool, devices and attributes"):
        published = node_slice(e2e)
        spec = published["spec"]
        transcript.say(f"  {published['metadata']['name']}: pool {json.dumps(spec['pool'])}")
        assert spec["nodeName"] == NODE_NAME, spec
        owners = published["metadata"].get("ownerReferences", [])
        node_uid = e2e.cluster.node()["metadata"]["uid"]
        assert [(o["kind"], o["uid"]) for o in owners] == [("Node", node_uid)], owners
        assert spec["pool"]["name"] == NODE_NAME, spec
        devices = slice_devices(e2e)
        assert sorted(devices) == [f"stc{i}" for i in range(NPU_COUNT)], sorted(devices)
        for index in range(NPU_COUNT):
            device = devices[f"stc{index}"]
            values = attribute_values(device)
            transcript.say(f"  stc{index}: {json.dumps(values, sort_keys=True)}")
            assert values == expected_attributes(index), values
            assert not device.get("taints"), device
    with transcript.step(f"node allocatable {RESOURCE} 0 (no device plugin)"):
        # After the device-plugin scenarios the kubelet keeps the resource's
        # capacity (allocatable 0) until its next restart: not ours to judge.
        assert e2e.cluster.resource(RESOURCE) == 0
        capacity = e2e.cluster.resource(RESOURCE, "capacity")
        transcript.say(f"  allocatable 0, capacity {capacity}")
    with transcript.step("the agent's RSS in DRA mode"):
        pids = kit.pod_processes(AGENT_MARKER)
        assert len(pids) == 1, f"expected one agent process, found {pids}"
        rss_kib = int(kit.proc_status(pids[0])["VmRSS"].split()[0])
        transcript.figure("dra: agent RSS (VmRSS)", rss_kib / 1024, unit="MiB")


def test_dra_two_npus_on_one_numa_node(e2e: E2E) -> None:
    ensure_restricted_namespace(e2e)
    with transcript.step("examples/dra/two-npus-one-numa.yaml: claim, pod Running"):
        name, took = run_pod(e2e, example_objects("two-npus-one-numa.yaml"))
        transcript.figure("dra: pod start with a claim (2 NPUs, one NUMA node)", took)
        (claim_name,) = pod_claim_names(e2e, name)
        npu_ids = allocated_npus(claim(e2e, claim_name))
        transcript.say(f"  {claim_name}: allocated {','.join(npu_ids)}")
        assert len(npu_ids) == 2, npu_ids
        devices = slice_devices(e2e)
        numa = {attribute_values(devices[npu])["numaNode"] for npu in npu_ids}
        assert len(numa) == 1, f"{npu_ids} are on NUMA nodes {numa}"
    with transcript.step("the pod sees exactly those NPUs; the agent prepared them"):
        listed = example_output_nodes(e2e, name, "main")
        assert listed == kit.npu_node_names(npu_ids), f"the example's ls: {sorted(listed)}"
        check_container_view(e2e, name, "main", npu_ids)
        check_prepared(e2e, claim_name, npu_ids)
    delete_all(e2e)


def test_dra_shared_claim_gives_both_containers_the_same_npu(e2e: E2E) -> None:
    with transcript.step("examples/dra/shared-claim.yaml: one claim, two containers"):
        name, took = run_pod(e2e, example_objects("shared-claim.yaml"))
        transcript.figure("dra: pod start with a shared claim", took)
        npu_ids = allocated_npus(claim(e2e, "one-npu"))
        transcript.say(f"  one-npu: allocated {','.join(npu_ids)}")
        assert len(npu_ids) == 1, npu_ids
        for container in ("inference", "monitor"):
            listed = example_output_nodes(e2e, name, container)
            assert listed == kit.npu_node_names(npu_ids), f"{container}'s ls: {sorted(listed)}"
            check_container_view(e2e, name, container, npu_ids)
        check_prepared(e2e, "one-npu", npu_ids)
    delete_all(e2e)


def test_dra_serves_a_pod_asking_for_the_extended_resource(e2e: E2E) -> None:
    with transcript.step(f"a pod asking for {RESOURCE}: 2, served by DRA (KEP-5004)"):
        name, took = run_pod(e2e, [sleeping_pod("extended-npus", npus=2)])
        transcript.figure("dra: pod start, extended resource", took)
        status = pod(e2e, name)["status"]
        extended = json.dumps(status.get("extendedResourceClaimStatus"))
        transcript.say(f"  extendedResourceClaimStatus: {extended}")
        (claim_name,) = pod_claim_names(e2e, name)
        npu_ids = allocated_npus(claim(e2e, claim_name))
        transcript.say(f"  {claim_name} (made by the scheduler): allocated {','.join(npu_ids)}")
        assert len(npu_ids) == 2, npu_ids
        check_container_view(e2e, name, "main", npu_ids)
        check_prepared(e2e, claim_name, npu_ids)
    delete_all(e2e)


def pod_device_health(e2e: E2E, pod_name: str, npu: str, health: str) -> list[Any]:
    """The pod's allocatedResourcesStatus (KEP-4680, fed by the agent's
    health stream) once it gives ``npu`` the ``health`` (raises before)."""
    statuses = pod(e2e, pod_name)["status"].get("containerStatuses", [])
    allocated = [entry for c in statuses for entry in c.get("allocatedResourcesStatus") or []]
    for entry in allocated:
        for resource in entry.get("resources") or []:
            # The kubelet names a device by its first CDI ID (ours:
            # streamcomputing.com/npu=stc3), else driver/pool/device.
            if resource.get("resourceID", "").endswith((f"={npu}", f"/{npu}")) and (
                resource.get("health") == health
            ):
                return allocated
    raise LookupError(f"{pod_name}: allocatedResourcesStatus {allocated}")


def unhealthy(device: dict[str, Any] | None) -> bool:
    """Tainted NoSchedule by our agent, or left out of the slice (None)."""
    if device is None:
        return True
    return any(
        t["key"] == UNHEALTHY_TAINT_KEY and t["effect"] == "NoSchedule"
        for t in device.get("taints", [])
    )


def test_dra_unplug_taints_the_device_and_new_claims_avoid_it(e2e: E2E) -> None:
    gone = NPU_COUNT - 1
    npu = f"stc{gone}"
    with transcript.step(f"{HEALTH_QUIET:.0f} s with no health change since the stream opened"):
        # The kubelet counts a device it has not heard of for 30 s as Unknown:
        # the holder below shows Healthy only if the agent repeats its list.
        opened = agent_line(e2e, "kubelet opened the device health stream")
        at = datetime.strptime(opened[:23], "%Y-%m-%d %H:%M:%S,%f")
        quiet = HEALTH_QUIET - (datetime.now() - at).total_seconds()
        if quiet > 0:
            time.sleep(quiet)
    with transcript.step(f"a pod holding {npu} (a claim selecting index {gone})"):
        selector = f'device.attributes["{DRA_DRIVER_NAME}"].index == {gone}'
        objects = [
            claim_template("holds-npu", 1, selector),
            sleeping_pod("holds-npu", claim_template="holds-npu"),
        ]
        holder, _ = run_pod(e2e, objects)
        (holder_claim,) = pod_claim_names(e2e, holder)
        assert allocated_npus(claim(e2e, holder_claim)) == [npu]
        health = kit.wait_result(
            lambda: pod_device_health(e2e, holder, npu, "Healthy"),
            f"{holder}'s status to show {npu} Healthy",
        )
        transcript.say(f"  {holder}: allocatedResourcesStatus {json.dumps(health)}")
    with transcript.step(f"unplug {npu}: the slice taints it (or drops it)"):
        started = time.monotonic()
        e2e.npus.unplug(gone)
        wait_for(lambda: unhealthy(slice_devices(e2e).get(npu)), f"{npu} tainted in the slice")
        transcript.figure("dra: unplug -> taint in the API", kit.since(started))
        device = slice_devices(e2e).get(npu)
        transcript.say(f"  {npu}: {json.dumps(device.get('taints') if device else 'left out')}")
    with transcript.step(f"the pod holding {npu} shows it Unhealthy in its status"):
        health = kit.wait_result(
            lambda: pod_device_health(e2e, holder, npu, "Unhealthy"),
            f"{holder}'s status to show {npu} Unhealthy",
        )
        transcript.figure("dra: unplug -> pod status Unhealthy", kit.since(started))
        transcript.say(f"  {holder}: allocatedResourcesStatus {json.dumps(health)}")
    with transcript.step(f"the pod holding {npu} ends: its claim is unprepared"):
        claim_uid = claim(e2e, holder_claim)["metadata"]["uid"]
        delete_all(e2e)
        line = agent_line(e2e, f"unprepared claim {RESTRICTED_NS}/{holder_claim} ({claim_uid})")
        transcript.say(f"  agent: {line}")
    with transcript.step(f"a claim for {NPU_COUNT - 1} NPUs avoids {npu}"):
        objects = [
            claim_template("all-healthy", NPU_COUNT - 1),
            sleeping_pod("all-healthy", claim_template="all-healthy"),
        ]
        name, _ = run_pod(e2e, objects)
        (claim_name,) = pod_claim_names(e2e, name)
        npu_ids = allocated_npus(claim(e2e, claim_name))
        transcript.say(f"  {claim_name}: allocated {','.join(npu_ids)}")
        assert npu_ids == sorted(f"stc{i}" for i in range(NPU_COUNT) if i != gone), npu_ids
        check_container_view(e2e, name, "main", npu_ids)
        mean, calls = prepare_latency(e2e)
        transcript.figure(
            "dra: NodePrepareResources as the kubelet sees it (mean)",
            mean * 1000,
            unit="ms",
            note=f"kubelet metric dra_grpc_operations_duration_seconds, {calls} calls",
        )
    delete_all(e2e)
    with transcript.step(f"replug {npu}: untainted"):
        started = time.monotonic()
        e2e.npus.replug(gone)
        wait_for(
            lambda: npu in slice_devices(e2e) and not unhealthy(slice_devices(e2e)[npu]),
            f"{npu} untainted",
        )
        transcript.figure("dra: replug -> taint gone", kit.since(started))
        assert attribute_values(slice_devices(e2e)[npu]) == expected_attributes(gone)


def pod_identity(e2e: E2E, name: str) -> tuple[str, int, str]:
    status = pod(e2e, name)
    container = status["status"]["containerStatuses"][0]
    return status["metadata"]["uid"], container["restartCount"], container["containerID"]


def test_dra_kubelet_and_agent_restarts_lose_no_claim(e2e: E2E) -> None:
    with transcript.step("a pod with a prepared claim"):
        objects = [claim_template("one-npu", 1), sleeping_pod("before", claim_template="one-npu")]
        first, _ = run_pod(e2e, objects)
        (first_claim,) = pod_claim_names(e2e, first)
        first_npus = allocated_npus(claim(e2e, first_claim))
        before = pod_identity(e2e, first)
    with transcript.step("kubelet restart: the DRA plugin registers again"):
        e2e.cluster.stop_kubelet()
        pid = e2e.cluster.start_kubelet()
        registered = kit.wait_result(
            lambda: kubelet_dra_registration(pid), "the kubelet's registration"
        )
        transcript.say(f"  kubelet: {registered.text[:300]}")
        e2e.cluster.wait_node_ready()
        kit.wait_result(
            lambda: every_npu_in_the_slice(e2e), "the node's slice after the kubelet restart"
        )
        assert pod_identity(e2e, first) == before, "the pod changed across the restart"
        wait_exec(e2e, first, "main")
        check_container_view(e2e, first, "main", first_npus)
    with transcript.step("a new claim is prepared after the kubelet restart"):
        second, _ = run_pod(e2e, [sleeping_pod("after-kubelet", claim_template="one-npu")])
        (second_claim,) = pod_claim_names(e2e, second)
        second_npus = allocated_npus(claim(e2e, second_claim))
        check_container_view(e2e, second, "main", second_npus)
        check_prepared(e2e, second_claim, second_npus)
    with transcript.step("agent restart (its pod deleted): the checkpoint is kept"):
        old_agents = {p["metadata"]["name"] for p in agent_pods(e2e)}
        e2e.cluster.kubectl(*ns_args(), "delete", "pod", *old_agents, "--wait=true", timeout=180)
        wait_for(
            lambda: {p["metadata"]["name"] for p in agent_pods(e2e)} - old_agents != set(),
            "a new agent pod",
        )
        e2e.cluster.kubectl(
            *ns_args(), "rollout", "status", f"ds/{RELEASE}", "--timeout=300s", timeout=320
        )
        checkpoint = agent_line(e2e, "DRA checkpoint:")
        transcript.say(f"  agent: {checkpoint.strip()}")
        assert "DRA checkpoint: 2 prepared claims" in checkpoint, checkpoint
        assert pod_identity(e2e, first) == before
    with transcript.step("deleting the first pod unprepares its claim"):
        claim_uid = claim(e2e, first_claim)["metadata"]["uid"]
        delete_pods(e2e, first)
        needle = f"unprepared claim {RESTRICTED_NS}/{first_claim} ({claim_uid})"
        line = agent_line(e2e, needle)
        transcript.say(f"  agent: {line.strip()}")
        failed = [line for line in agent_logs(e2e).splitlines() if "NodeUnprepareResources" in line]
        assert not failed, failed
    with transcript.step("a new pod after the agent restart"):
        third, took = run_pod(e2e, [sleeping_pod("after-agent", claim_template="one-npu")])
        transcript.figure("dra: pod start after an agent restart", took)
        (third_claim,) = pod_claim_names(e2e, third)
        third_npus = allocated_npus(claim(e2e, third_claim))
        check_container_view(e2e, third, "main", third_npus)
        check_prepared(e2e, third_claim, third_npus)
    delete_all(e2e)


def test_dra_uninstall_removes_slice_socket_and_spec(e2e: E2E) -> None:
    started = time.monotonic()
    started_wall = datetime.now()
    with transcript.step(f"{HELM} uninstall {RELEASE}"):
        e2e.cluster.helm(HELM, "uninstall", RELEASE, *ns_args(), "--wait", "--timeout=300s")
        wait_for(lambda: not agent_pods(e2e), "the agent pods to be deleted", timeout=180)
    with transcript.step("no DRA socket in plugins_registry, no CDI spec"):
        wait_for(
            lambda: (
                not [
                    p for p in e2e.cluster.plugin_registry_dir.iterdir() if SOCKET_PREFIX in p.name
                ]
            ),
            f"no {SOCKET_PREFIX}* socket in {e2e.cluster.plugin_registry_dir}",
            timeout=60,
        )
        wait_for(lambda: not SPEC_FILE.exists(), f"{SPEC_FILE} removed", timeout=60)
        claim_specs = sorted(p.name for p in CDI_SPEC_DIR.glob(claim_spec_file_name(RESOURCE, "*")))
        assert claim_specs == [], f"claims' own CDI specs left: {claim_specs}"
    with transcript.step("the agent's stop left the slice; the kubelet deletes it"):
        # The agent leaves the slice on stop (a restart must not empty the
        # node); the kubelet wipes a driver's slices 30 s after its plugin
        # disconnected for good.
        assert our_slices(e2e), "the slice went with the agent's stop"
        disconnected = kit.wait_result(
            lambda: kit.first_line(
                kit.kubelet_log(e2e.cluster.kubelet_pid()),
                '"Connection changed"',
                f'driverName="{DRA_DRIVER_NAME}"',
                "connected=false",
                after=started_wall,
            ),
            "the kubelet's log line of the plugin's disconnection",
        )
        wait_for(lambda: not our_slices(e2e), "no ResourceSlice of our driver", timeout=180)
        gone_at = datetime.now()
        transcript.figure("dra: uninstall -> ResourceSlice gone", kit.since(started))
        transcript.figure(
            "dra: kubelet's plugin disconnected -> ResourceSlice gone",
            (gone_at - disconnected.at).total_seconds(),
            note="kubelet log; polled every 0.2 s",
        )
    with transcript.step("nothing of the release is left"):
        left = e2e.cluster.kubectl(
            "get", "deviceclasses,validatingadmissionpolicies", "-o", "name"
        ).stdout
        assert DRA_DRIVER_NAME not in left, left
        assert RELEASE not in left, left
