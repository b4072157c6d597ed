"""What each mode serves: one place that picks the registration strategy, the
gRPC services of a plugin instance, and the sinks that follow the inventory.

- ``device-plugin``: the v1beta1 DevicePlugin service, registered on
  ``kubelet.sock`` or (``registration: plugin-watcher``) through
  ``plugins_registry`` as type ``DevicePlugin``; the CDI spec sink with
  cdi-cri.
- ``dra``: the DRA plugin services (``draplugin.py``), registered through
  ``plugins_registry`` as type ``DRAPlugin``; the CDI spec sink (the claims'
  devices are CDI IDs in it) and the ResourceSlice publisher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import grpc

from stc_npu_agent.claims import ClaimSource, MissingClaimSource
from stc_npu_agent.core.allocation import Delivery, spec_file_name
from stc_npu_agent.core.config import DRA_DRIVER_NAME, Config
from stc_npu_agent.plugin import PLUGIN_OPTIONS, DevicePluginService, StreamTracker
from stc_npu_agent.registration import (
    DEVICE_PLUGIN_TYPE,
    DRA_PLUGIN_TYPE,
    KubeletSocket,
    PluginWatcher,
    Registrar,
)
from stc_npu_agent.sinks import Sink, sinks_for
from stc_npu_agent.state import DeviceState
from stc_npu_agent.v1beta1 import api_pb2, api_pb2_grpc

if TYPE_CHECKING:
    from stc_npu_agent.kubeapi import KubeApi
    from stc_npu_agent.slices import SlicePublisher

SELF_CHECK_TIMEOUT = 5.0


class Services(Protocol):
    # Ready only while the kubelet holds a stream open: ListAndWatch carries
    # the devices; DRA's health stream is optional (a feature gate), so a
    # registered DRA plugin is ready without it.
    ready_needs_stream: bool

    def add_to(self, server: grpc.aio.Server, streams: StreamTracker) -> None:
        """Add the plugin's own services to an instance's server."""

    async def self_check(self, channel: grpc.aio.Channel) -> None:
        """One call through the instance's socket; raise if the answer is wrong."""


class DevicePluginServices:
    ready_needs_stream = True

    def __init__(self, state: DeviceState, config: Config) -> None:
        self.state = state
        self.config = config

    def add_to(self, server: grpc.aio.Server, streams: StreamTracker) -> None:
        api_pb2_grpc.add_DevicePluginServicer_to_server(
            DevicePluginService(
                self.state,
                self.config.hpe,
                streams,
                Delivery.from_config(self.config),
                self.config.sharing,
            ),
            server,
        )

    async def self_check(self, channel: grpc.aio.Channel) -> None:
        options = await api_pb2_grpc.DevicePluginStub(channel).GetDevicePluginOptions(
            api_pb2.Empty(), timeout=SELF_CHECK_TIMEOUT
        )
        if options != PLUGIN_OPTIONS:
            raise RuntimeError(f"own socket answered unexpected options: {options}")


class DraServices:
    ready_needs_stream = False

    def __init__(
        self, state: DeviceState, config: Config, claims: ClaimSource, node_name: str
    ) -> None:
        from stc_npu_agent import draplugin  # noqa: PLC0415 (DRA mode only)

        self.state = state
        self.pool = node_name
        self.prepared = draplugin.PreparedClaims(Path(config.dra.state_dir))
        self.prepared.load()
        self.plugin = draplugin.DraPluginService(
            state,
            claims,
            self.prepared,
            driver=DRA_DRIVER_NAME,
            pool=node_name,
            kind=config.resource_name,
            cdi_spec=Path(config.cdi.spec_dir) / spec_file_name(config.resource_name),
            stc_set_devices=config.stc_set_devices,
        )
        self.plugin.sync_claim_specs()

    def add_to(self, server: grpc.aio.Server, streams: StreamTracker) -> None:
        from stc_npu_agent import draplugin  # noqa: PLC0415

        draplugin.add_dra_services(
            server, self.plugin, draplugin.HealthService(self.state, streams, self.pool)
        )

    async def self_check(self, channel: grpc.aio.Channel) -> None:
        from stc_npu_agent.dra import api_pb2 as dra_pb2  # noqa: PLC0415
        from stc_npu_agent.dra import api_pb2_grpc as dra_grpc  # noqa: PLC0415

        # An empty request changes nothing and must answer an empty map.
        answer = await dra_grpc.DRAPluginStub(channel).NodeUnprepareResources(
            dra_pb2.NodeUnprepareResourcesRequest(), timeout=SELF_CHECK_TIMEOUT
        )
        if answer.claims:
            raise RuntimeError(f"own socket answered an unexpected response: {answer}")


@dataclass(frozen=True)
class Plan:
    registrar: Registrar
    services: Services
    sinks: list[Sink]
    # DRA mode with an API: the node's ResourceSlice (resync on registration).
    slices: SlicePublisher | None = None


def plan_for(
    config: Config,
    state: DeviceState,
    *,
    kubelet_dir: Path,
    sys_dir: Path,
    hpe_dir: Path | None = None,
    node_name: str,
    claims: ClaimSource | None,
    api: KubeApi | None,
    on_status: Callable[[bool, str], None],
    other_agent_serving: Callable[[], bool],
) -> Plan:
    """The registrar, services and sinks ``config`` asks for. In DRA mode
    ``api`` publishes the node's ResourceSlice and is the claim source unless
    ``claims`` is given; without either, every claim is refused with a reason."""
    registry = Path(config.plugin_registry_dir)
    if config.mode == "dra":
        from stc_npu_agent.draplugin import DRA_SERVICES  # noqa: PLC0415

        services = DraServices(state, config, claims or api or MissingClaimSource(), node_name)
        sinks = sinks_for(
            config,
            other_agent_serving,
            sys_dir=sys_dir,
            hpe_dir=hpe_dir,
            prepared_claims=lambda: len(services.prepared.claims),
        )
        publisher = None
        if api is not None:
            from stc_npu_agent.kubeapi import slice_publisher  # noqa: PLC0415

            publisher = slice_publisher(
                api, node_name, sys_dir, min_interval=config.dra.slice_interval
            )
            sinks.append(publisher)
        return Plan(
            PluginWatcher(registry, DRA_PLUGIN_TYPE, DRA_DRIVER_NAME, DRA_SERVICES, on_status),
            services,
            sinks,
            publisher,
        )
    sinks = sinks_for(config, other_agent_serving, sys_dir=sys_dir, hpe_dir=hpe_dir)
    registrar: Registrar
    if config.registration == "plugin-watcher":
        registrar = PluginWatcher(
            registry, DEVICE_PLUGIN_TYPE, config.advertised_resource, ["v1beta1"], on_status
        )
    else:
        registrar = KubeletSocket(kubelet_dir, config.advertised_resource, PLUGIN_OPTIONS)
    return Plan(registrar, DevicePluginServices(state, config), sinks)
