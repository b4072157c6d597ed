"""Values that the chart refuses, with a message naming the key: the schema
(values.schema.json) for shapes, templates/validate.yaml for combinations;
and ci/chart_values.py, which keeps values.yaml, the schema and the README
table from drifting apart."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chart.chartkit import CHART, REPO, render_error, run_helm

# (--set arguments, a regex the error must match: it names the key). helm 3
# says "hpe.mode: ...", helm 4 "at '/hpe/mode': ...", hence [./].
SCHEMA_ERRORS = [
    (["hpe.mode=bogus"], r"hpe[./]mode"),
    (["hpe.modee=mapped"], r"modee"),
    (["resourceNme=example.com/npu"], r"resourceNme"),
    (["resourceName=npu"], r"resourceName"),
    (["logLevel=verbose"], r"logLevel"),
    (["logFormat=xml"], r"logFormat"),
    (["kubeletDir=var/lib/kubelet/device-plugins"], r"kubeletDir"),
    (["kubeletDir=/var/lib/kubelet/device-plugins/"], r"kubeletDir"),
    (["devDir=/"], r"devDir"),
    (["hpe.hostPath=usr/local/hpe"], r"hpe[./]hostPath"),
    (["image.digest=sha256:abc"], r"image[./]digest"),
    (["image.pullPolicy=Sometimes"], r"image[./]pullPolicy"),
    (["image.tagg=1.0"], r"tagg"),
    (["probes.port=70000"], r"probes[./]port"),
    (["tolerations[0].efect=NoSchedule"], r"efect"),
    (["updateStrategy.type=Recreate"], r"updateStrategy[./]type"),
    (["updateStrategy.rollingUpdate.maxSurge=1"], r"maxSurge"),
    (["discovery.npuPattern=stc[0-9]+"], r"discovery[./]npuPattern"),
    (["discovery.pciVendors={0x23E2}"], r"discovery[./]pciVendors"),
    (["discovery.pciVendors={}"], r"discovery[./]pciVendors"),
    (["discovery.drivers={../stc}"], r"discovery[./]drivers"),
    (["discovery.requiredMembers={stc0ctrl}"], r"discovery[./]requiredMembers"),
    (["sysDir=sys"], r"sysDir"),
    (["namespaceOverride=Bad_Namespace"], r"namespaceOverride"),
    (["extraEnv.1BAD=x"], r"1BAD"),
    (["podLabels.team=null", "podLabels.size=3"], r"podLabels[./]size"),
    (["test.enabled=maybe"], r"test[./]enabled"),
    (["test.image.tagg=1"], r"tagg"),
    (["affinity.nodeAffinty.x=y"], r"nodeAffinty"),
    (["resources.request.cpu=1"], r"request"),
    (["health.vendorProbe.enabled=yes"], r"health[./]vendorProbe[./]enabled"),
    (["health.vendorProbe.tool=stc-smi"], r"health[./]vendorProbe[./]tool"),
    (["health.vendorProbe.concurrency=0"], r"health[./]vendorProbe[./]concurrency"),
    (["health.signals.presence.policy=ignore"], r"presence"),
    (["health.signals.cardStatus.policy=warn"], r"health[./]signals[./]cardStatus[./]policy"),
    (["health.signals.probeFailed.failThreshold=1.5"], r"failThreshold"),
    (["deviceListStrategy={cdi}"], r"deviceListStrategy"),
    (["deviceListStrategy={cdi-cri,cdi-cri}"], r"deviceListStrategy"),
    (["deviceListStrategy=cdi-cri"], r"deviceListStrategy"),  # a string, not a list
    (["stcSetDevices=all"], r"stcSetDevices"),
    (["cdi.specDir=var/run/cdi"], r"cdi[./]specDir"),
    (["cdi.specdir=/var/run/cdi"], r"specdir"),
    (["securityContext.privilegd=true"], r"privilegd"),
    (["securityContext.seccompProfile.type=Bogus"], r"securityContext[./]seccompProfile[./]type"),
    (["podSecurityContext.fsGroup=-1"], r"podSecurityContext[./]fsGroup"),
    (["serviceAccount.nmae=x"], r"nmae"),
    (["serviceAccount.create=yes"], r"serviceAccount[./]create"),
    (["fullnameOverride=Bad_Name"], r"fullnameOverride"),
    (["runtimeClassName=Bad_Name"], r"runtimeClassName"),
    (["revisionHistoryLimit=-1"], r"revisionHistoryLimit"),
    (["probes.liveness.periodSeconds=0"], r"probes[./]liveness[./]periodSeconds"),
    (["probes.readiness.httpGet.path=/x"], r"httpGet"),
    (["commonLabels.bad key=x"], r"bad key"),
    (["extraVolumeMounts[0].name=ca"], r"mountPath"),
    (["extraVolumes[0].configMap.name=ca"], r"name"),
    (["sharing.replicas=0"], r"sharing[./]replicas"),
    (["sharing.replicas=101"], r"sharing[./]replicas"),
    (["sharing.replicas=two"], r"sharing[./]replicas"),
    (["sharing.renameShared=yes"], r"sharing[./]renameShared"),
    (["sharing.failRequestsGreaterThanOne=1"], r"sharing[./]failRequestsGreaterThanOne"),
    (["sharing.replica=2"], r"replica"),
    (["mode=dynamic"], r"mode"),
    (["registration=watcher"], r"registration"),
    (["pluginRegistryDir=plugins_registry"], r"pluginRegistryDir"),
    (["metrics.enabled=yes"], r"metrics[./]enabled"),
    (["metrics.port=9100"], r"port"),
    (["metrics.serviceMonitor.interval=often"], r"metrics[./]serviceMonitor[./]interval"),
    (["metrics.podMonitor.labels.size=3"], r"metrics[./]podMonitor[./]labels"),
    (["nfd.hostPath=features.d"], r"nfd[./]hostPath"),
    (["nfd.expirySeconds=30"], r"nfd[./]expirySeconds"),
    (["nfd.models.0x100=STCP920"], r"0x100|nfd[./]models"),
    (["nfd.models.0x0100=STC P920"], r"nfd[./]models"),
    (["nfd.hpeVersionFile=../version"], r"nfd[./]hpeVersionFile"),
    (["nfd.hpeVersionFile=/version"], r"nfd[./]hpeVersionFile"),
]

# templates/validate.yaml: combinations the schema cannot express.
TEMPLATE_ERRORS = [
    (["extraEnv.STC_NPU_KUBELET_DIR=/x"], r"extraEnv\.STC_NPU_KUBELET_DIR: .*set kubeletDir"),
    (["extraEnv.STC_NPU_LOG_LEVEL=debug"], r"extraEnv\.STC_NPU_LOG_LEVEL: .*set logLevel"),
    (["extraEnv.STC_NPU_SYS_DIR=/x"], r"extraEnv\.STC_NPU_SYS_DIR: .*set sysDir"),
    (["podLabels.app\\.kubernetes\\.io/instance=x"], r"podLabels\.app\.kubernetes\.io/instance"),
    (["podLabels.helm\\.sh/chart=x"], r"podLabels\.helm\.sh/chart"),
    (["podAnnotations.checksum/config=x"], r"podAnnotations\.checksum/config"),
    (["resourceName=kubernetes.io/npu"], r"resourceName: .*kubernetes\.io domain is reserved"),
    (["resourceName=npu.kubernetes.io/x"], r"resourceName: .*kubernetes\.io domain is reserved"),
    (["resourceName=requests.example.com/npu"], r"resourceName: .*requests\."),
    (["probes.port=9836"], r"probes\.port: 9836 is the vendor's npu-exporter port"),
    (
        ["health.vendorProbe.enabled=true", "hpe.mode=unmapped"],
        r"health\.vendorProbe\.enabled: needs hpe\.mode mapped",
    ),
    (
        ["health.vendorProbe.enabled=true", "health.vendorProbe.timeoutSeconds=30"],
        r"health\.vendorProbe\.timeoutSeconds: 30 is longer than intervalSeconds 10",
    ),
    (
        ["deviceListStrategy={cdi-cri}", "resourceName=3com.example/npu"],
        r"deviceListStrategy: cdi-cri uses resourceName \"3com\.example/npu\" as the CDI kind",
    ),
    (
        ["deviceListStrategy={device-specs,cdi-cri}", "resourceName=example.com/2npu"],
        r"vendor and class must each start with a letter",
    ),
    (
        ["deviceListStrategy={cdi-cri}", "cdi.specDir=/var/lib/kubelet/device-plugins"],
        r"cdi\.specDir: .* overlaps \"/var/lib/kubelet/device-plugins\"",
    ),
    (["deviceListStrategy={cdi-cri}", "cdi.specDir=/host/dev/cdi"], r"cdi\.specDir: .*/host/dev"),
    (["deviceListStrategy={cdi-cri}", "cdi.specDir=/etc"], r"cdi\.specDir: .*/etc/stc-npu"),
    (["commonLabels.helm\\.sh/chart=x"], r"commonLabels\.helm\.sh/chart"),
    (["commonLabels.team=a", "podLabels.team=b"], r"podLabels\.team: also set in commonLabels"),
    (
        # 57 characters + ".shared" is 64: the kubelet would refuse the name.
        ["resourceName=example.com/" + "n" * 57, "sharing.replicas=2", "sharing.renameShared=true"],
        r"sharing\.renameShared: the shared resource \"example\.com/n+\.shared\" is longer than 63",
    ),
    (["mode=dra", "resourceName=3com.example/npu"], r"mode: dra uses resourceName .* CDI kind"),
    (
        ["registration=plugin-watcher", "pluginRegistryDir=/var/lib/kubelet/device-plugins/r"],
        r"pluginRegistryDir: .* overlaps \"/var/lib/kubelet/device-plugins\"",
    ),
    (["mode=dra", "cdi.specDir=/var/lib/kubelet/plugins_registry"], r"pluginRegistryDir: .*"),
    (["extraEnv.STC_NPU_NODE_NAME=n"], r"extraEnv\.STC_NPU_NODE_NAME: "),
    (["metrics.service.enabled=true"], r"metrics\.service\.enabled: needs metrics\.enabled"),
    (["metrics.podMonitor.enabled=true"], r"metrics\.podMonitor\.enabled: needs metrics\.enabled"),
    (
        ["metrics.enabled=true", "metrics.serviceMonitor.enabled=true"],
        r"metrics\.serviceMonitor\.enabled: needs metrics\.service\.enabled",
    ),
]


def _ids(cases: list[tuple[list[str], str]]) -> list[str]:
    return [",".join(sets) for sets, _ in cases]


@pytest.mark.parametrize(("sets", "names"), SCHEMA_ERRORS, ids=_ids(SCHEMA_ERRORS))
def test_schema_refuses(helm: str, sets: list[str], names: str) -> None:
    error = render_error(helm, sets)
    assert "values don't meet the specifications of the schema" in error
    assert re.search(names, error), error


@pytest.mark.parametrize(("sets", "message"), TEMPLATE_ERRORS, ids=_ids(TEMPLATE_ERRORS))
def test_validation_template_refuses(helm: str, sets: list[str], message: str) -> None:
    error = render_error(helm, sets)
    assert "stc-npu: invalid values:" in error
    assert re.search(message, error), error


def test_validation_template_lists_every_problem_at_once(helm: str) -> None:
    error = render_error(
        helm, ["probes.port=9836", "resourceName=kubernetes.io/npu", "extraEnv.STC_NPU_CONFIG=/x"]
    )
    assert len(re.findall(r"^  - ", error, re.MULTILINE)) == 3, error


def test_install_refuses_too(helm: str) -> None:
    # Install and upgrade validate the same way as template; install can be
    # shown without a cluster only by helm 4 (helm 3 needs one for --dry-run).
    if helm == "helm3":
        result = run_helm(helm, ["lint", str(CHART), "--set", "hpe.mode=bogus"])
    else:
        result = run_helm(
            helm,
            ["install", "stc-npu", str(CHART), "--dry-run=client", "--set", "hpe.mode=bogus"],
        )
    assert result.returncode != 0
    assert re.search(r"hpe[./]mode", result.stdout + result.stderr)


def test_an_empty_device_list_strategy_is_refused(helm: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("deviceListStrategy: []\n", encoding="utf-8")
    assert re.search(r"deviceListStrategy", render_error(helm, values_files=[values]))


def test_without_cdi_cri_the_spec_dir_is_not_checked(helm: str) -> None:
    # Not mounted, nothing written: any absolute path will do.
    run = run_helm(helm, ["template", "x", str(CHART), "--set", "cdi.specDir=/etc"])
    assert run.returncode == 0, run.stderr


def test_set_null_on_a_required_key_is_refused(helm: str) -> None:
    error = render_error(helm, ["image.tag=null"])
    assert re.search(r"tag", error), error


# --- values.yaml / values.schema.json / README.md drift ----------------------


def _check(chart: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "ci" / "chart_values.py"), "--chart", str(chart)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_values_schema_and_readme_agree() -> None:
    result = _check(CHART)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def chart_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "stc-npu"
    shutil.copytree(CHART, copy)
    return copy


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def test_drift_a_key_missing_from_the_schema(chart_copy: Path) -> None:
    _edit(
        chart_copy / "values.yaml",
        "logFormat: text\n",
        "logFormat: text\n\n# extra is new.\nextra: 1\n",
    )
    result = _check(chart_copy)
    assert result.returncode == 1
    assert "values.yaml: extra is not in values.schema.json" in result.stderr


def test_drift_a_schema_property_without_default(chart_copy: Path) -> None:
    _edit(chart_copy / "values.yaml", "  hostPath: /usr/local/hpe\n", "")
    result = _check(chart_copy)
    assert result.returncode == 1
    assert "values.schema.json: hpe.hostPath has no default in values.yaml" in result.stderr


def test_drift_an_undocumented_value(chart_copy: Path) -> None:
    _edit(chart_copy / "values.yaml", "# devDir is the host directory", "# The host directory")
    result = _check(chart_copy)
    assert result.returncode == 1
    assert "the comment of devDir must start with its name" in result.stderr


def test_drift_a_changed_comment_needs_a_regenerated_readme(chart_copy: Path) -> None:
    _edit(chart_copy / "values.yaml", "# logLevel is the agent's", "# logLevel is now the agent's")
    result = _check(chart_copy)
    assert result.returncode == 1
    assert "README.md is out of date" in result.stderr
    assert "values.schema.json is out of date" in result.stderr
    write = subprocess.run(
        [
            sys.executable,
            str(REPO / "ci" / "chart_values.py"),
            "--chart",
            str(chart_copy),
            "--write",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "wrote" in write.stdout
    assert _check(chart_copy).returncode == 0
    assert "logLevel is now the agent's" in (chart_copy / "README.md").read_text(encoding="utf-8")


# Object nodes left open on purpose: Kubernetes types whose inner fields the
# API server checks (the chart passes them through unchanged).
OPEN_KUBERNETES_OBJECTS = {
    "affinity.nodeAffinity",
    "affinity.podAffinity",
    "affinity.podAntiAffinity",
    "extraEnv.*.valueFrom",
    "extraVolumes",  # each item: a name and any volume source
    "global",  # Helm's own: a parent chart's globals, which the chart ignores
}


def _open_objects(node: dict[str, object], path: str, schema: dict[str, object]) -> list[str]:
    ref = node.get("$ref")
    if isinstance(ref, str):
        definitions = schema["definitions"]
        assert isinstance(definitions, dict)
        node = definitions[ref.rsplit("/", 1)[1]]
    found = []
    if node.get("type") == "object" and node.get("additionalProperties") is not False:
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):  # a map of user-chosen keys: check its values
            found += _open_objects(extra, f"{path}.*", schema)
        else:
            found.append(path)
    properties = node.get("properties", {})
    assert isinstance(properties, dict)
    for key, child in properties.items():
        found += _open_objects(child, f"{path}.{key}".lstrip("."), schema)
    for keyword in ("items", "anyOf"):
        sub = node.get(keyword)
        for child in sub if isinstance(sub, list) else [sub] if isinstance(sub, dict) else []:
            found += _open_objects(child, path, schema)
    return found


def test_schema_is_closed_at_every_chart_level() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    assert schema["additionalProperties"] is False
    assert set(_open_objects(schema, "", schema)) == OPEN_KUBERNETES_OBJECTS
