"""The metrics Service and the Prometheus Operator monitors point at what the
chart renders (kubernetes-validate has no schema for the operator's kinds),
and the NFD directory is mounted writable only when NFD labels are on."""

from __future__ import annotations

from tests.chart.chartkit import CHART, agent_container, render

SCENARIO = CHART / "ci" / "metrics-nfd-values.yaml"


def test_monitors_reach_the_agents_metrics() -> None:
    rendered = render(values_files=[SCENARIO])
    pod_template = rendered.kind("DaemonSet")["spec"]["template"]
    pod_labels = pod_template["metadata"]["labels"]
    container_ports = {port["name"]: port for port in agent_container(rendered)["ports"]}

    service = rendered.kind("Service")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in container_ports

    monitor = rendered.kind("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {"port": service_port["name"], "path": "/metrics", "interval": "15s"}

    pod_monitor = rendered.kind("PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (pod_endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert pod_endpoint["port"] in container_ports
    assert pod_endpoint["path"] == "/metrics"


def test_nothing_for_metrics_by_default() -> None:
    assert not {"Service", "ServiceMonitor", "PodMonitor"} & set(render().kinds())


def test_nfd_directory_is_mounted_writable_only_when_enabled() -> None:
    rendered = render(values_files=[SCENARIO])
    mounts = {m["name"]: m for m in agent_container(rendered)["volumeMounts"]}
    assert mounts["nfd-features"]["mountPath"] == "/var/lib/nfd/features.d"
    assert not mounts["nfd-features"].get("readOnly", False)
    writable = {name for name, mount in mounts.items() if not mount.get("readOnly", False)}
    assert writable == {"kubelet-device-plugins", "nfd-features"}
    volumes = {
        v["name"]: v for v in rendered.kind("DaemonSet")["spec"]["template"]["spec"]["volumes"]
    }
    assert volumes["nfd-features"]["hostPath"] == {
        "path": "/var/lib/nfd/features.d",
        "type": "DirectoryOrCreate",
    }
    config = rendered.kind("ConfigMap")["data"]["config.yaml"]
    assert 'featureFile: "/var/lib/nfd/features.d/stc-npu"' in config
    default_mounts = {m["name"] for m in agent_container(render())["volumeMounts"]}
    assert "nfd-features" not in default_mounts
