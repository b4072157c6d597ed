"""NOTES.txt tells what was deployed and how to check it, for the values given.

Rendered by `helm install --dry-run=client`, which only helm 4 can do without
a cluster; the template engine that renders NOTES is the same in helm 3.
"""

from __future__ import annotations

from collections.abc import Sequence

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
