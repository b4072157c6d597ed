"""The parts of the e2e harness that read what the real components write:
klog lines of both kubelet generations, devices.list, mountinfo, the state
file's process identity. (The harness itself runs in `make e2e`.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from ci.e2e import cluster

from tests.e2e import kit

V136_LINES = """\
I1206 03:26:53.836898   12954 server.go:87] "Starting device plugin registration server"
I1206 03:26:53.900000   99999 server.go:161] "Got registration request from device plugin with resource" resourceName="streamcomputing.com/npu"
I1206 03:26:54.669000   12954 server.go:161] "Got registration request from device plugin with resource" resourceName="other.com/gpu"
I1206 03:26:54.670123   12954 server.go:161] "Got registration request from device plugin with resource" resourceName="streamcomputing.com/npu"
"""  # noqa: E501
V123_LINES = """\
I1206 03:42:16.987579   18862 ??? manager.go:289] "Serving device plugin registration server on socket" path="/var/lib/kubelet/device-plugins/kubelet.sock"
I1206 03:42:22.000000   18862 ??? manager.go:422] "Got registration request from device plugin with resource" resourceName="streamcomputing.com/npu"
"""  # noqa: E501


@pytest.fixture
def log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(kit, "LOG_DIR", tmp_path)
    return tmp_path


def test_registration_delay_reads_the_v136_kubelet_log_of_that_pid_only(log_dir: Path) -> None:
    (log_dir / "kubelet.log").write_text("===== start 03:26:53: kubelet\n" + V136_LINES)
    delay, _, _ = kit.registration_delay(
        12954,
        "Starting device plugin registration server",
        "Got registration request from device plugin with resource",
        "streamcomputing.com/npu",
    )
    # Not the other pid's line, not the other resource's.
    assert delay == pytest.approx(0.833225)


def test_registration_delay_reads_the_v123_klog_format(log_dir: Path) -> None:
    (log_dir / "kubelet-1.23.log").write_text(V123_LINES)
    delay, _, _ = kit.registration_delay(
        18862,
        "Serving device plugin registration server on socket",
        "Got registration request from device plugin with resource",
        "streamcomputing.com/npu",
        "kubelet-1.23",
    )
    assert delay == pytest.approx(5.012421)


def test_registration_delay_without_a_register_yet_is_a_lookup_error(log_dir: Path) -> None:
    (log_dir / "kubelet.log").write_text(V136_LINES.splitlines()[0] + "\n")
    with pytest.raises(LookupError):
        kit.registration_delay(
            12954, "Starting device plugin registration server", "Got registration", "x/y"
        )


def test_allowed_npu_minors_reads_only_the_npu_major() -> None:
    devices_list = "c 1:3 rwm\nc 240:8 rw\nc 240:13 rw\nc *:* m\nb *:* m\nc 2400:1 rw\n"
    assert kit.allowed_npu_minors(devices_list) == {8, 13}


def test_allowed_npu_minors_refuses_a_wildcard_minor() -> None:
    with pytest.raises(AssertionError, match="every minor"):
        kit.allowed_npu_minors("c 240:* rwm\n")


def test_npu_node_names() -> None:
    assert kit.npu_node_names(["stc2"]) == {
        "stc2", "stc2c0", "stc2c1", "stc2c2", "stc2c3", "stc2ctrl",
    }  # fmt: skip


def test_a_process_is_known_by_pid_and_start_time() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = cluster.start_time_of(child.pid)
        assert start is not None
        assert cluster.is_running(child.pid, start)
        # The same pid with another start time is another process: never signalled.
        assert not cluster.is_running(child.pid, str(int(start) + 1))
    finally:
        child.kill()
        child.wait()
    assert not cluster.is_running(child.pid, start)


def test_mounts_under_lists_deepest_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "40 27 0:1 / /run/x rw - tmpfs t rw\n"
        "41 40 0:2 / /run/x/a/b rw - tmpfs t rw\n"
        "42 40 0:3 / /run/xy rw - tmpfs t rw\n"
        "43 40 0:4 / /run/x/a rw - tmpfs t rw\n"
    )
    real_path = Path

    def fake_path(*parts: str) -> Path:
        return mountinfo if parts == ("/proc/self/mountinfo",) else real_path(*parts)

    monkeypatch.setattr(cluster, "Path", fake_path)
    assert cluster.mounts_under([real_path("/run/x")]) == ["/run/x/a/b", "/run/x/a", "/run/x"]
