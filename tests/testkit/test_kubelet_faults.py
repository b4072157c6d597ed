"""The emulator's fault injection (hang, Register errors, event log), tested
against the small fake plugin of test_kubelet_emulator."""

from __future__ import annotations

import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from stc_npu_agent.v1beta1 import api_pb2, api_pb2_grpc

from .test_kubelet_emulator import NEW, RES, WAIT, Harness, register, registered


@pytest.fixture
def h() -> Iterator[Harness]:
    # Short path: unix socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="kube-"))
    harness = Harness(path / "device-plugins")
    yield harness
    harness.close()
    shutil.rmtree(path, ignore_errors=True)


def test_hang_leaves_a_socket_that_accepts_but_never_answers(h: Harness) -> None:
    kube, _ = registered(h)
    kube.stop(hang=True)
    assert stat.S_ISSOCK(kube.socket_path.stat().st_mode)
    assert not kube.running
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(WAIT)
        probe.connect(str(kube.socket_path))  # the kernel completes it
        probe.settimeout(0.3)
        with pytest.raises(TimeoutError):
            probe.recv(1)  # nobody ever answers
    with (
        grpc.insecure_channel(f"unix://{kube.socket_path}") as channel,
        pytest.raises(grpc.RpcError) as hung,
    ):
        api_pb2_grpc.RegistrationStub(channel).Register(
            api_pb2.RegisterRequest(version="v1beta1", endpoint="x", resource_name=RES),
            timeout=0.5,
        )
    assert hung.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert any("hung" in event for event in kube.events())

    kube.start()  # removes the wedged socket (and plugin sockets), serves again
    plugin = h.plugin("stc-2.sock").serve()
    register(kube, plugin.socket.name)
    assert kube.wait_registered(RES, after=1, timeout=WAIT).accepted


def test_hang_also_works_on_a_stopped_kubelet_and_close_removes_it(h: Harness) -> None:
    kube = h.kubelet(NEW)
    kube.stop()
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(str(kube.socket_path))  # stale
    kube.stop(hang=True)
    assert kube.socket_path.is_socket()
    with pytest.raises(ValueError, match="exclusive"):
        kube.stop(crash=True, hang=True)
    kube.close()
    assert not kube.socket_path.exists()


def test_fail_register_refuses_until_cleared(h: Harness) -> None:
    kube = h.kubelet(NEW)
    plugin = h.plugin().serve()
    kube.fail_register("injected: device manager busy")
    with pytest.raises(grpc.RpcError) as refused:
        register(kube, plugin.socket.name)
    assert refused.value.code() == grpc.StatusCode.UNKNOWN
    assert refused.value.details() == "injected: device manager busy"
    first = kube.registrations[0]
    assert not first.accepted
    assert first.error == "injected: device manager busy"
    assert plugin.options_calls == 0  # refused before dialing

    kube.fail_register(None)
    register(kube, plugin.socket.name)
    assert kube.wait_registered(RES, after=1, timeout=WAIT).accepted
    assert kube.allocatable(RES) == 2


def test_cut_offs_count_the_reregistration_bug(h: Harness) -> None:
    kube, first = registered(h, NEW, reregistration_bug=True)
    assert kube.cut_offs() == 0
    second = h.plugin("stc-2.sock").serve()
    register(kube, second.socket.name)  # while the old stream is still open
    kube.wait_registered(RES, after=1, timeout=WAIT)
    first.end_streams()  # late: after the new registration
    kube.wait_until(lambda: kube.cut_offs() == 1, timeout=WAIT, what="cut-off counted")
    assert any("reregistration bug" in event for event in kube.events())


def test_end_stream_marks_devices_unhealthy_and_never_reopens(h: Harness) -> None:
    kube, _ = registered(h)
    assert kube.allocatable(RES) == 2
    kube.end_stream(RES)
    kube.wait_until(lambda: not kube.stream_open(RES), timeout=WAIT, what="stream ended")
    assert kube.allocatable(RES) == 0
    assert kube.capacity(RES) == 2
    assert any("ended by the kubelet" in event for event in kube.events())
    with pytest.raises(RuntimeError, match="no open stream"):
        kube.end_stream(RES)
    assert len(kube.registrations) == 1  # only a new Register recovers


def test_hung_connections_pending_sees_a_waiting_connect(h: Harness) -> None:
    kube = h.kubelet(NEW)
    assert not kube.hung_connections_pending()  # nothing wedged
    kube.stop(hang=True)
    assert not kube.hung_connections_pending()
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(kube.socket_path))
        assert kube.hung_connections_pending()  # the kernel queued it at once
