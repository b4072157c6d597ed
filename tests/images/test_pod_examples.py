"""The example Pods next to the workload images: valid Kubernetes objects,
admitted under the "restricted" Pod Security Standard, asking for NPUs.

The Pod Security checks are written out here from the standard
(https://kubernetes.io/docs/concepts/security/pod-security-standards/), for
the fields a Pod can set, and each is shown to fire on a bad pod.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dockerfile
import kubernetes_validate
import pytest
import yaml

IMAGES = Path(__file__).resolve().parents[2] / "images"
RESOURCE = "streamcomputing.com/npu"
EXAMPLES = sorted(IMAGES.glob("pod-*/example-pod*.yaml"))
# The oldest and newest schemas of the kubernetes-validate in .venv. The
# examples use the seccompProfile field (Kubernetes 1.19+) and target the
# "restricted" standard, which Pod Security admission enforces from 1.23 on;
# the chart itself goes back to 1.18 (tests/chart/test_chart_kubernetes.py).
K8S_VERSIONS = ["1.25", kubernetes_validate.utils.latest_version()]

Pod = dict[str, Any]

# Restricted: only these volume types.
ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
# Baseline: safe sysctls (the set as of Kubernetes 1.29).
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(key) or []


def check_restricted(pod: Pod) -> list[str]:
    """Every way ``pod`` breaks the restricted standard (which includes
    baseline), as readable messages; empty when it is admitted."""
    spec = pod["spec"]
    pod_sc = spec.get("securityContext") or {}
    problems: list[str] = []

    # Baseline: host namespaces, host paths, host ports.
    problems += [
        f"spec.{key} is true" for key in ("hostNetwork", "hostPID", "hostIPC") if spec.get(key)
    ]
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        problems += [f"volume {volume['name']}: type {kind}" for kind in kinds - ALLOWED_VOLUMES]
    problems += [
        f"sysctl {s['name']} is not safe"
        for s in pod_sc.get("sysctls") or []
        if s["name"] not in SAFE_SYSCTLS
    ]
    problems += _seccomp(pod_sc, "pod", allow_unset=True)
    problems += _selinux_and_apparmor(pod_sc, "pod")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        problems.append("pod: windowsOptions.hostProcess")
    if pod_sc.get("runAsUser") == 0:
        problems.append("pod: runAsUser 0")

    for container in containers(spec):
        problems += [f"{container['name']}: {p}" for p in _container(container, pod_sc)]
    for key, value in (pod.get("metadata", {}).get("annotations") or {}).items():
        if (
            key.startswith("container.apparmor.security.beta.kubernetes.io/")
            and value not in {"runtime/default"}
            and not value.startswith("localhost/")
        ):
            problems.append(f"annotation {key}: {value}")
    return problems


def _container(container: dict[str, Any], pod_sc: dict[str, Any]) -> list[str]:
    sc = container.get("securityContext") or {}
    problems: list[str] = []
    if sc.get("privileged"):
        problems.append("privileged")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    capabilities = sc.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        problems.append("capabilities do not drop ALL")
    added = set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}
    problems += [f"adds capability {c}" for c in sorted(added)]
    if sc.get("procMount", "Default") != "Default":
        problems.append(f"procMount {sc['procMount']}")
    for port in container.get("ports") or []:
        if port.get("hostPort"):
            problems.append(f"hostPort {port['hostPort']}")
    # A container's own setting wins over the pod's.
    run_as_non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    if run_as_non_root is not True:
        problems.append("runAsNonRoot is not true")
    if sc.get("runAsUser") == 0:
        problems.append("runAsUser 0")
    if "seccompProfile" in sc:
        problems += _seccomp(sc, "container", allow_unset=False)
    else:
        problems += _seccomp(pod_sc, "pod (inherited)", allow_unset=False)
    problems += _selinux_and_apparmor(sc, "container")
    if (sc.get("windowsOptions") or {}).get("hostProcess"):
        problems.append("windowsOptions.hostProcess")
    return problems


def _seccomp(sc: dict[str, Any], where: str, *, allow_unset: bool) -> list[str]:
    kind = (sc.get("seccompProfile") or {}).get("type")
    if kind is None and allow_unset:
        return []
    if kind not in {"RuntimeDefault", "Localhost"}:
        return [f"{where}: seccompProfile.type {kind or 'unset'}"]
    return []


def _selinux_and_apparmor(sc: dict[str, Any], where: str) -> list[str]:
    problems = []
    selinux = sc.get("seLinuxOptions") or {}
    if selinux.get("type", "") not in SELINUX_TYPES:
        problems.append(f"{where}: seLinuxOptions.type {selinux['type']}")
    problems += [f"{where}: seLinuxOptions.{k} is set" for k in ("user", "role") if selinux.get(k)]
    if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        problems.append(f"{where}: appArmorProfile Unconfined")
    return problems


def load(path: Path) -> Pod:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(documents) == 1, "one Pod per example file"
    pod: Pod = documents[0]
    return pod


def npus(pod: Pod) -> int:
    return sum(int(c["resources"]["limits"].get(RESOURCE, 0)) for c in containers(pod["spec"]))


# --------------------------------------------------------------------------
# The examples


def test_every_image_has_a_one_and_a_two_npu_example() -> None:
    found = {p.relative_to(IMAGES).as_posix() for p in EXAMPLES}
    for image in ("pod-mapped", "pod-unmapped"):
        assert {f"{image}/example-pod.yaml", f"{image}/example-pod-2npu.yaml"} <= found


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_is_a_valid_pod(path: Path, version: str) -> None:
    pod = load(path)
    assert pod["kind"] == "Pod"
    kubernetes_validate.validate(pod, version, strict=True)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_meets_the_restricted_standard(path: Path) -> None:
    assert check_restricted(load(path)) == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_requests_npus_and_mounts_no_hpe(path: Path) -> None:
    pod = load(path)
    expected = 2 if path.stem.endswith("-2npu") else 1
    assert npus(pod) == expected
    for container in containers(pod["spec"]):
        # Extended resources: a request, if given, must equal the limit.
        requests = container["resources"].get("requests", {})
        assert (
            requests.get(RESOURCE, container["resources"]["limits"][RESOURCE])
            == (container["resources"]["limits"][RESOURCE])
        )
        # The agent mounts HPE in mapped mode; a pod must not bring its own.
        assert "volumeMounts" not in container
    assert "volumes" not in pod["spec"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_runs_as_the_image_user(path: Path) -> None:
    commands = list(dockerfile.parse_file(str(path.parent / "Dockerfile")))
    user = [c.value[0] for c in commands if c.cmd == "USER"][-1]
    uid, _, gid = user.partition(":")
    pod_sc = load(path)["spec"]["securityContext"]
    assert str(pod_sc["runAsUser"]) == uid
    assert str(pod_sc.get("runAsGroup", gid)) == gid
    assert int(uid) != 0


# --------------------------------------------------------------------------
# The checker can fail

GOOD = load(IMAGES / "pod-mapped" / "example-pod.yaml")


def _main(pod: Pod) -> dict[str, Any]:
    main: dict[str, Any] = pod["spec"]["containers"][0]
    return main


def _host_path(pod: Pod) -> None:
    pod["spec"]["volumes"] = [{"name": "hpe", "hostPath": {"path": "/usr/local/hpe"}}]
    _main(pod)["volumeMounts"] = [{"name": "hpe", "mountPath": "/usr/local/hpe"}]


def _init_container_privileged(pod: Pod) -> None:
    init = copy.deepcopy(_main(pod))
    init.update(name="init", securityContext={"privileged": True})
    pod["spec"]["initContainers"] = [init]


MUTATIONS: dict[str, tuple[str, Callable[[Pod], None]]] = {
    "hostPath volume": ("hostPath", _host_path),
    "hostNetwork": ("hostNetwork", lambda p: p["spec"].update(hostNetwork=True)),
    "hostPID": ("hostPID", lambda p: p["spec"].update(hostPID=True)),
    "hostIPC": ("hostIPC", lambda p: p["spec"].update(hostIPC=True)),
    "hostPort": (
        "hostPort",
        lambda p: _main(p).update(ports=[{"containerPort": 80, "hostPort": 80}]),
    ),
    "privileged": ("privileged", lambda p: _main(p)["securityContext"].update(privileged=True)),
    "privilege escalation allowed": (
        "allowPrivilegeEscalation",
        lambda p: _main(p)["securityContext"].pop("allowPrivilegeEscalation"),
    ),
    "ALL not dropped": (
        "drop ALL",
        lambda p: _main(p)["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
    ),
    "SYS_ADMIN added": (
        "SYS_ADMIN",
        lambda p: _main(p)["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
    ),
    "runAsNonRoot missing": (
        "runAsNonRoot",
        lambda p: p["spec"]["securityContext"].pop("runAsNonRoot"),
    ),
    "container overrides runAsNonRoot": (
        "runAsNonRoot",
        lambda p: _main(p)["securityContext"].update(runAsNonRoot=False),
    ),
    "runAsUser 0": ("runAsUser 0", lambda p: _main(p)["securityContext"].update(runAsUser=0)),
    "no seccomp": ("seccompProfile", lambda p: p["spec"]["securityContext"].pop("seccompProfile")),
    "seccomp Unconfined": (
        "seccompProfile",
        lambda p: _main(p)["securityContext"].update(seccompProfile={"type": "Unconfined"}),
    ),
    "emptyDir is fine but gitRepo is not": (
        "gitRepo",
        lambda p: p["spec"].update(
            volumes=[{"name": "a", "emptyDir": {}}, {"name": "b", "gitRepo": {"repository": "x"}}]
        ),
    ),
    "unsafe sysctl": (
        "sysctl",
        lambda p: p["spec"]["securityContext"].update(
            sysctls=[{"name": "kernel.msgmax", "value": "1"}]
        ),
    ),
    "privileged init container": ("init: privileged", _init_container_privileged),
    "procMount Unmasked": (
        "procMount",
        lambda p: _main(p)["securityContext"].update(procMount="Unmasked"),
    ),
}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_checker_rejects(case: str) -> None:
    expected, mutate = MUTATIONS[case]
    pod = copy.deepcopy(GOOD)
    assert check_restricted(pod) == []
    mutate(pod)
    problems = check_restricted(pod)
    assert any(re.search(re.escape(expected), p) for p in problems), problems


def test_checker_accepts_net_bind_service_and_localhost_seccomp() -> None:
    pod = copy.deepcopy(GOOD)
    _main(pod)["securityContext"]["capabilities"]["add"] = ["NET_BIND_SERVICE"]
    pod["spec"]["securityContext"]["seccompProfile"] = {
        "type": "Localhost",
        "localhostProfile": "profiles/npu.json",
    }
    assert check_restricted(pod) == []


def test_a_schema_error_is_caught() -> None:
    pod = copy.deepcopy(GOOD)
    _main(pod)["resources"]["limitz"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSIONS[0], strict=True)


# --------------------------------------------------------------------------
# Names and signals


def _build_tag(dockerfile_path: Path) -> str:
    """The image name the Dockerfile's build instructions give (-t NAME)."""
    tags = re.findall(r"-t (\S+)", dockerfile_path.read_text(encoding="utf-8"))
    assert len(set(tags)) == 1, tags
    return str(tags[0])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_uses_the_image_its_dockerfile_builds(path: Path) -> None:
    images = {c["image"] for c in containers(load(path)["spec"])}
    assert images == {_build_tag(path.parent / "Dockerfile")}


def test_the_example_image_names() -> None:
    # The names others build and load (e2e): one scheme, registry/stc-npu/pod-<mode>.
    assert _build_tag(IMAGES / "pod-mapped" / "Dockerfile") == (
        "registry.example.com/stc-npu/pod-mapped:1.0.0"
    )
    assert _build_tag(IMAGES / "pod-unmapped" / "Dockerfile") == (
        "registry.example.com/stc-npu/pod-unmapped:1.7.0"
    )


def _commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in EXAMPLES:
        for container in containers(load(path)["spec"]):
            found.append((f"{path.parent.name}/{path.name}", list(container["command"])))
    for name in ("pod-mapped", "pod-unmapped"):
        commands = list(dockerfile.parse_file(str(IMAGES / name / "Dockerfile")))
        (cmd,) = [c for c in commands if c.cmd == "CMD"]
        assert cmd.json, "exec form"
        found.append((f"{name}/Dockerfile CMD", list(cmd.value)))
    return found


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


NEEDS_UNSHARE = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs unshare and root, to run the command as PID 1 of its own PID namespace",
)


@NEEDS_UNSHARE
@pytest.mark.parametrize(("where", "command"), _commands(), ids=[w for w, _ in _commands()])
def test_pod_command_ends_on_sigterm_as_pid_1(where: str, command: list[str]) -> None:
    # In a container the command is PID 1, and the kernel drops signals that
    # PID 1 has no handler for: `sleep infinity` would ignore the kubelet's
    # SIGTERM and every delete would wait the whole grace period.
    process = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        init = None
        while time.monotonic() < deadline:
            children = _children(process.pid)
            if children:
                init = children[0]
                # Ready once the sleep runs: the shell set its trap before it.
                if _comm(init) == "sleep" or any(_comm(c) == "sleep" for c in _children(init)):
                    break
            time.sleep(0.05)
        assert init is not None, f"{where}: the command did not start"
        os.kill(init, signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{where}: {command} ignored SIGTERM as PID 1")
        assert code == 0, f"{where}: exit {code}"
    finally:
        process.kill()
        process.wait(timeout=30)
