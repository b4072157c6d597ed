"""Mode dra's API objects: the DeviceClass, RBAC limited to what the agent
does, the policy that keeps an agent to its own node's slices, the token
mounted only in that mode; all valid on every Kubernetes with
resource.k8s.io/v1 (1.34+). And the DRA examples."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions, major_minor
from packaging.version import Version

from tests.chart.chartkit import NAMESPACE, REPO, Render, render
from tests.images.test_pod_examples import check_restricted

DRIVER = "npu.streamcomputing.com"
DRA_OLDEST = "1.34"  # resource.k8s.io/v1
DRA_KINDS = {
    "DeviceClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}
VERSIONS = sorted({major_minor(v) for v in all_versions()}, key=Version)
DRA_VERSIONS = [v for v in VERSIONS if Version(v) >= Version(DRA_OLDEST)]
EXAMPLES = sorted((REPO / "examples" / "dra").glob("*.yaml"))


def render_dra(helm: str = "helm3", sets: tuple[str, ...] = ()) -> Render:
    return render(helm, sets=["mode=dra", *sets])


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    """The one object of ``kind`` that is not the chart's test's."""
    found = [
        doc
        for doc in docs
        if doc["kind"] == kind
        and doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") != "test"
    ]
    assert len(found) == 1, f"{kind}: {len(found)}"
    return found[0]


def test_device_plugin_mode_has_no_api_objects_and_no_token() -> None:
    docs = render().docs
    assert not DRA_KINDS & {doc["kind"] for doc in docs}
    daemonset = by_kind(docs, "DaemonSet")
    assert daemonset["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert by_kind(docs, "ServiceAccount")["automountServiceAccountToken"] is False


def test_dra_mode_mounts_the_token_in_the_agent_pod_only(helm: str) -> None:
    docs = render_dra(helm).docs
    assert {doc["kind"] for doc in docs} >= DRA_KINDS
    daemonset = by_kind(docs, "DaemonSet")
    assert daemonset["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    # Other pods of the ServiceAccount (none today) get no token by default.
    assert by_kind(docs, "ServiceAccount")["automountServiceAccountToken"] is False


def test_device_class_selects_our_driver_and_serves_the_extended_resource() -> None:
    device_class = by_kind(render_dra(sets=("resourceName=example.com/npu",)).docs, "DeviceClass")
    assert device_class["metadata"]["name"] == DRIVER
    assert device_class["spec"]["selectors"] == [
        {"cel": {"expression": f'device.driver == "{DRIVER}"'}}
    ]
    assert device_class["spec"]["extendedResourceName"] == "example.com/npu"


def test_rbac_is_what_the_agent_does() -> None:
    docs = render_dra().docs
    rules = {
        (rule["apiGroups"][0], resource): sorted(rule["verbs"])
        for rule in by_kind(docs, "ClusterRole")["rules"]
        for resource in rule["resources"]
    }
    assert rules == {
        ("resource.k8s.io", "resourceslices"): sorted(
            ["get", "list", "watch", "create", "update", "delete"]
        ),
        ("resource.k8s.io", "resourceclaims"): ["get"],
        ("", "nodes"): ["get"],
    }
    binding = by_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == by_kind(docs, "ClusterRole")["metadata"]["name"]
    service_account = by_kind(docs, "ServiceAccount")["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": service_account["name"], "namespace": NAMESPACE}
    ]


def test_policy_keeps_the_agent_to_its_own_node_and_driver() -> None:
    docs = render_dra().docs
    policy = by_kind(docs, "ValidatingAdmissionPolicy")
    service_account = by_kind(docs, "ServiceAccount")["metadata"]["name"]
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    rules = spec["matchConstraints"]["resourceRules"]
    assert rules[0]["resources"] == ["resourceslices"]
    assert set(rules[0]["operations"]) == {"CREATE", "UPDATE", "DELETE"}
    (condition,) = spec["matchConditions"]
    assert f"system:serviceaccount:{NAMESPACE}:{service_account}" in condition["expression"]
    variables = {v["name"]: v["expression"] for v in spec["variables"]}
    node_claim = "request.userInfo.extra['authentication.kubernetes.io/node-name']"
    assert node_claim in variables["nodeName"]
    validations = " ".join(v["expression"] for v in spec["validations"])
    assert "spec.nodeName == variables.nodeName" in validations
    assert "oldObject.spec.nodeName == variables.nodeName" in validations
    assert f'spec.driver == "{DRIVER}"' in validations
    binding = by_kind(docs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {
        "policyName": policy["metadata"]["name"],
        "validationActions": ["Deny"],
    }


@pytest.mark.parametrize("version", DRA_VERSIONS)
def test_dra_objects_validate_strictly_where_the_api_has_them(version: str) -> None:
    for doc in render_dra().docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_before_1_34_there_is_no_resource_k8s_io_v1() -> None:
    # Why DRA mode needs 1.34: the same DeviceClass is unknown to 1.33.
    device_class = by_kind(render_dra().docs, "DeviceClass")
    with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
        kubernetes_validate.validate(device_class, "1.33", strict=True)


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


@pytest.mark.parametrize("version", DRA_VERSIONS)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_dra_example_validates_and_pods_are_restricted(path: Path, version: str) -> None:
    for doc in load_all(path):
        kubernetes_validate.validate(doc, version, strict=True)
        if doc["kind"] == "Pod":
            assert check_restricted(doc) == []


def test_examples_two_npus_on_one_numa_node_and_a_shared_claim() -> None:
    assert {p.name for p in EXAMPLES} == {"two-npus-one-numa.yaml", "shared-claim.yaml"}
    template = load_all(REPO / "examples" / "dra" / "two-npus-one-numa.yaml")[0]
    devices = template["spec"]["spec"]["devices"]
    assert devices["requests"][0]["exactly"]["count"] == 2
    assert devices["requests"][0]["exactly"]["deviceClassName"] == DRIVER
    assert devices["constraints"] == [
        {"requests": ["npus"], "matchAttribute": f"{DRIVER}/numaNode"}
    ]
    claim, pod = load_all(REPO / "examples" / "dra" / "shared-claim.yaml")
    assert claim["kind"] == "ResourceClaim"
    (pod_claim,) = pod["spec"]["resourceClaims"]
    assert pod_claim["resourceClaimName"] == claim["metadata"]["name"]
    users = [
        c
        for c in pod["spec"]["containers"]
        if c["resources"]["claims"] == [{"name": pod_claim["name"]}]
    ]
    assert len(users) == 2


def test_checkov_skip_keys_are_unique_with_the_vendor_probe_on_too() -> None:
    # The vendor probe's skips and mode dra's are both on here: a key used
    # twice in one object's annotations would leave one of them unread.
    text = render_dra(sets=("health.vendorProbe.enabled=true",)).text
    for document in text.split("\n---"):
        keys = re.findall(r"^\s*(checkov\.io/skip[0-9]+):", document, re.M)
        assert len(keys) == len(set(keys)), keys
    assert "checkov.io/skip7: CKV_K8S_16" in text  # the probe's, on
    assert "CKV_K8S_38=mode dra only" in text  # the DRA driver's, on
