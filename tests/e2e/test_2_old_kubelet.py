"""The agent with a real kubelet v1.23.1 (the 1.18-1.25 device manager:
Register answered before the dial, the DEPRECATION file), standalone: static
pods, no API server, on the same containerd.

Its device-plugin dir is fixed at /var/lib/kubelet/device-plugins; it runs in
a mount namespace of its own where a private dir is bind-mounted there, and
the agent runs as a host process pointed at that private dir. The v1.36
kubelet is stopped first: two kubelets on one containerd remove each other's
pods.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from ci.e2e import cluster, transcript
from ci.e2e.cluster import (
    BASE,
    CGROUP_NAME,
    CONTAINERD_SOCK,
    KUBELET_PLUGIN_DIR,
    STATIC_POD_NAMESPACE,
    record,
    start_process,
    stop_named,
    wait_for,
    write,
)

from tests.e2e import kit
from tests.e2e.conftest import E2E, NPU_COUNT, RESOURCE

pytestmark = pytest.mark.timeout(900)

OLD_BASE = BASE / "kubelet-1.23"
OLD_PLUGIN_DIR = OLD_BASE / "device-plugins"
MANIFESTS = OLD_BASE / "manifests"
STATIC_NAMESPACE = STATIC_POD_NAMESPACE
KUBELET_RESTARTS = 2
CHECKPOINT = "kubelet_internal_checkpoint"
AGENT_PROBE = "127.0.0.1:18081"
# The kubelet logs these (v1.23.1, --v=2).
SERVER_LINE = "Serving device plugin registration server on socket"
REGISTER_LINE = "Got registration request from device plugin with resource"
# The container log dirs the 1.23 kubelet writes (fixed paths, shared).
POD_LOGS = Path("/var/log/pods")
CONTAINER_LOGS = Path("/var/log/containers")


def old_kubelet_config() -> str:
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "staticPodPath": str(MANIFESTS),
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{CGROUP_NAME}",
        "failSwapOn": False,
        "address": "127.0.0.1",
        "healthzBindAddress": "127.0.0.1",
        "readOnlyPort": 0,
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "resolvConf": str(BASE / "resolv.conf"),
    }
    return json.dumps(config, indent=2)


def start_old_kubelet() -> int:
    """The v1.23 kubelet in the node's netns and a mount namespace of its
    own, where OLD_PLUGIN_DIR is its fixed device-plugin dir."""
    mount_and_exec = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'  # the pid stays the kubelet's
    return start_process(
        "kubelet-1.23",
        [
            "unshare", "-m", "--propagation", "private",
            "sh", "-c", mount_and_exec, "sh", str(OLD_PLUGIN_DIR), str(KUBELET_PLUGIN_DIR),
            cluster.tool("kubelet-1.23"),
            "--container-runtime=remote",
            f"--container-runtime-endpoint=unix://{CONTAINERD_SOCK}",
            f"--config={OLD_BASE / 'kubelet.yaml'}",
            f"--root-dir={OLD_BASE / 'root'}",
            f"--cert-dir={OLD_BASE / 'pki'}",
            "--hostname-override=stc-e2e-old-node",
            "--v=2",
        ],
        env=cluster.tool_env(),
    )  # fmt: skip


def static_pod(name: str, npus: int, marker: str) -> dict[str, object]:
    """A static pod asking for ``npus`` NPUs; ``marker`` makes its process
    easy to find on the host."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": STATIC_NAMESPACE},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "docker.io/library/busybox:1.37.0",
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c", f"exec sleep {marker}"],
                    "resources": {"limits": {RESOURCE: npus}},
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                        "runAsNonRoot": True,
                        "runAsUser": 65534,
                    },
                }
            ]
        },
    }


def registered_devices() -> list[str]:
    """The device ids the kubelet checkpointed for our resource: v1.23 writes
    its HEALTHY devices there on every update from the plugin."""
    data = json.loads((OLD_PLUGIN_DIR / CHECKPOINT).read_text())["Data"]
    return sorted(data.get("RegisteredDevices", {}).get(RESOURCE, []))


def put_static_pod(name: str, npus: int, marker: str) -> None:
    write(MANIFESTS / f"{name}.json", json.dumps(static_pod(name, npus, marker)))


def remove_static_pod(name: str) -> None:
    (MANIFESTS / f"{name}.json").unlink(missing_ok=True)


def pod_process(marker: str) -> int:
    """The host pid of a static pod's `sleep MARKER` (LookupError until it runs)."""
    pids = kit.pod_processes(f"sleep {marker}")
    if len(pids) != 1:
        raise LookupError(f"{len(pids)} processes run `sleep {marker}`")
    return pids[0]


def container_view(pid: int) -> tuple[list[str], set[str], set[int]]:
    """What the container of host process ``pid`` got: its STC_NPU_DEVICES,
    the stc* nodes in its /dev, and the NPU minors its devices cgroup allows."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    devices = next(
        (e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"STC_NPU_DEVICES=")), ""
    )
    nodes = {n for n in os.listdir(f"/proc/{pid}/root/dev") if n.startswith("stc")}
    allowed = kit.allowed_npu_minors((kit.cgroup_of(pid, "devices") / "devices.list").read_text())
    return (devices.split(",") if devices else []), nodes, allowed


def check_static_pod(e2e: E2E, marker: str, npus: int) -> list[str]:
    pid = kit.wait_result(partial(pod_process, marker), f"the static pod `sleep {marker}`")
    npu_ids, nodes, allowed = container_view(pid)
    assert len(npu_ids) == npus, f"STC_NPU_DEVICES={npu_ids}, expected {npus} NPU(s)"
    assert nodes == kit.npu_node_names(npu_ids), f"/dev has {sorted(nodes)}"
    expected = {e2e.npus.sim.devnum(n)[1] for n in kit.npu_node_names(npu_ids)}
    assert allowed == expected, (
        f"devices cgroup allows {sorted(allowed)}, expected {sorted(expected)}"
    )
    return npu_ids


@dataclass
class OldNode:
    kubelet_pid: int


def remove_our_pod_logs() -> None:
    for path in POD_LOGS.glob(f"{STATIC_NAMESPACE}_*"):
        shutil.rmtree(path, ignore_errors=True)
    for path in CONTAINER_LOGS.glob(f"*_{STATIC_NAMESPACE}_*"):
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def old_node(e2e: E2E) -> Iterator[OldNode]:
    with transcript.step("stop the v1.36 kubelet and remove its pods"):
        stop_named("kubelet")
        cluster._clean_containerd()
    if not POD_LOGS.exists():
        record("dirs", str(POD_LOGS))
    shutil.rmtree(OLD_BASE, ignore_errors=True)
    OLD_PLUGIN_DIR.mkdir(parents=True)
    MANIFESTS.mkdir(parents=True)
    write(OLD_BASE / "kubelet.yaml", old_kubelet_config())
    try:
        with transcript.step("kubelet v1.23.1 standalone, agent as a host process"):
            started = time.monotonic()
            pid = start_old_kubelet()
            wait_for((OLD_PLUGIN_DIR / "kubelet.sock").exists, "the v1.23 kubelet's kubelet.sock")
            transcript.figure("v1.23 kubelet start -> kubelet.sock", kit.since(started))
            start_process(
                "agent-host",
                [
                    str(Path(sys.executable).parent / "stc-npu-agent"),
                    f"--kubelet-dir={OLD_PLUGIN_DIR}",
                    "--dev-dir=/dev",
                    f"--sys-dir={e2e.npus.sys_dir}",
                    f"--probe-address={AGENT_PROBE}",
                ],
                netns=False,
            )
        yield OldNode(pid)
    finally:
        with transcript.step("stop the v1.23 kubelet and the agent; remove their pods"):
            stop_named("agent-host")
            stop_named("kubelet-1.23")
            cluster._clean_containerd()
            remove_our_pod_logs()


def test_agent_registers_with_the_v123_kubelet(e2e: E2E, old_node: OldNode) -> None:
    with transcript.step("registration with v1.23 (kubelet log, checkpoint, DEPRECATION)"):
        delay, _, _ = kit.wait_result(
            partial(
                kit.registration_delay,
                old_node.kubelet_pid, SERVER_LINE, REGISTER_LINE, RESOURCE, "kubelet-1.23",
            ),
            "the v1.23 kubelet's log to show our Register",
        )  # fmt: skip
        transcript.figure("v1.23 start: registration server -> our Register", delay)
        wait_for(
            lambda: len(registered_devices()) == NPU_COUNT,
            f"{NPU_COUNT} devices in the kubelet's checkpoint",
        )
        assert (OLD_PLUGIN_DIR / "DEPRECATION").exists()
        assert registered_devices() == [f"stc{i}" for i in range(NPU_COUNT)]


def test_static_pods_with_one_and_two_npus_get_exactly_their_nodes(
    e2e: E2E, old_node: OldNode
) -> None:
    for name, npus, marker in (("one-npu", 1, "3601"), ("two-npus", 2, "3602")):
        with transcript.step(f"static pod {name} ({npus} NPU) on v1.23"):
            started = time.monotonic()
            put_static_pod(name, npus, marker)
            npu_ids = check_static_pod(e2e, marker, npus)
            transcript.figure(f"v1.23 static pod start ({npus} NPU)", kit.since(started))
            transcript.say(f"  {name}: STC_NPU_DEVICES={','.join(npu_ids)}")


def test_v123_kubelet_restarts_are_followed_by_reregistration(e2e: E2E, old_node: OldNode) -> None:
    running = {m: pod_process(m) for m in ("3601", "3602")}
    for restart in range(1, KUBELET_RESTARTS + 1):
        with transcript.step(f"v1.23 kubelet restart {restart}/{KUBELET_RESTARTS}"):
            stop_named("kubelet-1.23")
            old_node.kubelet_pid = start_old_kubelet()
            delay, _, _ = kit.wait_result(
                partial(
                    kit.registration_delay,
                    old_node.kubelet_pid, SERVER_LINE, REGISTER_LINE, RESOURCE, "kubelet-1.23",
                ),
                "the v1.23 kubelet's log to show our Register",
            )  # fmt: skip
            transcript.figure(
                f"v1.23 kubelet restart {restart}: registration server -> our Register",
                delay,
                note="kubelet log",
            )
            wait_for(lambda: len(registered_devices()) == NPU_COUNT, "checkpointed devices")
        assert {m: pod_process(m) for m in running} == running, "static pods were restarted"


def test_v123_unplug_and_replug(e2e: E2E, old_node: OldNode) -> None:
    in_use: set[str] = set()
    for marker in ("3601", "3602"):
        in_use |= set(container_view(pod_process(marker))[0])
    free = next(i for i in range(NPU_COUNT) if f"stc{i}" not in in_use)
    others = [f"stc{i}" for i in range(NPU_COUNT) if i != free]
    with transcript.step(f"unplug stc{free}: the kubelet's healthy devices lose it"):
        started = time.monotonic()
        e2e.npus.unplug(free)
        wait_for(lambda: registered_devices() == others, f"stc{free} gone from the checkpoint")
        transcript.figure("v1.23 unplug -> kubelet's healthy devices", kit.since(started))
    with transcript.step(f"replug stc{free}: back, and a new static pod gets it"):
        started = time.monotonic()
        e2e.npus.replug(free)
        wait_for(lambda: len(registered_devices()) == NPU_COUNT, f"stc{free} back")
        transcript.figure("v1.23 replug -> kubelet's healthy devices", kit.since(started))
        put_static_pod("after-replug", 1, "3604")
        assert check_static_pod(e2e, "3604", 1) == [f"stc{free}"]
        remove_static_pod("after-replug")
