"""KubeletEmulator, tested on its own against a small fake plugin."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from stc_npu_agent.testing.kubelet import (
    Device,
    KubeletEmulator,
    Options,
    parse_version,
    resource_name_error,
)
from stc_npu_agent.v1beta1 import api_pb2, api_pb2_grpc

RES = "streamcomputing.com/npu"
OLD = "1.22"
NEW = "1.32"
# Deadlines only: never asserted on.
WAIT = 5.0
SHORT_DIAL = 0.3


def dev(id_: str, health: str = "Healthy", numa: int | None = 0) -> api_pb2.Device:
    d = api_pb2.Device(ID=id_, health=health)
    if numa is not None:
        d.topology.nodes.add(ID=numa)
    return d


class FakePlugin(api_pb2_grpc.DevicePluginServicer):
    """A minimal device plugin on a real unix socket."""

    def __init__(
        self,
        plugin_dir: Path,
        name: str,
        *,
        devices: list[api_pb2.Device] | None = None,
        options: Options | None = None,
    ) -> None:
        self.socket = plugin_dir / name
        self.options = options or Options()
        self.fail_allocate = False
        self.allocate_requests: list[list[str]] = []
        self.preferred_requests: list[api_pb2.ContainerPreferredAllocationRequest] = []
        self.pre_start_requests: list[list[str]] = []
        self.options_calls = 0
        self.streams_opened = 0
        self.streams_cancelled = 0
        self._cond = threading.Condition()
        self._devices = list(devices if devices is not None else [dev("d0"), dev("d1")])
        self._version = 0
        self._end_generation = 0
        self._server: grpc.Server | None = None

    # -- control ---------------------------------------------------------
    def serve(self) -> FakePlugin:
        server = grpc.server(ThreadPoolExecutor(max_workers=8))
        api_pb2_grpc.add_DevicePluginServicer_to_server(self, server)
        server.add_insecure_port(f"unix://{self.socket}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def set_devices(self, devices: list[api_pb2.Device]) -> None:
        with self._cond:
            self._devices = list(devices)
            self._version += 1
            self._cond.notify_all()

    def end_streams(self) -> None:
        with self._cond:
            self._end_generation += 1
            self._cond.notify_all()

    def wait(self, predicate: Callable[[], bool], what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout=WAIT):
                raise TimeoutError(what)

    # -- DevicePlugin ----------------------------------------------------
    def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> api_pb2.DevicePluginOptions:
        with self._cond:
            self.options_calls += 1
        return api_pb2.DevicePluginOptions(
            pre_start_required=self.options.pre_start_required,
            get_preferred_allocation_available=self.options.get_preferred_allocation_available,
        )

    def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.ServicerContext
    ) -> Iterator[api_pb2.ListAndWatchResponse]:
        def wake() -> None:
            with self._cond:
                self._cond.notify_all()

        context.add_callback(wake)
        with self._cond:
            self.streams_opened += 1
            end_at = self._end_generation
            self._cond.notify_all()
        sent = -1

        def ready() -> bool:
            return (
                self._version != sent or self._end_generation != end_at or not context.is_active()
            )

        while True:
            with self._cond:
                self._cond.wait_for(ready)
                if not context.is_active():
                    self.streams_cancelled += 1
                    self._cond.notify_all()
                    return
                if self._end_generation != end_at:
                    return
                sent = self._version
                response = api_pb2.ListAndWatchResponse(devices=self._devices)
            yield response

    def GetPreferredAllocation(
        self, request: api_pb2.PreferredAllocationRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreferredAllocationResponse:
        req = request.container_requests[0]
        self.preferred_requests.append(req)
        chosen = list(req.must_include_deviceIDs)
        chosen += [i for i in req.available_deviceIDs if i not in chosen]
        return api_pb2.PreferredAllocationResponse(
            container_responses=[
                api_pb2.ContainerPreferredAllocationResponse(
                    deviceIDs=chosen[: req.allocation_size]
                )
            ]
        )

    def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.ServicerContext
    ) -> api_pb2.AllocateResponse:
        ids = list(request.container_requests[0].devices_ids)
        self.allocate_requests.append(ids)
        if self.fail_allocate:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown device {ids[0]}")
        return api_pb2.AllocateResponse(
            container_responses=[api_pb2.ContainerAllocateResponse(envs={"IDS": ",".join(ids)})]
        )

    def PreStartContainer(
        self, request: api_pb2.PreStartContainerRequest, context: grpc.ServicerContext
    ) -> api_pb2.PreStartContainerResponse:
        self.pre_start_requests.append(list(request.devices_ids))
        return api_pb2.PreStartContainerResponse()


def register(
    kube: KubeletEmulator,
    endpoint: str,
    *,
    resource: str = RES,
    version: str = "v1beta1",
    options: Options | None = None,
) -> None:
    options = options or Options()
    with grpc.insecure_channel(f"unix://{kube.socket_path}") as channel:
        api_pb2_grpc.RegistrationStub(channel).Register(
            api_pb2.RegisterRequest(
                version=version,
                endpoint=endpoint,
                resource_name=resource,
                options=api_pb2.DevicePluginOptions(
                    pre_start_required=options.pre_start_required,
                    get_preferred_allocation_available=options.get_preferred_allocation_available,
                ),
            ),
            timeout=WAIT,
        )


@pytest.fixture
def plugin_dir() -> Iterator[Path]:
    # Short path: unix socket paths are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="kube-"))
    yield path / "device-plugins"
    shutil.rmtree(path, ignore_errors=True)


class Harness:
    def __init__(self, plugin_dir: Path) -> None:
        self.dir = plugin_dir
        self.kubelets: list[KubeletEmulator] = []
        self.plugins: list[FakePlugin] = []

    def kubelet(
        self, version: str = NEW, *, reregistration_bug: bool = False, dial_timeout: float = 10.0
    ) -> KubeletEmulator:
        kube = KubeletEmulator(
            self.dir,
            version=version,
            reregistration_bug=reregistration_bug,
            dial_timeout=dial_timeout,
        )
        self.kubelets.append(kube)
        kube.start()
        return kube

    def plugin(
        self,
        name: str = "stc.sock",
        *,
        devices: list[api_pb2.Device] | None = None,
        options: Options | None = None,
    ) -> FakePlugin:
        plugin = FakePlugin(self.dir, name, devices=devices, options=options)
        self.plugins.append(plugin)
        return plugin

    def close(self) -> None:
        for kube in self.kubelets:
            kube.close()
        for plugin in self.plugins:
            plugin.stop()


@pytest.fixture
def h(plugin_dir: Path) -> Iterator[Harness]:
    harness = Harness(plugin_dir)
    yield harness
    harness.close()


def registered(
    h: Harness, version: str = NEW, *, reregistration_bug: bool = False
) -> tuple[KubeletEmulator, FakePlugin]:
    """A kubelet with one fake plugin registered and streaming."""
    kube = h.kubelet(version, reregistration_bug=reregistration_bug)
    plugin = h.plugin().serve()
    register(kube, plugin.socket.name)
    kube.wait_registered(RES, timeout=WAIT)
    return kube, plugin


# --- start ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "kept"),
    [
        # Up to 1.30: every non-directory entry but the checkpoint goes.
        ("1.22", ["kubelet.sock", "kubelet_internal_checkpoint", "sub"]),
        ("1.30", ["kubelet.sock", "kubelet_internal_checkpoint", "sub"]),
        # From 1.31: sockets only (a symlink to one counts: stat follows it).
        ("1.31", ["DEPRECATION", "kubelet.sock", "kubelet_internal_checkpoint", "notes", "sub"]),
    ],
)
def test_start_cleans_the_plugin_dir(plugin_dir: Path, version: str, kept: list[str]) -> None:
    plugin_dir.mkdir(parents=True)
    (plugin_dir / "notes").write_text("")
    for name in ("real.sock", "kubelet.sock"):  # a plugin's, a stopped kubelet's
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(plugin_dir / name))
    (plugin_dir / "DEPRECATION").write_text("")
    (plugin_dir / "sub").mkdir()
    (plugin_dir / "sub" / "keep.sock").write_text("")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(plugin_dir / "sub" / "target.sock"))
    os.symlink("sub/target.sock", plugin_dir / "link")
    os.symlink("missing.sock", plugin_dir / "dangling")
    checkpoint: dict[str, object] = {"Data": {"RegisteredDevices": {}, "PodDeviceEntries": []}}
    (plugin_dir / "kubelet_internal_checkpoint").write_text(json.dumps(checkpoint))

    with KubeletEmulator(plugin_dir, version=version) as kube:
        names = sorted(p.name for p in plugin_dir.iterdir())
        # Dangling symlinks stay (stat fails); 1.18-1.25 make DEPRECATION again.
        expected = sorted(
            {*kept, "dangling"} | ({"DEPRECATION"} if kube.generation == "old" else set())
        )
        assert names == expected
        assert (plugin_dir / "sub" / "keep.sock").exists()
        assert stat.S_ISSOCK(os.stat(kube.socket_path).st_mode)


@pytest.mark.parametrize(
    ("version", "expected"), [("1.18", True), ("1.25", True), ("1.26", False), ("1.32", False)]
)
def test_deprecation_file_on_old_generation_only(h: Harness, version: str, expected: bool) -> None:
    kube = h.kubelet(version)
    deprecation = h.dir / "DEPRECATION"
    assert deprecation.exists() is expected
    if expected:
        assert deprecation.read_text() == ""
        # Created again on every start.
        kube.restart()
        assert deprecation.exists()
    assert kube.generation == ("old" if expected else "new")


# --- Register ------------------------------------------------------------


def test_old_generation_answers_before_dialing(h: Harness) -> None:
    kube = h.kubelet(OLD, dial_timeout=SHORT_DIAL)
    register(kube, "absent.sock")  # nobody serves it: Register still succeeds
    kube.wait_until(
        lambda: kube.registrations[0].error is not None, timeout=WAIT, what="dial failure"
    )
    reg = kube.registrations[0]
    assert reg.accepted
    assert reg.generation == "old"
    assert reg.error is not None
    assert "dial" in reg.error
    assert not kube.stream_open(RES)
    assert kube.devices(RES) == {}


def test_old_generation_takes_options_from_the_request(h: Harness) -> None:
    kube = h.kubelet(OLD)
    plugin = h.plugin(options=Options(True, True)).serve()
    register(kube, plugin.socket.name, options=Options(False, False))
    reg = kube.wait_registered(RES, timeout=WAIT)
    assert reg.options == Options(False, False)
    assert kube.options(RES) == Options(False, False)
    assert plugin.options_calls == 0
    with pytest.raises(RuntimeError, match="GetPreferredAllocation"):
        kube.get_preferred_allocation(RES, ["d0", "d1"], [], 1)


def test_new_generation_dials_first_and_fails_register(h: Harness) -> None:
    kube = h.kubelet(NEW, dial_timeout=SHORT_DIAL)
    with pytest.raises(grpc.RpcError) as err:
        register(kube, "absent.sock")
    assert err.value.code() == grpc.StatusCode.UNKNOWN
    reg = kube.registrations[0]
    assert not reg.accepted
    assert reg.generation == "new"
    assert reg.error is not None
    assert "absent.sock" in reg.error


def test_new_generation_takes_options_from_the_plugin(h: Harness) -> None:
    kube = h.kubelet(NEW)
    plugin = h.plugin(options=Options(True, True)).serve()
    register(kube, plugin.socket.name, options=Options(False, False))
    reg = kube.wait_registered(RES, timeout=WAIT)
    assert plugin.options_calls == 1
    assert reg.options == Options(True, True)
    assert reg.requested_options == Options(False, False)
    assert kube.options(RES) == Options(True, True)
    assert kube.get_preferred_allocation(RES, ["d1", "d0"], [], 1) == ["d1"]


@pytest.mark.parametrize("version", [OLD, NEW])
@pytest.mark.parametrize(
    "resource",
    [
        "npu",
        "kubernetes.io/npu",
        "stc.kubernetes.io/npu",
        "requests.example.com/npu",
        "Example.com/npu",
        "example.com/" + "n" * 64,
        "example.com/-npu",
        "example.com/a/b",
    ],
)
def test_invalid_resource_names_are_refused(h: Harness, version: str, resource: str) -> None:
    kube = h.kubelet(version)
    with pytest.raises(grpc.RpcError) as err:
        register(kube, "x.sock", resource=resource)
    assert err.value.code() == grpc.StatusCode.UNKNOWN
    assert err.value.details() == f'the ResourceName "{resource}" is invalid'
    assert not kube.registrations[0].accepted


@pytest.mark.parametrize("version", [OLD, NEW])
def test_invalid_version_is_refused(h: Harness, version: str) -> None:
    kube = h.kubelet(version)
    with pytest.raises(grpc.RpcError) as err:
        register(kube, "x.sock", version="v1alpha1")
    assert err.value.code() == grpc.StatusCode.UNKNOWN
    details = err.value.details()
    assert details is not None
    assert "invalid version" in details
    assert "v1alpha1" in details


def test_resource_name_and_version_helpers() -> None:
    assert resource_name_error("streamcomputing.com/npu") is None
    assert resource_name_error("example.com/" + "n" * 63) is None
    assert resource_name_error("npu") is not None
    assert parse_version("1.26") == (1, 26)
    assert parse_version("v1.25.3") == (1, 25)
    with pytest.raises(ValueError, match="minor >= 18"):
        parse_version("1.17")
    with pytest.raises(ValueError, match=r"1\.26"):
        KubeletEmulator(Path("/nonexistent"), version=OLD, reregistration_bug=True)


# --- ListAndWatch --------------------------------------------------------


@pytest.mark.parametrize("version", [OLD, NEW])
def test_first_list_and_updates_replace_the_list(h: Harness, version: str) -> None:
    kube, plugin = registered(h, version)
    assert kube.devices(RES) == {
        "d0": Device("d0", "Healthy", (0,)),
        "d1": Device("d1", "Healthy", (0,)),
    }
    assert (kube.capacity(RES), kube.allocatable(RES)) == (2, 2)

    plugin.set_devices([dev("d0"), dev("d1", "Unhealthy"), dev("d2", numa=None)])
    kube.wait_until(lambda: kube.capacity(RES) == 3, timeout=WAIT, what="3 devices")
    assert kube.allocatable(RES) == 2
    assert kube.devices(RES)["d2"].numa_nodes == ()

    plugin.set_devices([dev("d2", "unhealthy")])  # only the exact "Healthy" counts
    kube.wait_until(lambda: set(kube.devices(RES)) == {"d2"}, timeout=WAIT, what="only d2")
    assert (kube.capacity(RES), kube.allocatable(RES)) == (1, 0)

    history = kube.updates(RES)
    assert [sorted(d) for _, d in history] == [["d0", "d1"], ["d0", "d1", "d2"], ["d2"]]
    times = [t for t, _ in history]
    assert times == sorted(times)
    assert plugin.streams_opened == 1


def test_stream_end_marks_unhealthy_and_is_never_reopened(h: Harness) -> None:
    kube, plugin = registered(h)
    assert kube.stream_open(RES)
    plugin.end_streams()
    kube.wait_until(lambda: not kube.stream_open(RES), timeout=WAIT, what="stream end")
    assert kube.allocatable(RES) == 0
    assert kube.capacity(RES) == 2
    assert all(d.health == "Unhealthy" for d in kube.devices(RES).values())
    with pytest.raises(RuntimeError, match="stopped"):
        kube.allocate(RES, ["d0"])
    time.sleep(0.3)  # room for a wrong reopen to show up; not a timing assertion
    assert plugin.streams_opened == 1
    assert not kube.stream_open(RES)

    # Only a new Register recovers.
    before = len(kube.registrations)
    register(kube, plugin.socket.name)
    kube.wait_registered(RES, after=before, timeout=WAIT)
    assert plugin.streams_opened == 2
    assert kube.allocatable(RES) == 2


@pytest.mark.parametrize("version", [OLD, NEW])
def test_new_registration_keeps_the_old_stream_open_and_counting(h: Harness, version: str) -> None:
    """1.18 to 1.37: the new registration becomes the endpoint, but the old
    stream stays open and its updates still replace the resource's list."""
    kube, first = registered(h, version)
    second = h.plugin("stc-2.sock", devices=[dev("e0"), dev("e1"), dev("e2")]).serve()
    register(kube, second.socket.name)
    reg = kube.wait_registered(RES, after=1, timeout=WAIT)
    assert reg.endpoint == "stc-2.sock"
    kube.wait_until(lambda: set(kube.devices(RES)) == {"e0", "e1", "e2"}, timeout=WAIT)
    assert first.streams_cancelled == 0
    assert first.streams_opened == 1
    assert kube.open_streams(RES) == 2

    first.set_devices([dev("d9")])  # the old plugin still speaks for the resource
    kube.wait_until(lambda: set(kube.devices(RES)) == {"d9"}, timeout=WAIT, what="old update")
    assert kube.allocate(RES, ["e1"]).envs["IDS"] == "e1"  # the endpoint is the new one
    assert second.allocate_requests == [["e1"]]
    assert first.allocate_requests == []

    # The old stream's end does not touch the new registration (no bug).
    first.end_streams()
    kube.wait_until(
        lambda: any("stream #0" in event for event in kube.events()), timeout=WAIT, what="end"
    )
    assert kube.stream_open(RES)
    assert kube.open_streams(RES) == 1
    assert kube.allocatable(RES) == 1
    second.set_devices([dev("e0"), dev("e1")])
    kube.wait_until(lambda: kube.allocatable(RES) == 2, timeout=WAIT, what="new update")
    assert kube.cut_offs() == 0


def test_reregistration_bug_cuts_off_the_new_registration(h: Harness) -> None:
    kube, first = registered(h, NEW, reregistration_bug=True)
    second = h.plugin("stc-2.sock").serve()
    register(kube, second.socket.name)  # while the old stream is still open
    kube.wait_registered(RES, after=1, timeout=WAIT)
    assert kube.stream_open(RES)  # nothing happens while the old stream lives
    first.end_streams()  # ... its end cuts off registration #1
    kube.wait_until(lambda: not kube.stream_open(RES), timeout=WAIT, what="cut-off")
    assert kube.cut_offs() == 1
    assert kube.registrations[1].accepted
    assert kube.allocatable(RES) == 0
    with pytest.raises(KeyError):
        kube.options(RES)
    with pytest.raises(RuntimeError):
        kube.allocate(RES, ["d0"])
    second.wait(lambda: second.streams_cancelled == 1, "the cut-off closed the new connection")

    # The defence: end the old stream first, then register: no cut-off.
    third = h.plugin("stc-3.sock").serve()
    register(kube, third.socket.name)
    kube.wait_registered(RES, after=2, timeout=WAIT)
    third.end_streams()
    kube.wait_until(lambda: not kube.stream_open(RES), timeout=WAIT, what="third ended")
    fourth = h.plugin("stc-4.sock").serve()
    register(kube, fourth.socket.name)
    kube.wait_registered(RES, after=3, timeout=WAIT)
    time.sleep(0.2)  # room for a wrong tear-down to show up; not a timing assertion
    assert kube.stream_open(RES)
    assert kube.allocatable(RES) == 2
    assert kube.cut_offs() == 1


def test_reregistration_bug_hits_the_client_of_a_register_still_dialing(h: Harness) -> None:
    """1.26+ map the name to the new client when Register arrives: an old
    stream ending during the new Register's dial disconnects that client.
    Its endpoint is installed after the dial all the same (no cut-off), but
    the name stays unmapped, so the end of ITS stream goes unnoticed."""
    kube, first = registered(h, NEW, reregistration_bug=True)
    second = h.plugin("stc-2.sock", devices=[dev("e0")])  # not serving yet
    dialing = threading.Thread(target=register, args=(kube, second.socket.name))
    dialing.start()
    kube.wait_until(
        lambda: any("dialing stc-2.sock" in event for event in kube.events()),
        timeout=WAIT,
        what="the second Register dialing",
    )
    first.end_streams()
    kube.wait_until(lambda: kube.allocatable(RES) == 0, timeout=WAIT, what="disconnected")
    second.serve()
    dialing.join(WAIT)
    kube.wait_registered(RES, after=1, timeout=WAIT)
    assert kube.stream_open(RES)
    assert kube.allocatable(RES) == 1
    assert kube.cut_offs() == 0
    second.end_streams()  # unnoticed: the name maps to no client
    kube.wait_until(lambda: not kube.stream_open(RES), timeout=WAIT, what="stream #1 ended")
    assert kube.allocatable(RES) == 1


# --- restarts --------------------------------------------------------------


@pytest.mark.parametrize("crash", [False, True])
def test_restart_deletes_plugin_sockets_and_keeps_checkpoint(h: Harness, crash: bool) -> None:
    kube, plugin = registered(h)
    kube.allocate(RES, ["d1"])
    kube.restart(crash=crash)
    assert not plugin.socket.exists()
    assert not kube.stream_open(RES)
    plugin.wait(lambda: plugin.streams_cancelled == 1, "stream dropped by the restart")
    assert RES in kube.resources()
    assert (kube.capacity(RES), kube.allocatable(RES)) == (0, 0)
    assert kube.assignments(RES) == [("d1",)]
    data = json.loads(kube.checkpoint_path.read_text())["Data"]
    assert sorted(data["RegisteredDevices"][RES]) == ["d0", "d1"]
    assert data["PodDeviceEntries"] == [{"ResourceName": RES, "DeviceIDs": ["d1"]}]

    plugin.stop()
    plugin.serve()  # the plugin notices and serves again
    before = len(kube.registrations)
    register(kube, plugin.socket.name)
    kube.wait_registered(RES, after=before, timeout=WAIT)
    assert kube.allocatable(RES) == 2


@pytest.mark.parametrize("crash", [False, True])
def test_every_stop_leaves_a_stale_socket_that_refuses_connections(h: Harness, crash: bool) -> None:
    kube, _ = registered(h)
    serving = os.stat(kube.socket_path).st_ino
    kube.stop(crash=crash)
    assert stat.S_ISSOCK(os.lstat(kube.socket_path).st_mode)
    assert os.stat(kube.socket_path).st_ino == serving  # the same file, left behind
    assert sorted(p.name for p in h.dir.iterdir() if p.name.startswith(".")) == []
    with socket.socket(socket.AF_UNIX) as s, pytest.raises(ConnectionRefusedError):
        s.connect(str(kube.socket_path))
    channel = grpc.insecure_channel(f"unix://{kube.socket_path}")
    with channel, pytest.raises(grpc.RpcError) as err:
        api_pb2_grpc.RegistrationStub(channel).Register(
            api_pb2.RegisterRequest(version="v1beta1", endpoint="x", resource_name=RES),
            timeout=1.0,
        )
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert kube.devices(RES) == {}
    kube.start()  # removes the stale socket and listens anew
    plugin = h.plugin("again.sock").serve()
    register(kube, plugin.socket.name)
    kube.wait_registered(RES, after=1, timeout=WAIT)


def test_close_is_idempotent(h: Harness) -> None:
    kube, _ = registered(h)
    kube.close()
    kube.close()
    assert not kube.running
    assert kube.socket_path.is_socket()  # left behind, as by every stop
    with pytest.raises(RuntimeError, match="closed"):
        kube.start()


# --- calls into the plugin -----------------------------------------------


def test_allocate_preferred_and_prestart_reach_the_plugin(h: Harness) -> None:
    kube = h.kubelet(NEW)
    plugin = h.plugin(options=Options(True, True)).serve()
    register(kube, plugin.socket.name)
    kube.wait_registered(RES, timeout=WAIT)

    response = kube.allocate(RES, ["d1", "d0"])
    assert response.envs["IDS"] == "d1,d0"
    assert plugin.allocate_requests == [["d1", "d0"]]
    assert kube.assignments(RES) == [("d1", "d0")]

    plugin.fail_allocate = True
    with pytest.raises(grpc.RpcError) as err:
        kube.allocate(RES, ["zz"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "unknown device zz"
    assert kube.assignments(RES) == [("d1", "d0")]

    assert kube.get_preferred_allocation(RES, ["d0", "d1"], ["d1"], 1) == ["d1"]
    req = plugin.preferred_requests[0]
    assert list(req.available_deviceIDs) == ["d0", "d1"]
    assert list(req.must_include_deviceIDs) == ["d1"]
    assert req.allocation_size == 1

    kube.pre_start_container(RES, ["d0"])
    assert plugin.pre_start_requests == [["d0"]]

    with pytest.raises(RuntimeError, match="no plugin"):
        kube.allocate("example.com/other", ["d0"])


def test_timeouts_name_what_was_awaited(h: Harness) -> None:
    kube = h.kubelet(NEW)
    with pytest.raises(TimeoutError, match=r"example\.com/none"):
        kube.wait_registered("example.com/none", timeout=0.1)
    with pytest.raises(TimeoutError, match="the impossible"):
        kube.wait_until(lambda: False, timeout=0.1, what="the impossible")
