"""NOTES.txt tells what was deployed and how to check it, for the values given.

Rendered by `helm install --dry-run=client`, which only helm 4 can do without
a cluster; the template engine that renders NOTES is the same in helm 3.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from tests.chart.chartkit import CHART, run_helm


def _notes(sets: Sequence[str] = ()) -> str:
    args = ["install", "stc-npu", str(CHART), "-n", "kube-system", "--dry-run=client"]
    for item in sets:
        args += ["--set", item]
    result = run_helm("helm4", args)
    assert result.returncode == 0, result.stderr
    assert "NOTES:" in result.stdout
    return result.stdout.split("NOTES:", 1)[1]


def test_notes_say_what_and_how_to_check() -> None:
    notes = _notes()
    assert "DaemonSet       kube-system/stc-npu" in notes
    assert "kubectl -n kube-system rollout status daemonset/stc-npu" in notes
    assert (
        "kubectl get nodes -o custom-columns="
        "'NODE:.metadata.name,NPU:.status.allocatable.streamcomputing\\.com/npu'"
    ) in notes
    assert "helm test stc-npu -n kube-system" in notes
    assert "streamcomputing.com/npu: 1" in notes  # the example pod
    assert "hpe.mode=mapped" in notes
    # diagnose through kubectl exec: it sees the agent's settings (env, not args).
    assert "kubectl -n kube-system exec ds/stc-npu -- stc-npu-agent diagnose" in notes


def test_notes_follow_the_resource_name_and_namespace() -> None:
    notes = _notes(
        ["resourceName=example.com/stcp920", "namespaceOverride=npu", "hpe.mode=unmapped"]
    )
    assert "allocatable.example\\.com/stcp920'" in notes
    assert "example.com/stcp920: 1" in notes
    assert "streamcomputing.com/npu" not in notes.replace("streamcomputing.com/npu.present", "")
    assert "kubectl -n npu rollout status" in notes
    assert "kubectl -n npu exec ds/stc-npu -- stc-npu-agent diagnose" in notes
    assert "hpe.mode=unmapped" in notes


def test_notes_without_the_test_pod() -> None:
    notes = _notes(["test.enabled=false"])
    assert "helm test stc-npu" not in notes
    assert "test.enabled=false" in notes


def test_notes_say_what_to_do_without_agent_pods() -> None:
    notes = _notes()
    assert "rollout status succeeds on 0 of 0" in notes
    assert "feature.node.kubernetes.io/pci-1200_23e2.present=true or pci-23e2.present=true" in notes
    assert "kubectl get node <node> --show-labels" in notes
    assert "kubectl label node <node> streamcomputing.com/npu.present=true" in notes
    assert "helm test stc-npu -n kube-system --logs" in notes
    assert "fails at once" in notes


def test_notes_show_the_service_account_in_use() -> None:
    assert "ServiceAccount  kube-system/stc-npu  (no token" in _notes()
    notes = _notes(["serviceAccount.create=false", "serviceAccount.name=npu-agent"])
    assert "ServiceAccount  kube-system/npu-agent  (not created by the chart" in notes


def test_notes_without_logs_when_the_pods_are_elsewhere() -> None:
    # helm test --logs reads the pods in the release namespace only.
    notes = _notes(["namespaceOverride=npu"])
    assert "--logs" not in notes.split("helm test stc-npu -n kube-system", 1)[1].split("\n", 1)[0]
    assert "kubectl -n npu logs stc-npu-test-agents" in notes


def test_least_privilege_defaults_give_no_warning() -> None:
    assert "WARNING" not in _notes()
    # Overrides that keep the protection do not warn either.
    assert "WARNING" not in _notes(["podSecurityContext.supplementalGroups[0]=990"])


@pytest.mark.parametrize(
    ("sets", "warning"),
    [
        (["securityContext.seLinuxOptions.type=spc_t"], "seLinuxOptions.type is spc_t"),
        (["podSecurityContext.seLinuxOptions.type=spc_t"], "podSecurityContext.seLinuxOptions"),
        (["securityContext.privileged=true"], "securityContext.privileged is true"),
        (
            ["securityContext.allowPrivilegeEscalation=null"],
            "allowPrivilegeEscalation is not false",
        ),
        (["securityContext.readOnlyRootFilesystem=false"], "readOnlyRootFilesystem is not true"),
        (["securityContext.capabilities.drop=null"], "does not drop ALL"),
        (["securityContext.capabilities.add[0]=SYS_ADMIN"], "adds SYS_ADMIN"),
        (
            ["securityContext.seccompProfile.type=Unconfined"],
            "seccomp profile is Unconfined",
        ),
        (
            ["securityContext.seccompProfile=null", "podSecurityContext.seccompProfile=null"],
            "seccomp profile is unset",
        ),
    ],
)
def test_notes_warn_when_an_override_weakens_the_defaults(sets: list[str], warning: str) -> None:
    notes = _notes(sets)
    assert "WARNING: the agent runs with less protection" in notes
    assert warning in notes


def test_notes_name_the_shared_resource_and_say_there_is_no_isolation() -> None:
    notes = _notes(["sharing.replicas=4", "sharing.renameShared=true"])
    assert "as the extended resource streamcomputing.com/npu.shared." in notes
    assert "allocatable.streamcomputing\\.com/npu\\.shared'" in notes
    assert "streamcomputing.com/npu.shared: 1" in notes
    assert "NO memory or fault isolation" in notes
    # Shared but not renamed: the resource keeps its name.
    notes = _notes(["sharing.replicas=4"])
    assert "streamcomputing.com/npu: 1" in notes
    assert "NO memory or fault isolation" in notes
    assert "NO memory or fault isolation" not in _notes()
