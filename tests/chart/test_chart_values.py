"""What each value changes in the rendered objects, and that it changes only that.

Every case renders the chart with one value changed and compares all leaves
of all objects with the default render: the set of changed leaves must be
exactly the expected one. A template that leaks a value somewhere else, or
ignores it, fails here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.chartkit import (
    CHART,
    MISSING,
    Render,
    agent_container,
    changes,
    identities,
    render,
)

ANY = object()  # any new value, including removal
DS = "DaemonSet:spec.template.spec"
C = f"{DS}.containers.0"
CONFIG = "ConfigMap:data.config.yaml"
CHECKSUM = "DaemonSet:spec.template.metadata.annotations.checksum/config"
TEST = "Pod-test:spec.containers.0"
AGENTS = "Pod-test-agents:spec"  # the first test pod, which checks for Ready agents
# Checkov skip annotations that answer a finding the value can remove.
DS_SKIP = "DaemonSet:metadata.annotations.checkov.io/"
TEST_SKIP = "Pod-test:metadata.annotations.checkov.io/"
AGENTS_SKIP = "Pod-test-agents:metadata.annotations.checkov.io/"
TEST_OBJECTS = (
    "ServiceAccount-test",
    "Role-test",
    "RoleBinding-test",
    "Pod-test-agents",
    "Pod-test",
)
DIGEST = "sha256:" + "ab" * 32
MONITOR = {"enabled": True}
NFD_DIR = "/etc/kubernetes/node-feature-discovery/features.d"


@dataclass(frozen=True)
class Case:
    covers: str  # the value's dotted path
    values: dict[str, Any]
    # leaf path -> new value; a key ending in ".*" (or ":*") matches every
    # changed leaf under that prefix, with ANY or the value they all must have
    expected: dict[str, object] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.covers}={json.dumps(self.values, separators=(',', ':'))}"[:80]


def _config(extra: dict[str, object] | None = None) -> dict[str, object]:
    return {CONFIG: ANY, CHECKSUM: ANY, **(extra or {})}


CASES = [
    Case(
        "resourceName",
        {"resourceName": "example.com/npu"},
        _config(
            {
                f"{TEST}.resources.limits.streamcomputing.com/npu": MISSING,
                f"{TEST}.resources.limits.example.com/npu": 1,
            }
        ),
    ),
    Case(
        "hpe.mode",
        {"hpe": {"mode": "unmapped"}},
        _config(
            {
                f"{TEST}.env.0.value": "unmapped",
                f"{C}.env.7.name": MISSING,  # STC_NPU_HPE_DIR
                f"{C}.env.7.value": MISSING,
                f"{C}.volumeMounts.4.*": MISSING,  # host-hpe
                f"{DS}.volumes.4.*": MISSING,
            }
        ),
    ),
    Case(
        "hpe.hostPath",
        {"hpe": {"hostPath": "/opt/hpe"}},
        _config({f"{DS}.volumes.4.hostPath.path": "/opt/hpe"}),
    ),
    Case(
        "hpe.containerPath",
        {"hpe": {"containerPath": "/opt/hpe"}},
        _config({f"{TEST}.env.1.value": "/opt/hpe"}),
    ),
    Case("discovery.npuPattern", {"discovery": {"npuPattern": "npu(?P<index>[0-9]+)"}}, _config()),
    Case(
        "discovery.memberPattern",
        {"discovery": {"memberPattern": "stc(?P<index>[0-9]+)c[0-9]+"}},
        _config(),
    ),
    Case(
        "discovery.requiredMembers",
        {"discovery": {"requiredMembers": ["stc{index}c0", "stc{index}ctrl"]}},
        _config(),
    ),
    Case("discovery.pciVendors", {"discovery": {"pciVendors": ["0x23e2", "0x1e3a"]}}, _config()),
    Case("discovery.drivers", {"discovery": {"drivers": ["stc", "stc_next"]}}, _config()),
    Case(
        "health.vendorProbe.enabled",
        {"health": {"vendorProbe": {"enabled": True}}},
        _config(
            {
                f"{DS_SKIP}skip7": ANY,  # privileged
                f"{DS_SKIP}skip8": ANY,  # allowPrivilegeEscalation
                f"{DS_SKIP}skip9": ANY,  # capabilities
                f"{DS_SKIP}skip10": ANY,  # NET_RAW
                f"{C}.securityContext.privileged": True,
                f"{C}.securityContext.allowPrivilegeEscalation": True,
                f"{C}.securityContext.capabilities.drop.0": MISSING,
                f"{C}.terminationMessagePath": "/tmp/termination-log",
                f"{C}.volumeMounts.5.name": "host-hpe",
                f"{C}.volumeMounts.5.mountPath": "/usr/local/hpe",
                f"{C}.volumeMounts.5.readOnly": True,
                f"{C}.volumeMounts.6.name": "host-dev",
                f"{C}.volumeMounts.6.mountPath": "/dev",
                f"{C}.volumeMounts.6.readOnly": True,
            }
        ),
    ),
    Case("health.vendorProbe.tool", {"health": {"vendorProbe": {"tool": "/opt/smi"}}}, _config()),
    Case(
        "health.vendorProbe.libraryPath",
        {"health": {"vendorProbe": {"libraryPath": ""}}},
        _config(),
    ),
    Case(
        "health.vendorProbe.intervalSeconds",
        {"health": {"vendorProbe": {"intervalSeconds": 60}}},
        _config(),
    ),
    Case(
        "health.vendorProbe.timeoutSeconds",
        {"health": {"vendorProbe": {"timeoutSeconds": 2.5}}},
        _config(),
    ),
    Case(
        "health.vendorProbe.concurrency",
        {"health": {"vendorProbe": {"concurrency": 1}}},
        _config(),
    ),
    Case("health.vendorProbe.clusters", {"health": {"vendorProbe": {"clusters": 8}}}, _config()),
    *(
        Case(
            f"health.signals.{signal}.{key}",
            {"health": {"signals": {signal: {key: value}}}},
            _config(),
        )
        for signal in ("cardStatus", "clusterStatus", "temperature", "probeFailed")
        for key, value in (("policy", "ignore"), ("failThreshold", 7), ("recoverThreshold", 9))
    ),
    Case(
        "deviceListStrategy",
        {"deviceListStrategy": ["cdi-cri"]},
        _config(
            {  # the spec dir, read-write, after the chart's other mounts
                f"{C}.volumeMounts.5.name": "cdi-specs",
                f"{C}.volumeMounts.5.mountPath": "/var/run/cdi",
                f"{DS}.volumes.5.name": "cdi-specs",
                f"{DS}.volumes.5.hostPath.path": "/var/run/cdi",
                f"{DS}.volumes.5.hostPath.type": "DirectoryOrCreate",
            }
        ),
    ),
    Case(
        "deviceListStrategy",
        {"deviceListStrategy": ["device-specs", "cdi-cri"]},
        _config({f"{C}.volumeMounts.5.*": ANY, f"{DS}.volumes.5.*": ANY}),
    ),
    Case("stcSetDevices", {"stcSetDevices": "local"}, _config()),
    # Sharing is the agent's: the config alone, and the resource name the
    # test pod requests when renamed.
    Case("sharing.replicas", {"sharing": {"replicas": 4}}, _config()),
    Case("sharing.renameShared", {"sharing": {"renameShared": True}}, _config()),
    Case(
        "sharing.renameShared",
        {"sharing": {"replicas": 2, "renameShared": True}},
        _config(
            {
                f"{TEST}.resources.limits.streamcomputing.com/npu": MISSING,
                f"{TEST}.resources.limits.streamcomputing.com/npu.shared": 1,
            }
        ),
    ),
    Case(
        "sharing.failRequestsGreaterThanOne",
        {"sharing": {"replicas": 2, "failRequestsGreaterThanOne": True}},
        _config(),
    ),
    # Without cdi-cri the agent writes no spec: config only, nothing mounted.
    Case("cdi.specDir", {"cdi": {"specDir": "/etc/cdi"}}, _config()),
    Case(
        "cdi.specDir",
        {"deviceListStrategy": ["cdi-cri"], "cdi": {"specDir": "/etc/cdi"}},
        _config(
            {
                f"{C}.volumeMounts.5.name": "cdi-specs",
                f"{C}.volumeMounts.5.mountPath": "/etc/cdi",
                f"{DS}.volumes.5.name": "cdi-specs",
                f"{DS}.volumes.5.hostPath.path": "/etc/cdi",
                f"{DS}.volumes.5.hostPath.type": "DirectoryOrCreate",
            }
        ),
    ),
    # The default (device-plugin, kubelet-socket) renders nothing of its own.
    Case(
        "registration",
        {"registration": "plugin-watcher"},
        _config(
            {  # the registry dir, read-write, after the chart's other mounts
                f"{C}.volumeMounts.5.name": "plugins-registry",
                f"{C}.volumeMounts.5.mountPath": "/var/lib/kubelet/plugins_registry",
                f"{DS}.volumes.5.name": "plugins-registry",
                f"{DS}.volumes.5.hostPath.path": "/var/lib/kubelet/plugins_registry",
                f"{DS}.volumes.5.hostPath.type": "DirectoryOrCreate",
            }
        ),
    ),
    # Unused with kubelet-socket: the config only, nothing mounted.
    Case(
        "pluginRegistryDir",
        {"pluginRegistryDir": "/var/lib/k0s/kubelet/plugins_registry"},
        _config(),
    ),
    Case(
        "pluginRegistryDir",
        {
            "registration": "plugin-watcher",
            "pluginRegistryDir": "/var/lib/k0s/kubelet/plugins_registry",
        },
        _config(
            {
                f"{C}.volumeMounts.5.*": ANY,
                f"{DS}.volumes.5.*": ANY,
            }
        ),
    ),
    Case(
        "mode",
        {"mode": "dra"},
        _config(
            {
                # the node name: the DRA driver's pool
                f"{C}.env.8.name": "STC_NPU_NODE_NAME",
                f"{C}.env.8.valueFrom.fieldRef.fieldPath": "spec.nodeName",
                # the CDI spec (the claims' devices), the registry, the checkpoint
                f"{C}.volumeMounts.5.name": "cdi-specs",
                f"{C}.volumeMounts.5.mountPath": "/var/run/cdi",
                f"{C}.volumeMounts.6.name": "plugins-registry",
                f"{C}.volumeMounts.6.mountPath": "/var/lib/kubelet/plugins_registry",
                f"{C}.volumeMounts.7.name": "dra-state",
                f"{C}.volumeMounts.7.mountPath": "/var/lib/kubelet/plugins/npu.streamcomputing.com",
                f"{DS}.volumes.5.*": ANY,
                f"{DS}.volumes.6.*": ANY,
                f"{DS}.volumes.7.name": "dra-state",
                f"{DS}.volumes.7.hostPath.path": "/var/lib/kubelet/plugins/npu.streamcomputing.com",
                f"{DS}.volumes.7.hostPath.type": "DirectoryOrCreate",
                # the API: a token, the DRA objects, and checkov's one finding answered
                f"{DS}.automountServiceAccountToken": True,
                f"{DS_SKIP}skip11": ANY,
                "DeviceClass/npu.streamcomputing.com:*": ANY,
                "ClusterRole-dra:*": ANY,
                "ClusterRoleBinding-dra:*": ANY,
                "ValidatingAdmissionPolicy-own-node-slices:*": ANY,
                "ValidatingAdmissionPolicyBinding-own-node-slices:*": ANY,
            }
        ),
    ),
    Case("dra.sliceIntervalSeconds", {"dra": {"sliceIntervalSeconds": 2.5}}, _config()),
    Case(
        "image.repository",
        {"image": {"repository": "registry.example.com/stc-npu-agent"}},
        {
            f"{C}.image": "registry.example.com/stc-npu-agent:0.1.0",
            f"{AGENTS}.containers.0.image": "registry.example.com/stc-npu-agent:0.1.0",
        },
    ),
    Case(
        "image.tag",
        {"image": {"tag": "0.2.0"}},
        {
            f"{C}.image": "ghcr.io/stc-npu/stc-npu-agent:0.2.0",
            f"{AGENTS}.containers.0.image": "ghcr.io/stc-npu/stc-npu-agent:0.2.0",
        },
    ),
    Case(
        "image.digest",
        {"image": {"tag": "0.2.0", "digest": DIGEST}},
        {
            f"{C}.image": f"ghcr.io/stc-npu/stc-npu-agent@{DIGEST}",
            f"{AGENTS}.containers.0.image": f"ghcr.io/stc-npu/stc-npu-agent@{DIGEST}",
            f"{DS_SKIP}skip5": MISSING,
            f"{AGENTS_SKIP}skip3": MISSING,
        },
    ),
    Case(
        "image.pullPolicy",
        {"image": {"pullPolicy": "Always"}},
        {
            f"{C}.imagePullPolicy": "Always",
            f"{AGENTS}.containers.0.imagePullPolicy": "Always",
            f"{DS_SKIP}skip4": MISSING,
            f"{AGENTS_SKIP}skip2": MISSING,
        },
    ),
    Case(
        "imagePullSecrets",
        {"imagePullSecrets": [{"name": "regcred"}]},
        {
            f"{DS}.imagePullSecrets.0.name": "regcred",
            "Pod-test:spec.imagePullSecrets.0.name": "regcred",
            f"{AGENTS}.imagePullSecrets.0.name": "regcred",
        },
    ),
    Case(
        "kubeletDir",
        {"kubeletDir": "/var/lib/k0s/kubelet/device-plugins"},
        {
            f"{C}.env.0.value": "/var/lib/k0s/kubelet/device-plugins",  # STC_NPU_KUBELET_DIR
            f"{C}.volumeMounts.0.mountPath": "/var/lib/k0s/kubelet/device-plugins",
            f"{DS}.volumes.0.hostPath.path": "/var/lib/k0s/kubelet/device-plugins",
        },
    ),
    Case(
        "devDir", {"devDir": "/host-root/dev"}, {f"{DS}.volumes.1.hostPath.path": "/host-root/dev"}
    ),
    Case(
        "sysDir", {"sysDir": "/host-root/sys"}, {f"{DS}.volumes.3.hostPath.path": "/host-root/sys"}
    ),
    Case("logLevel", {"logLevel": "debug"}, {f"{C}.env.3.value": "debug"}),  # STC_NPU_LOG_LEVEL
    Case("logFormat", {"logFormat": "json"}, {f"{C}.env.4.value": "json"}),  # STC_NPU_LOG_FORMAT
    Case(
        "probes.port",
        {"probes": {"port": 9101}},
        {
            f"{C}.env.5.value": ":9101",  # STC_NPU_PROBE_ADDRESS
            f"{C}.ports.0.containerPort": 9101,
        },
    ),
    Case("metrics.enabled", {"metrics": {"enabled": True}}, _config()),
    Case(
        "metrics.service.enabled",
        {"metrics": {"enabled": True, "service": {"enabled": True}}},
        _config({"Service-metrics:*": ANY}),
    ),
    Case(
        "metrics.serviceMonitor.enabled",
        {"metrics": {"enabled": True, "service": {"enabled": True}, "serviceMonitor": MONITOR}},
        _config({"Service-metrics:*": ANY, "ServiceMonitor:*": ANY}),
    ),
    Case(
        "metrics.serviceMonitor.interval",
        {"metrics": {"serviceMonitor": {"interval": "1m"}}},  # renders nothing while off
    ),
    Case(
        "metrics.serviceMonitor.labels",
        {"metrics": {"serviceMonitor": {"labels": {"release": "prometheus"}}}},
    ),
    Case(
        "metrics.serviceMonitor.interval",
        {
            "metrics": {
                "enabled": True,
                "service": {"enabled": True},
                "serviceMonitor": {**MONITOR, "interval": "1m"},
            }
        },
        _config(
            {
                "Service-metrics:*": ANY,
                "ServiceMonitor:*": ANY,
                "ServiceMonitor:spec.endpoints.0.interval": "1m",
            }
        ),
    ),
    Case(
        "metrics.podMonitor.enabled",
        {"metrics": {"enabled": True, "podMonitor": MONITOR}},
        _config({"PodMonitor:*": ANY}),
    ),
    Case("metrics.podMonitor.interval", {"metrics": {"podMonitor": {"interval": "1m"}}}),
    Case(
        "metrics.podMonitor.labels",
        {"metrics": {"enabled": True, "podMonitor": {**MONITOR, "labels": {"team": "npu"}}}},
        _config({"PodMonitor:*": ANY, "PodMonitor:metadata.labels.team": "npu"}),
    ),
    Case(
        "nfd.enabled",
        {"nfd": {"enabled": True}},
        _config(
            {
                f"{C}.volumeMounts.5.name": "nfd-features",
                f"{C}.volumeMounts.5.mountPath": NFD_DIR,
                f"{DS}.volumes.5.name": "nfd-features",
                f"{DS}.volumes.5.hostPath.path": NFD_DIR,
                f"{DS}.volumes.5.hostPath.type": "DirectoryOrCreate",
            }
        ),
    ),
    Case("nfd.hostPath", {"nfd": {"hostPath": "/etc/nfd/features.d"}}, _config()),
    Case(
        "nfd.hostPath",
        {"nfd": {"enabled": True, "hostPath": "/etc/nfd/features.d"}},
        _config(
            {
                f"{C}.volumeMounts.5.*": ANY,
                f"{C}.volumeMounts.5.mountPath": "/etc/nfd/features.d",
                f"{DS}.volumes.5.*": ANY,
                f"{DS}.volumes.5.hostPath.path": "/etc/nfd/features.d",
            }
        ),
    ),
    Case("nfd.expirySeconds", {"nfd": {"expirySeconds": 600}}, _config()),
    Case("nfd.models", {"nfd": {"models": {"0x0200": "STCP950"}}}, _config()),
    Case("nfd.hpeVersionFile", {"nfd": {"hpeVersionFile": "share/version.txt"}}, _config()),
    Case(
        "nodeSelector",
        {"nodeSelector": {"example.com/npu": "yes"}},
        {f"{DS}.nodeSelector.example.com/npu": "yes"},
    ),
    Case("affinity", {"affinity": None}, {f"{DS}.affinity.*": MISSING}),
    Case(
        "affinity",
        {
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "example.com/npu", "operator": "Exists"}]}
                        ]
                    }
                }
            }
        },
        {f"{DS}.affinity.*": ANY},
    ),
    Case(
        "tolerations",
        {"tolerations": [{"key": "example.com/npu", "operator": "Exists"}]},
        {
            f"{DS}.tolerations.0.key": "example.com/npu",
            f"{DS}.tolerations.1.*": MISSING,
        },
    ),
    Case(
        "priorityClassName",
        {"priorityClassName": "npu-critical"},
        {f"{DS}.priorityClassName": "npu-critical"},
    ),
    Case("priorityClassName", {"priorityClassName": ""}, {f"{DS}.priorityClassName": MISSING}),
    Case(
        "updateStrategy.type",
        {"updateStrategy": {"type": "OnDelete"}},
        {
            "DaemonSet:spec.updateStrategy.type": "OnDelete",
            "DaemonSet:spec.updateStrategy.rollingUpdate.maxUnavailable": MISSING,
        },
    ),
    Case(
        "updateStrategy.rollingUpdate.maxUnavailable",
        {"updateStrategy": {"rollingUpdate": {"maxUnavailable": "25%"}}},
        {"DaemonSet:spec.updateStrategy.rollingUpdate.maxUnavailable": "25%"},
    ),
    Case(
        "updateStrategy.rollingUpdate",
        {"updateStrategy": {"rollingUpdate": None}},
        {"DaemonSet:spec.updateStrategy.rollingUpdate.maxUnavailable": MISSING},
    ),
    Case(
        "resources",
        {"resources": {"requests": {"cpu": "50m"}, "limits": {"cpu": "1"}}},
        {
            f"{C}.resources.requests.cpu": "50m",
            f"{C}.resources.limits.cpu": "1",
            f"{DS_SKIP}skip3": MISSING,
        },
    ),
    Case(
        "podAnnotations",
        {"podAnnotations": {"example.com/owner": "platform"}},
        {"DaemonSet:spec.template.metadata.annotations.example.com/owner": "platform"},
    ),
    Case(
        "podLabels",
        {"podLabels": {"example.com/team": "platform"}},
        {"DaemonSet:spec.template.metadata.labels.example.com/team": "platform"},
    ),
    Case(
        "extraEnv",
        {
            "extraEnv": {
                "NODE_NAME": {"valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                "GRPC_VERBOSITY": "error",
            }
        },
        {  # after the chart's own eight variables, sorted by name
            f"{C}.env.8.name": "GRPC_VERBOSITY",
            f"{C}.env.8.value": "error",
            f"{C}.env.9.name": "NODE_NAME",
            f"{C}.env.9.valueFrom.fieldRef.fieldPath": "spec.nodeName",
        },
    ),
    Case(
        "namespaceOverride",
        {"namespaceOverride": "stc-npu-system"},
        {
            **{
                f"{kind}:metadata.namespace": "stc-npu-system"
                for kind in ("ServiceAccount", "ConfigMap", "DaemonSet", *TEST_OBJECTS)
            },
            "RoleBinding-test:subjects.0.namespace": "stc-npu-system",
            f"{AGENTS}.containers.0.env.0.value": "stc-npu-system",  # NAMESPACE
        },
    ),
    Case("test.enabled", {"test": {"enabled": False}}, {f"{o}:*": MISSING for o in TEST_OBJECTS}),
    Case(
        "test.image.repository",
        {"test": {"image": {"repository": "registry.example.com/busybox"}}},
        {f"{TEST}.image": "registry.example.com/busybox:1.37.0"},
    ),
    Case(
        "test.image.tag",
        {"test": {"image": {"tag": "1.36.1"}}},
        {f"{TEST}.image": "docker.io/library/busybox:1.36.1"},
    ),
    Case(
        "test.image.digest",
        {"test": {"image": {"digest": DIGEST}}},
        {f"{TEST}.image": f"docker.io/library/busybox@{DIGEST}", f"{TEST_SKIP}skip3": MISSING},
    ),
    Case(
        "test.image.pullPolicy",
        {"test": {"image": {"pullPolicy": "Never"}}},
        {f"{TEST}.imagePullPolicy": "Never"},
    ),
    Case(
        "test.tolerations",
        {"test": {"tolerations": [{"key": "example.com/npu", "operator": "Exists"}]}},
        {
            f"{pod}:spec.tolerations.0.{key}": value
            for pod in ("Pod-test", "Pod-test-agents")
            for key, value in (("key", "example.com/npu"), ("effect", MISSING))
        },
    ),
    # --- values added in 0.2.0 ---
    # Helm's own: a parent chart's globals reach a subchart; the chart reads none.
    Case("global", {"global": {"imageRegistry": "registry.example.com"}}, {}),
    Case(
        "fullnameOverride",
        {"fullnameOverride": "npu-agent"},
        {
            # Identities are names relative to the DaemonSet's: they stay.
            **{
                f"{o}:metadata.name": ANY
                for o in ("ServiceAccount", "ConfigMap", "DaemonSet", *TEST_OBJECTS)
            },
            f"{DS}.serviceAccountName": "npu-agent",
            f"{DS}.volumes.2.configMap.name": "npu-agent",
            "Role-test:rules.0.resourceNames.0": "npu-agent",
            "RoleBinding-test:roleRef.name": "npu-agent-test",
            "RoleBinding-test:subjects.0.name": "npu-agent-test",
            f"{AGENTS}.serviceAccountName": "npu-agent-test",
            f"{AGENTS}.containers.0.env.1.value": "npu-agent",  # DAEMONSET
        },
    ),
    Case(
        "commonLabels",
        {"commonLabels": {"example.com/team": "platform"}},
        {
            **{
                f"{o}:metadata.labels.example.com/team": "platform"
                for o in ("ServiceAccount", "ConfigMap", "DaemonSet", *TEST_OBJECTS)
            },
            "DaemonSet:spec.template.metadata.labels.example.com/team": "platform",
        },
    ),
    Case(
        "serviceAccount.create",
        {"serviceAccount": {"create": False}},
        {"ServiceAccount:*": MISSING, f"{DS}.serviceAccountName": "default"},
    ),
    Case(
        "serviceAccount.name",
        {"serviceAccount": {"name": "npu-agent"}},
        {
            "ServiceAccount:*": MISSING,
            "ServiceAccount/npu-agent:*": ANY,
            f"{DS}.serviceAccountName": "npu-agent",
        },
    ),
    Case(
        "serviceAccount.annotations",
        {"serviceAccount": {"annotations": {"example.com/owner": "platform"}}},
        {"ServiceAccount:metadata.annotations.example.com/owner": "platform"},
    ),
    Case(
        "probes.liveness",
        {"probes": {"liveness": {"periodSeconds": 30, "initialDelaySeconds": 5}}},
        {f"{C}.livenessProbe.periodSeconds": 30, f"{C}.livenessProbe.initialDelaySeconds": 5},
    ),
    Case(
        "probes.readiness",
        {"probes": {"readiness": {"failureThreshold": 6}}},
        {f"{C}.readinessProbe.failureThreshold": 6},
    ),
    Case(
        "revisionHistoryLimit",
        {"revisionHistoryLimit": 3},
        {"DaemonSet:spec.revisionHistoryLimit": 3},
    ),
    Case("runtimeClassName", {"runtimeClassName": "kata"}, {f"{DS}.runtimeClassName": "kata"}),
    Case(
        "podSecurityContext",
        {"podSecurityContext": {"supplementalGroups": [990]}},
        {f"{DS}.securityContext.supplementalGroups.0": 990},
    ),
    Case(
        "securityContext",
        {"securityContext": {"seLinuxOptions": {"type": "spc_t"}}},
        {f"{C}.securityContext.seLinuxOptions.type": "spc_t"},
    ),
    Case(
        "extraVolumes",
        {"extraVolumes": [{"name": "ca", "configMap": {"name": "site-ca"}}]},
        {f"{DS}.volumes.5.name": "ca", f"{DS}.volumes.5.configMap.name": "site-ca"},
    ),
    Case(
        "extraVolumeMounts",
        {"extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/site-ca", "readOnly": True}]},
        {
            f"{C}.volumeMounts.5.name": "ca",
            f"{C}.volumeMounts.5.mountPath": "/etc/site-ca",
            f"{C}.volumeMounts.5.readOnly": True,
        },
    ),
]


def _values_file(tmp_path_factory: pytest.TempPathFactory, case: Case) -> Path:
    path = tmp_path_factory.mktemp("values") / "values.yaml"
    path.write_text(yaml.safe_dump(case.values), encoding="utf-8")
    return path


def _matches(expected: dict[str, object], changed: dict[str, object]) -> list[str]:
    problems = []
    prefixes = {key[:-1]: value for key, value in expected.items() if key.endswith("*")}
    exact = {key: value for key, value in expected.items() if not key.endswith("*")}
    for path, value in changed.items():
        prefix = next((p for p in prefixes if path.startswith(p)), None)
        want = prefixes[prefix] if prefix is not None else exact.get(path, "<unexpected change>")
        if prefix is None and path not in exact:
            problems.append(f"unexpected change: {path} -> {value!r}")
        elif want is not ANY and value != want:
            problems.append(f"{path}: got {value!r}, expected {want!r}")
    for path in exact.keys() - changed.keys():
        problems.append(f"expected a change at {path}, none rendered")
    for prefix in prefixes:
        if not any(path.startswith(prefix) for path in changed):
            problems.append(f"expected changes under {prefix}, none rendered")
    return problems


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_value_changes_exactly_what_it_should(
    case: Case, helm: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    changed = changes(render(helm), render(helm, [_values_file(tmp_path_factory, case)]))
    problems = _matches(case.expected, changed)
    assert not problems, "\n".join(problems)


def _leaf_values(schema: dict[str, Any], node: dict[str, Any], prefix: str) -> list[str]:
    """Dotted paths of the values the chart documents one by one (see ci/chart_values.py)."""
    paths = []
    for key, declared in node["properties"].items():
        child = declared
        if "$ref" in declared:
            child = schema["definitions"][declared["$ref"].rsplit("/", 1)[1]]
        path = f"{prefix}{key}"
        kubernetes = str(child.get("$comment", "")).startswith("Kubernetes")
        if "properties" in child and not kubernetes:
            paths += _leaf_values(schema, child, f"{path}.")
        else:
            paths.append(path)
    return paths


def test_every_value_has_a_case() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    leaves = set(_leaf_values(schema, schema, ""))
    covered = {case.covers for case in CASES}
    assert leaves - covered == set(), "values without a test case"


def test_the_case_checker_can_fail() -> None:
    assert _matches({"a": 1}, {"a": 1}) == []
    assert _matches({"a": 1}, {"a": 1, "b": 2})  # leak
    assert _matches({"a": 1}, {})  # ignored value
    assert _matches({"a": 1}, {"a": 2})  # wrong value
    assert _matches({"p.*": MISSING}, {"p.x": 1})


# --- defaults that matter on their own -------------------------------------


@pytest.fixture(scope="module")
def default() -> Render:
    return render()


def test_objects_rendered(default: Render) -> None:
    assert identities(default) == [
        "ServiceAccount",
        "ServiceAccount-test",
        "ConfigMap",
        "Role-test",
        "RoleBinding-test",
        "DaemonSet",
        "Pod-test-agents",
        "Pod-test",
    ]
    assert default.object("DaemonSet")["metadata"]["name"] == "stc-npu"
    assert all(doc["metadata"]["namespace"] == "kube-system" for doc in default.docs)


def test_security_defaults(default: Render) -> None:
    pod = default.kind("DaemonSet")["spec"]["template"]["spec"]
    container = agent_container(default)
    assert container["securityContext"] == {
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsUser": 0,
        "runAsGroup": 0,
        "runAsNonRoot": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "stc-npu"
    assert default.object("ServiceAccount")["automountServiceAccountToken"] is False
    for host_namespace in ("hostNetwork", "hostPID", "hostIPC"):
        assert host_namespace not in pod
    assert pod["priorityClassName"] == "system-node-critical"
    # No cluster-wide role at all; the one Role is the helm test pod's, and it
    # may only read the agent DaemonSet. Nothing is bound to the agent.
    assert not set(default.kinds()) & {"ClusterRole", "ClusterRoleBinding"}
    assert default.object("Role-test")["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["daemonsets"],
            "resourceNames": ["stc-npu"],
            "verbs": ["get"],
        }
    ]
    (subject,) = default.object("RoleBinding-test")["subjects"]
    assert subject["name"] == "stc-npu-test" != pod["serviceAccountName"]


def test_only_the_kubelet_dir_is_writable(default: Render) -> None:
    pod = default.kind("DaemonSet")["spec"]["template"]["spec"]
    mounts = {mount["name"]: mount for mount in agent_container(default)["volumeMounts"]}
    writable = {name for name, mount in mounts.items() if not mount.get("readOnly", False)}
    assert writable == {"kubelet-device-plugins"}
    assert all("mountPropagation" not in mount for mount in mounts.values())
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["host-dev"]["hostPath"] == {"path": "/dev", "type": "Directory"}
    assert mounts["host-dev"]["mountPath"] == "/host/dev"  # never over the container's /dev
    host_paths = {name for name, volume in volumes.items() if "hostPath" in volume}
    assert host_paths == {"kubelet-device-plugins", "host-dev", "host-sys", "host-hpe"}
    assert volumes["host-sys"]["hostPath"] == {"path": "/sys", "type": "Directory"}
    assert mounts["host-sys"]["mountPath"] == "/host/sys"  # never over the container's /sys
    assert volumes["host-hpe"]["hostPath"] == {"path": "/usr/local/hpe"}
    assert mounts["host-hpe"]["mountPath"] == "/host/hpe"


# The kubelet's default; it bind-mounts a file of its own there.
KUBELET_TERMINATION_MESSAGE_PATH = "/dev/termination-log"


@pytest.mark.parametrize("sets", [[], ["health.vendorProbe.enabled=true"]])
def test_the_termination_message_file_is_not_under_a_read_only_mount(sets: list[str]) -> None:
    # The runtime creates the kubelet's termination message file as a mount
    # point in the container: under a read-only mount (the vendor probe's
    # host /dev at /dev) that fails, and the agent container never starts.
    container = agent_container(render(sets=sets))
    path = container.get("terminationMessagePath", KUBELET_TERMINATION_MESSAGE_PATH)
    read_only = [
        mount["mountPath"]
        for mount in container["volumeMounts"]
        if mount.get("readOnly", False)
        and (path + "/").startswith(mount["mountPath"].rstrip("/") + "/")
    ]
    assert not read_only, f"terminationMessagePath {path} is under the read-only {read_only}"


def test_with_cdi_cri_the_spec_dir_is_writable_too() -> None:
    rendered = render(sets=["deviceListStrategy={cdi-cri}"])
    mounts = {mount["name"]: mount for mount in agent_container(rendered)["volumeMounts"]}
    writable = {name for name, mount in mounts.items() if not mount.get("readOnly", False)}
    assert writable == {"kubelet-device-plugins", "cdi-specs"}
    assert mounts["cdi-specs"]["mountPath"] == "/var/run/cdi"  # the host's path, as configured
    config = yaml.safe_load(rendered.kind("ConfigMap")["data"]["config.yaml"])
    assert config["cdi"]["specDir"] == mounts["cdi-specs"]["mountPath"]


def test_agent_env_points_at_the_mounts(default: Render) -> None:
    container = agent_container(default)
    env = {item["name"]: item["value"] for item in container["env"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert env["STC_NPU_KUBELET_DIR"] == mounts["kubelet-device-plugins"]
    assert env["STC_NPU_DEV_DIR"] == mounts["host-dev"]
    assert env["STC_NPU_SYS_DIR"] == mounts["host-sys"]
    assert env["STC_NPU_CONFIG"] == mounts["config"] + "/config.yaml"
    assert "config.yaml" in default.kind("ConfigMap")["data"]
    assert env["STC_NPU_PROBE_ADDRESS"] == ":8081"
    assert env["STC_NPU_HPE_DIR"] == mounts["host-hpe"]


def test_probes_tell_liveness_and_readiness_apart(default: Render) -> None:
    container = agent_container(default)
    (port,) = container["ports"]
    assert port == {"name": "probes", "containerPort": 8081, "protocol": "TCP"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "probes"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "probes"}


def test_checksum_is_the_hash_of_the_config_file(default: Render) -> None:
    config = default.kind("ConfigMap")["data"]["config.yaml"]
    annotations = default.kind("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    expected = hashlib.sha256(config.rstrip("\n").encode()).hexdigest()
    assert annotations == {"checksum/config": expected}


def test_default_resources(default: Render) -> None:
    assert agent_container(default)["resources"] == {
        "requests": {"cpu": "10m", "memory": "64Mi"},
        "limits": {"memory": "128Mi"},
    }


def test_default_placement(default: Render) -> None:
    pod = default.kind("DaemonSet")["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    keys = [term["matchExpressions"][0]["key"] for term in terms["nodeSelectorTerms"]]
    # NFD's default label (PCI class and vendor), its vendor-only form, by hand.
    assert keys == [
        "feature.node.kubernetes.io/pci-1200_23e2.present",
        "feature.node.kubernetes.io/pci-23e2.present",
        "streamcomputing.com/npu.present",
    ]
    assert pod["tolerations"] == [
        {"key": "CriticalAddonsOnly", "operator": "Exists"},
        {"key": "streamcomputing.com/npu", "operator": "Exists", "effect": "NoSchedule"},
    ]


@pytest.mark.parametrize("identity", ["Pod-test-agents", "Pod-test"])
def test_test_pods_are_restricted(default: Render, identity: str) -> None:
    pod = default.object(identity)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    spec = pod["spec"]
    (container,) = spec["containers"]
    # "restricted" Pod Security Standard
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "volumes" not in spec
    assert "hostNetwork" not in spec


def test_test_pod_requests_one_npu(default: Render) -> None:
    (container,) = default.object("Pod-test")["spec"]["containers"]
    assert container["resources"]["limits"]["streamcomputing.com/npu"] == 1
    script = container["args"][0]
    assert "STC_NPU_DEVICES" in script
    assert '[ ! -c "/dev/$id" ]' in script


def test_only_the_agents_check_gets_a_token(default: Render) -> None:
    agents = default.object("Pod-test-agents")["spec"]
    assert agents["serviceAccountName"] == "stc-npu-test"
    assert agents["automountServiceAccountToken"] is True
    assert "limits" not in agents or "streamcomputing.com/npu" not in str(agents)
    assert default.object("Pod-test")["spec"]["automountServiceAccountToken"] is False


@pytest.mark.parametrize("identity", ["Pod-test-agents", "Pod-test"])
def test_test_pod_is_not_selected_by_the_daemonset(default: Render, identity: str) -> None:
    # A pod matching the selector would be adopted (and deleted) by the DaemonSet.
    selector = default.kind("DaemonSet")["spec"]["selector"]["matchLabels"]
    labels = default.object(identity)["metadata"]["labels"]
    assert not all(labels.get(key) == value for key, value in selector.items())
