"""How a plugin instance becomes known to the kubelet: the registration strategies.

``KubeletSocket`` (device plugin mode's default): the instance's socket goes
in the kubelet's device plugin dir, and the agent calls ``Register`` on
``kubelet.sock``. The kubelet forgets the plugin when it restarts (and
deletes the socket), so the lifecycle registers a new instance after each
kubelet restart, lost stream or deleted socket.

``PluginWatcher`` (``registration: plugin-watcher``, and always in DRA mode):
the instance's one socket goes in ``plugins_registry``, and serves the
plugin registration API next to the plugin's own services (the endpoint in
``GetInfo`` is the socket itself). The kubelet's plugin watcher finds it,
calls ``GetInfo`` (1 s deadline), dials the endpoint, and reports the result
with ``NotifyRegistrationStatus``. The kubelet does not clean that dir on
restart and walks it when it starts, so a restarted kubelet finds the same
socket again: the agent only serves, and learns that it is registered (again)
from ``NotifyRegistrationStatus``. The socket is bound under a dot-name (the
watcher ignores dot-files), proven to answer, and renamed into place: the
watcher never sees a socket that does not answer yet.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

import grpc

from stc_npu_agent.pluginregistration import api_pb2 as registration_pb2
from stc_npu_agent.pluginregistration import api_pb2_grpc as registration_grpc
from stc_npu_agent.v1beta1 import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
# 1.26+ kubelets dial the plugin for up to 10 s inside Register.
REGISTER_TIMEOUT = 15.0
DEVICE_PLUGIN_TYPE = "DevicePlugin"
DRA_PLUGIN_TYPE = "DRAPlugin"

RegisterCall = grpc.aio.UnaryUnaryCall[api_pb2.RegisterRequest, api_pb2.Empty]


# A channel of its own subchannel: by default every channel to one address
# shares a subchannel and its reconnect backoff (1 s and growing), so after
# attempts refused by a stopped kubelet's stale kubelet.sock, the attempt
# right after the new kubelet.sock appears failed without even connecting.
CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)


class Registrar(Protocol):
    name: str
    # Where instance sockets go (also where stale ones of ours are looked for).
    socket_dir: Path
    # True: the kubelet finds the instance itself and says so in
    # NotifyRegistrationStatus; kubelet.sock and a lost stream are then not
    # reasons for a new instance.
    kubelet_finds_us: bool

    def bind_path(self, path: Path) -> Path:
        """Where the instance binds before it is published at ``path``."""

    def add_services(self, server: grpc.aio.Server, endpoint: Path) -> None:
        """Registration services the instance's server carries besides the plugin's."""

    async def register(
        self, endpoint: Path, await_answer: Callable[[RegisterCall], Awaitable[None]]
    ) -> None:
        """Make the instance at ``endpoint`` known to the kubelet; raise on failure."""


class KubeletSocket:
    name = "kubelet-socket"
    kubelet_finds_us = False

    def __init__(
        self, kubelet_dir: Path, resource_name: str, options: api_pb2.DevicePluginOptions
    ) -> None:
        self.socket_dir = kubelet_dir
        self.kubelet_socket = kubelet_dir / KUBELET_SOCKET
        self.resource_name = resource_name
        self.options = options

    def bind_path(self, path: Path) -> Path:
        return path

    def add_services(self, server: grpc.aio.Server, endpoint: Path) -> None:
        return

    async def register(
        self, endpoint: Path, await_answer: Callable[[RegisterCall], Awaitable[None]]
    ) -> None:
        async with grpc.aio.insecure_channel(
            f"unix:{self.kubelet_socket}", CHANNEL_OPTIONS
        ) as channel:
            call = api_pb2_grpc.RegistrationStub(channel).Register(
                api_pb2.RegisterRequest(
                    version=API_VERSION,
                    endpoint=endpoint.name,
                    resource_name=self.resource_name,
                    options=self.options,
                ),
                timeout=REGISTER_TIMEOUT,
            )
            await await_answer(call)


class _RegistrationService(registration_grpc.RegistrationServicer):
    def __init__(self, watcher: PluginWatcher, endpoint: Path) -> None:
        self.watcher = watcher
        self.endpoint = endpoint

    async def GetInfo(
        self,
        request: registration_pb2.InfoRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> registration_pb2.PluginInfo:
        self.watcher.info_requests += 1
        return registration_pb2.PluginInfo(
            type=self.watcher.plugin_type,
            name=self.watcher.plugin_name,
            endpoint=str(self.endpoint),
            supported_versions=list(self.watcher.versions),
        )

    async def NotifyRegistrationStatus(
        self,
        request: registration_pb2.RegistrationStatus,
        context: grpc.aio.ServicerContext[object, object],
    ) -> registration_pb2.RegistrationStatusResponse:
        self.watcher.on_status(request.plugin_registered, request.error)
        return registration_pb2.RegistrationStatusResponse()


class PluginWatcher:
    name = "plugin-watcher"
    kubelet_finds_us = True

    def __init__(
        self,
        registry_dir: Path,
        plugin_type: str,
        plugin_name: str,
        versions: Sequence[str],
        on_status: Callable[[bool, str], None],
    ) -> None:
        self.socket_dir = registry_dir
        self.plugin_type = plugin_type
        self.plugin_name = plugin_name
        self.versions = tuple(versions)
        self.on_status = on_status
        self.info_requests = 0

    def bind_path(self, path: Path) -> Path:
        return path.with_name(f".{path.name}")  # the watcher ignores dot-files

    def add_services(self, server: grpc.aio.Server, endpoint: Path) -> None:
        registration_grpc.add_RegistrationServicer_to_server(
            _RegistrationService(self, endpoint), server
        )

    async def register(
        self, endpoint: Path, await_answer: Callable[[RegisterCall], Awaitable[None]]
    ) -> None:
        # The socket answers already (the instance proved it): publish it.
        hidden = self.bind_path(endpoint)
        try:
            os.rename(hidden, endpoint)
        except OSError:
            with contextlib.suppress(OSError):
                hidden.unlink()
            raise
        log.info(
            "serving %s %s at %s: waiting for the kubelet's plugin watcher",
            self.plugin_type,
            self.plugin_name,
            endpoint,
        )
