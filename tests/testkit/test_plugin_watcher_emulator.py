"""The kubelet emulator's plugin watcher, on its own: a fake plugin serving
the registration API next to a fake device plugin, on one socket."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from stc_npu_agent.pluginregistration import api_pb2 as registration_pb2
from stc_npu_agent.pluginregistration import api_pb2_grpc as registration_grpc
from stc_npu_agent.testing.kubelet import KubeletEmulator
from stc_npu_agent.v1beta1 import api_pb2_grpc

from .test_kubelet_emulator import RES, WAIT, FakePlugin

TIMEOUT = 10.0


class FakeRegistration(registration_grpc.RegistrationServicer):
    def __init__(self, endpoint: Path, plugin_type: str = "DevicePlugin") -> None:
        self.endpoint = endpoint
        self.plugin_type = plugin_type
        self.info_calls = 0
        self.statuses: list[tuple[bool, str]] = []
        self._cond = threading.Condition()

    def GetInfo(
        self, request: registration_pb2.InfoRequest, context: grpc.ServicerContext
    ) -> registration_pb2.PluginInfo:
        with self._cond:
            self.info_calls += 1
        return registration_pb2.PluginInfo(
            type=self.plugin_type,
            name=RES,
            endpoint=str(self.endpoint),
            supported_versions=["v1beta1"],
        )

    def NotifyRegistrationStatus(
        self, request: registration_pb2.RegistrationStatus, context: grpc.ServicerContext
    ) -> registration_pb2.RegistrationStatusResponse:
        with self._cond:
            self.statuses.append((request.plugin_registered, request.error))
            self._cond.notify_all()
        return registration_pb2.RegistrationStatusResponse()

    def wait_status(self, count: int = 1) -> tuple[bool, str]:
        """The latest status, once ``count`` have come (sent after the registration)."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.statuses) >= count, timeout=TIMEOUT):
                raise TimeoutError(f"fewer than {count} NotifyRegistrationStatus calls")
            return self.statuses[-1]


@pytest.fixture
def dirs() -> Iterator[tuple[Path, Path]]:
    root = Path(tempfile.mkdtemp(prefix="kube-"))
    yield root / "device-plugins", root / "plugins_registry"
    shutil.rmtree(root, ignore_errors=True)


def serve(path: Path, registration: FakeRegistration, plugin: FakePlugin) -> grpc.Server:
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    registration_grpc.add_RegistrationServicer_to_server(registration, server)
    api_pb2_grpc.add_DevicePluginServicer_to_server(plugin, server)
    server.add_insecure_port(f"unix://{path}")
    server.start()
    return server


def test_dot_files_are_ignored_until_renamed(dirs: tuple[Path, Path]) -> None:
    plugin_dir, registry = dirs
    registry.mkdir(parents=True)
    final = registry / "fake.sock"
    hidden = registry / ".fake.sock"
    registration = FakeRegistration(final)
    server = serve(hidden, registration, FakePlugin(registry, "unused"))
    try:
        with KubeletEmulator(plugin_dir, plugin_registry_dir=registry) as kube:
            # The watcher looks every 10 ms: 30 looks at the dot-file, none asks it.
            threading.Event().wait(0.3)
            assert registration.info_calls == 0
            hidden.rename(final)
            assert registration.wait_status() == (True, "")
            reg = kube.wait_registered(RES, timeout=WAIT)
            assert reg.endpoint == str(final)
            assert kube.allocatable(RES) == 2
    finally:
        server.stop(grace=None).wait()


def test_other_plugin_types_are_refused_through_the_status(dirs: tuple[Path, Path]) -> None:
    plugin_dir, registry = dirs
    registry.mkdir(parents=True)
    path = registry / "csi.sock"
    registration = FakeRegistration(path, plugin_type="CSIPlugin")
    server = serve(path, registration, FakePlugin(registry, "unused"))
    try:
        with KubeletEmulator(plugin_dir, plugin_registry_dir=registry) as kube:
            registered, error = registration.wait_status()
            assert not registered
            assert "CSIPlugin" in error
            assert kube.registrations == []
    finally:
        server.stop(grace=None).wait()


def test_a_restart_finds_the_socket_again_and_removal_ends_the_stream(
    dirs: tuple[Path, Path],
) -> None:
    plugin_dir, registry = dirs
    registry.mkdir(parents=True)
    path = registry / "fake.sock"
    registration = FakeRegistration(path)
    plugin = FakePlugin(registry, "unused")
    server = serve(path, registration, plugin)
    try:
        with KubeletEmulator(plugin_dir, plugin_registry_dir=registry) as kube:
            first = kube.wait_registered(RES, timeout=WAIT)
            kube.restart()
            second = kube.wait_registered(RES, after=first.index + 1, timeout=WAIT)
            assert second.endpoint == first.endpoint
            registration.wait_status(count=2)
            assert [ok for ok, _ in registration.statuses] == [True, True]
            path.unlink()
            kube.wait_until(lambda: not kube.stream_open(RES), what="stream closed")
            assert kube.allocatable(RES) == 0
    finally:
        server.stop(grace=None).wait()
