"""The e2e image build (ci/e2e/images/build.py): the parts that decide names,
settings and contents, without building images (make e2e builds them)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from ci.e2e.images import build

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "chart" / "stc-npu"


@pytest.fixture
def chart(tmp_path: Path) -> Path:
    copy = tmp_path / "chart"
    copy.mkdir()
    for name in ("Chart.yaml", "values.yaml"):
        shutil.copy(CHART / name, copy / name)
    return copy


def edit_yaml(path: Path, dotted: str, value: str) -> None:
    data = yaml.safe_load(path.read_text())
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    path.write_text(yaml.safe_dump(data))


def test_agent_image_is_the_charts_repository_at_its_app_version(chart: Path) -> None:
    edit_yaml(chart / "values.yaml", "image.repository", "registry.test/renamed/agent")
    edit_yaml(chart / "Chart.yaml", "appVersion", "9.8.7")
    assert build.agent_image_name(chart) == "registry.test/renamed/agent:9.8.7"


def test_agent_image_takes_the_values_tag_when_one_is_set(chart: Path) -> None:
    edit_yaml(chart / "values.yaml", "image.tag", "custom-1")
    assert build.agent_image_name(chart).endswith(":custom-1")


def test_agent_image_with_a_digest_cannot_be_built_locally(chart: Path) -> None:
    edit_yaml(chart / "values.yaml", "image.digest", "sha256:" + "0" * 64)
    with pytest.raises(build.BuildError, match=r"values\.yaml: image\.digest is set"):
        build.agent_image_name(chart)


def test_test_image_is_the_charts_test_image(chart: Path) -> None:
    edit_yaml(chart / "values.yaml", "test.image.repository", "registry.test/tools/box")
    edit_yaml(chart / "values.yaml", "test.image.tag", "2.0")
    assert build.chart_test_image_name(chart) == "registry.test/tools/box:2.0"


def test_a_missing_chart_value_is_named_with_its_file(chart: Path) -> None:
    values = yaml.safe_load((chart / "values.yaml").read_text())
    del values["test"]["image"]["tag"]
    (chart / "values.yaml").write_text(yaml.safe_dump(values))
    with pytest.raises(build.BuildError, match=r"values\.yaml: no test\.image\.tag"):
        build.chart_test_image_name(chart)


POD = """\
apiVersion: v1
kind: Pod
metadata: {{name: p}}
spec:
  containers:
    - name: c
      image: {image}
"""


def test_workload_image_is_the_one_the_example_pods_run(tmp_path: Path) -> None:
    for name in ("example-pod.yaml", "example-pod-2npu.yaml"):
        (tmp_path / name).write_text(POD.format(image="registry.test/w:1"))
    assert build.example_pod_image(tmp_path) == "registry.test/w:1"


def test_example_pods_naming_different_images_are_refused(tmp_path: Path) -> None:
    (tmp_path / "example-pod.yaml").write_text(POD.format(image="registry.test/w:1"))
    (tmp_path / "example-pod-2npu.yaml").write_text(POD.format(image="registry.test/w:2"))
    with pytest.raises(build.BuildError, match=r"exactly one image, found .*w:1, .*w:2"):
        build.example_pod_image(tmp_path)


def test_every_example_pod_dir_names_its_image() -> None:
    for directory in ("pod-mapped", "pod-unmapped"):
        name = build.example_pod_image(REPO / "images" / directory)
        assert directory in name


def test_dockerfile_global_arg_defaults_are_expanded(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        "# syntax=docker/dockerfile:1\n"
        "ARG RELEASE=12\n"
        "ARG BASE=debian:${RELEASE}-slim\n"
        "FROM ${BASE}\n"
        "ARG LATE=stage-only\n"
    )
    assert build.dockerfile_arg_default(dockerfile, "BASE") == "debian:12-slim"
    with pytest.raises(build.BuildError, match="no global ARG LATE"):
        build.dockerfile_arg_default(dockerfile, "LATE")


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("busybox:1.37.0", "docker.io/library/busybox:1.37.0"),
        ("someone/tool:1", "docker.io/someone/tool:1"),
        ("ghcr.io/stc-npu/stc-npu-agent:0.1.0", "ghcr.io/stc-npu/stc-npu-agent:0.1.0"),
        ("localhost:5000/x:1", "localhost:5000/x:1"),
        ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10"),
    ],
)
def test_short_names_are_qualified_as_containerd_stores_them(name: str, stored: str) -> None:
    assert build.qualified(name) == stored


def test_agent_version_is_the_packages() -> None:
    import stc_npu_agent  # noqa: PLC0415

    assert build.agent_version(REPO) == stc_npu_agent.__version__


PIP_CONFIG_LIST = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///srv/missing/simple'
global.find-links='/opt/wheels'
"""


def test_pip_settings_become_one_config_and_read_only_paths() -> None:
    existing = {
        "/etc/ssl/certs/ca-certificates.crt",
        "/opt/wheels",
        "/etc/xdg/pip/constraints.txt",
        "/opt/pypi",
    }
    text, paths = build.pip_mounts(PIP_CONFIG_LIST, existing.__contains__)
    assert text.splitlines() == [
        "[global]",
        "cert = /etc/ssl/certs/ca-certificates.crt",
        "constraint = /etc/xdg/pip/constraints.txt",
        "default-timeout = 180",
        "extra-index-url = file:///opt/pypi/simple file:///srv/missing/simple",
        "find-links = /opt/wheels",
    ]
    # A local index comes with its parent (its files sit beside it); what
    # does not exist on this machine is not mounted.
    assert paths == sorted(existing)


def test_pip_without_a_cert_setting_gets_the_systems_trust_store() -> None:
    listing = "global.index-url='https://index.test/simple'\n"
    text, paths = build.pip_mounts(listing, {build.SYSTEM_CA_BUNDLE}.__contains__)
    assert f"cert = {build.SYSTEM_CA_BUNDLE}" in text.splitlines()
    assert paths == [build.SYSTEM_CA_BUNDLE]
    text, paths = build.pip_mounts(listing, lambda path: False)
    assert "cert" not in text
    assert paths == []


def test_pip_paths_inside_another_are_mounted_once() -> None:
    listing = "global.cert='/opt/ca.pem'\nglobal.find-links='/opt/wheels /opt/wheels/extra'\n"
    _, paths = build.pip_mounts(listing, lambda path: path != "/opt/ca.pem")
    assert paths == ["/opt/wheels"]


def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc/xdg/pip").mkdir(parents=True)
    (root / "etc/pip.conf").touch()  # the build's mount points, left empty
    (root / "etc/xdg/pip/constraints.txt").touch()
    (root / "etc/ssl/certs").mkdir(parents=True)
    (root / "etc/ssl/certs/ca-certificates.crt").write_text("the image's own bundle\n")
    (root / "opt/stc-npu-agent/lib/python3.11/site-packages/grpc").mkdir(parents=True)
    return root


def test_empty_mount_points_are_no_leak(tmp_path: Path) -> None:
    assert build._host_leaks(fake_root(tmp_path)) == []


def test_pip_settings_and_pip_left_in_an_image_are_found(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    (root / "etc/pip.conf").write_text("[global]\nindex-url = file:///somewhere\n")
    (root / "etc/xdg/pip/constraints.txt").write_text("torch<=2\n")
    (root / "opt/stc-npu-agent/lib/python3.11/site-packages/pip").mkdir()
    assert build._host_leaks(root) == [
        "a non-empty /etc/pip.conf",
        "pip settings in /etc/xdg/pip",
        "pip (the Dockerfile uninstalls it)",
    ]


def test_the_machines_ca_bundle_in_an_image_is_found(tmp_path: Path) -> None:
    host_bundle = Path(build.SYSTEM_CA_BUNDLE)
    if not host_bundle.is_file():
        pytest.skip(f"this machine has no CA bundle at {host_bundle}")
    root = fake_root(tmp_path)
    shutil.copy(host_bundle, root / "etc/ssl/certs/ca-certificates.crt")
    assert build._host_leaks(root) == ["this machine's CA bundle"]


def test_manifest_round_trip_and_bad_line(tmp_path: Path) -> None:
    images = [
        build.Image("agent", "ghcr.io/x/agent:1", "agent.tar"),
        build.Image("pause", build.PAUSE_IMAGE, "pause.tar"),
    ]
    build.write_manifest(tmp_path, images)
    assert build.read_manifest(tmp_path) == images
    (tmp_path / build.MANIFEST).write_text("agent ghcr.io/x/agent:1\n")
    with pytest.raises(build.BuildError, match=r"images\.txt:1: want ROLE NAME TARBALL"):
        build.read_manifest(tmp_path)


def test_vendor_wheel_stand_in_installs_and_says_what_it_is(tmp_path: Path) -> None:
    wheel = tmp_path / f"tb_debian12-{build.VENDOR_VERSION}-cp311-cp311-linux_x86_64.whl"
    build._wheel(wheel, "tb_debian12")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.testzip() is None
    target = tmp_path / "site"
    offline = ["--quiet", "--isolated", "--no-index", "--no-deps"]
    subprocess.run(
        [sys.executable, "-m", "pip", "install", *offline, "--target", str(target), str(wheel)],
        check=True,
    )
    probe = "import tensorturbo; print(tensorturbo.__version__, tensorturbo.STAND_IN)"
    ran = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert ran.stdout.split() == [build.VENDOR_VERSION, "True"]


@pytest.fixture(scope="module")
def pause_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (ci/e2e/images/build.py installs it)")
    binary = tmp_path_factory.mktemp("pause") / "pause"
    subprocess.run(
        ["gcc", "-static", "-Wall", "-Werror", "-o", str(binary), str(build.HERE / "pause.c")],
        check=True,
    )
    return binary


def wait_until_sleeping(pid: int) -> None:
    """Until the process sits in pause() (its handlers are installed by then)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "S":
            return
        time.sleep(0.01)
    raise AssertionError(f"pause (pid {pid}) never went to sleep")


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT])
def test_pause_exits_0_on_stop_signals(pause_binary: Path, signo: signal.Signals) -> None:
    process = subprocess.Popen([str(pause_binary)])
    wait_until_sleeping(process.pid)
    process.send_signal(signo)
    assert process.wait(timeout=30) == 0


def test_pause_keeps_waiting_through_a_child_exit(pause_binary: Path) -> None:
    process = subprocess.Popen([str(pause_binary)])
    try:
        wait_until_sleeping(process.pid)
        process.send_signal(signal.SIGCHLD)
        wait_until_sleeping(process.pid)
        assert process.poll() is None
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


def buildah_names() -> set[str]:
    listed = subprocess.run(
        ["buildah", "containers", "--format", "{{.ContainerName}}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(listed.stdout.split())


def test_working_containers_of_a_killed_build_are_removed() -> None:
    if shutil.which("buildah") is None:
        pytest.skip("buildah is not installed (ci/e2e/images/build.py installs it)")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = f"{build.CONTAINER_PREFIX}{gone.pid}-1"
    subprocess.run(["buildah", "from", "--name", stale, "scratch"], capture_output=True, check=True)
    with build.working_container("scratch") as live:
        assert stale in build.remove_stale_containers(set())
        assert live in buildah_names()
        assert stale not in buildah_names()
    assert live not in buildah_names()
