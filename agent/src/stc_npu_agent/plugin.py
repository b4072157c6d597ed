"""The v1beta1.DevicePlugin gRPC service: translates between protobuf and the core.

Holds no discovery or policy logic of its own. ``checked_allocation`` is the
one Allocate answer, shared with `diagnose` (and the probe server's
``/allocate``), which show it as JSON (``allocation_document``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from stc_npu_agent.core.allocation import (
    DEVICE_SPECS_ONLY,
    NO_SHARING,
    AllocationError,
    ContainerAllocation,
    Delivery,
    ErrorKind,
    plan_allocation,
    preferred_allocation,
)
from stc_npu_agent.core.config import HpeConfig, SharingConfig
from stc_npu_agent.core.devices import Inventory
from stc_npu_agent.core.sharing import repeated_npus, replica_ids
from stc_npu_agent.discovery import DeviceScanner
from stc_npu_agent.state import DeviceState
from stc_npu_agent.v1beta1 import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

# Sent in RegisterRequest.options (read by kubelets 1.18-1.25) and answered by
# GetDevicePluginOptions (asked by 1.26+): one constant, so the two agree.
PLUGIN_OPTIONS = api_pb2.DevicePluginOptions(
    pre_start_required=False, get_preferred_allocation_available=True
)

_GRPC_CODES = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
}


def list_response(inventory: Inventory, replicas: int = 1) -> api_pb2.ListAndWatchResponse:
    """Every NPU's IDs (its replicas when shared), each with the NPU's health
    and NUMA node."""
    devices = []
    for npu in inventory.ordered():
        for device_id in replica_ids(npu.id, replicas):
            device = api_pb2.Device(ID=device_id, health=npu.health)
            if npu.numa_node is not None:
                device.topology.nodes.add(ID=npu.numa_node)
            devices.append(device)
    return api_pb2.ListAndWatchResponse(devices=devices)


def allocate_response(plan: ContainerAllocation) -> api_pb2.ContainerAllocateResponse:
    return api_pb2.ContainerAllocateResponse(
        envs=dict(plan.envs),
        mounts=[
            api_pb2.Mount(
                host_path=mount.host_path,
                container_path=mount.container_path,
                read_only=mount.read_only,
            )
            for mount in plan.mounts
        ],
        devices=[
            api_pb2.DeviceSpec(
                host_path=spec.host_path,
                container_path=spec.container_path,
                permissions=spec.permissions,
            )
            for spec in plan.devices
        ],
        cdi_devices=[api_pb2.CDIDevice(name=name) for name in plan.cdi_devices],
    )


def checked_allocation(
    inventory: Inventory,
    scanner: DeviceScanner,
    ids: Sequence[str],
    hpe: HpeConfig,
    delivery: Delivery = DEVICE_SPECS_ONLY,
    *,
    sharing: SharingConfig = NO_SHARING,
) -> ContainerAllocation:
    """The Allocate answer for one container: the core's plan, once every node
    it hands out is checked to still be the char device the scan saw (a node
    replaced since, e.g. by ``mknod``, is refused, not handed out rw)."""
    plan = plan_allocation(inventory, ids, hpe, delivery, sharing=sharing)
    changed = [
        name
        for npu_id in plan.npus
        for name, devnum in inventory.npus[npu_id].devnums.items()
        if scanner.devnum(name) != devnum
    ]
    if changed:
        raise AllocationError(
            ErrorKind.FAILED_PRECONDITION,
            f"device nodes changed since the last scan: {', '.join(changed)}",
        )
    return plan


def allocation_document(
    inventory: Inventory,
    scanner: DeviceScanner,
    ids: Sequence[str],
    hpe: HpeConfig,
    delivery: Delivery = DEVICE_SPECS_ONLY,
    *,
    sharing: SharingConfig = NO_SHARING,
) -> dict[str, Any]:
    """``checked_allocation`` as JSON-ready data: the answer, or the error."""
    try:
        plan = checked_allocation(inventory, scanner, ids, hpe, delivery, sharing=sharing)
    except AllocationError as error:
        return {"error": {"code": error.kind.name, "message": error.message}}
    return {
        "devices": [
            {
                "hostPath": d.host_path,
                "containerPath": d.container_path,
                "permissions": d.permissions,
            }
            for d in plan.devices
        ],
        "mounts": [
            {"hostPath": m.host_path, "containerPath": m.container_path, "readOnly": m.read_only}
            for m in plan.mounts
        ],
        "envs": dict(plan.envs),
        "cdiDevices": list(plan.cdi_devices),
    }


Request = TypeVar("Request")
Response = TypeVar("Response")
Context = grpc.aio.ServicerContext[object, object]


def reported(
    method: Callable[[DevicePluginService, Request, Context], Awaitable[Response]],
) -> Callable[[DevicePluginService, Request, Context], Awaitable[Response]]:
    """Report each call's status code and duration to the state's events."""
    name = method.__name__

    @functools.wraps(method)
    async def call(self: DevicePluginService, request: Request, context: Context) -> Response:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await method(self, request, context)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            # context.abort sets the code, then raises; anything else is a
            # defect, which grpc answers UNKNOWN.
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            self.state.events.call_finished(name, code.name, time.perf_counter() - started)

    return call


class StreamTracker:
    """What the lifecycle needs to know of one plugin instance's streams."""

    def __init__(self, on_lost: Callable[[], None]) -> None:
        self.closing = False
        self.open_streams = 0
        self.opened_total = 0
        self._on_lost = on_lost

    def lost(self) -> None:
        # Our own shutdown of this instance also cancels its streams: only a
        # stream the kubelet ended while we still serve is a signal.
        if not self.closing:
            self._on_lost()


class DevicePluginService(api_pb2_grpc.DevicePluginServicer):
    def __init__(
        self,
        state: DeviceState,
        hpe: HpeConfig,
        streams: StreamTracker,
        delivery: Delivery = DEVICE_SPECS_ONLY,
        sharing: SharingConfig = NO_SHARING,
    ) -> None:
        self.state = state
        self.hpe = hpe
        self.streams = streams
        self.delivery = delivery
        self.sharing = sharing

    async def GetDevicePluginOptions(
        self, request: api_pb2.Empty, context: grpc.aio.ServicerContext[object, object]
    ) -> api_pb2.DevicePluginOptions:
        return PLUGIN_OPTIONS

    async def ListAndWatch(
        self, request: api_pb2.Empty, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[api_pb2.ListAndWatchResponse]:
        streams = self.streams
        streams.open_streams += 1
        streams.opened_total += 1
        log.info(
            "kubelet opened ListAndWatch: %d devices",
            len(self.state.inventory.npus) * self.sharing.replicas,
        )
        ended_by_kubelet = True
        try:
            while not streams.closing:
                # Take the wake-up before sending, so a change that lands
                # between send and wait is never missed.
                change = self.state.next_change()
                yield list_response(self.state.inventory, self.sharing.replicas)
                await change.wait()
            ended_by_kubelet = False
        finally:
            streams.open_streams -= 1
            if ended_by_kubelet:
                streams.lost()

    @reported
    async def Allocate(
        self, request: api_pb2.AllocateRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> api_pb2.AllocateResponse:
        if not request.container_requests:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no container requests")
        responses = []
        delivery = self._delivery()
        for container in request.container_requests:
            ids = list(container.devices_ids)
            try:
                plan = checked_allocation(
                    self.state.inventory,
                    self.state.scanner,
                    ids,
                    self.hpe,
                    delivery,
                    sharing=self.sharing,
                )
            except AllocationError as error:
                log.warning("Allocate refused: %s", error.message)
                if error.kind is ErrorKind.FAILED_PRECONDITION:
                    # The API's rule: on failure, send the kubelet the list
                    # again, after a look at what changed.
                    self.state.schedule_rescan()
                    self.state.wake()
                await context.abort(_GRPC_CODES[error.kind], error.message)
            log.info(
                "Allocate %s: %s%d device nodes%s%s",
                ",".join(sorted(ids)),
                f"NPUs {','.join(plan.npus)}, " if self.sharing.shared else "",
                len(plan.devices),
                ", HPE mounted read-only" if plan.mounts else "",
                f", CDI {','.join(plan.cdi_devices)}" if plan.cdi_devices else "",
            )
            responses.append(allocate_response(plan))
        return api_pb2.AllocateResponse(container_responses=responses)

    def _delivery(self) -> Delivery:
        """The configured delivery, without CDI names while the spec that
        resolves them is missing and DeviceSpecs can do alone."""
        delivery = self.delivery
        spec = delivery.cdi_spec_file
        if delivery.device_specs and spec is not None and not os.path.isfile(spec):
            log.warning("the CDI spec %s is missing: answering DeviceSpecs only", spec)
            return delivery.without_cdi()
        return delivery

    @reported
    async def GetPreferredAllocation(
        self,
        request: api_pb2.PreferredAllocationRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> api_pb2.PreferredAllocationResponse:
        if not request.container_requests:
            # An empty answer would only surface in the kubelet as "empty
            # preferred allocation response": refuse the request as Allocate
            # does (tests/reliability/test_bad_input.py).
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no container requests")
        responses = []
        packed: list[str] = []
        replicas = self.sharing.replicas
        for container in request.container_requests:
            try:
                ids = preferred_allocation(
                    self.state.inventory,
                    list(container.available_deviceIDs),
                    list(container.must_include_deviceIDs),
                    container.allocation_size,
                    replicas=replicas,
                )
            except AllocationError as error:
                log.warning("GetPreferredAllocation refused: %s", error.message)
                await context.abort(_GRPC_CODES[error.kind], error.message)
            repeated = repeated_npus(ids, replicas)
            if repeated:
                given = ", ".join(f"{npu_id} x{count}" for npu_id, count in repeated.items())
                distinct = len(ids) - sum(repeated.values()) + len(repeated)
                packed.append(f"{len(ids)} replicas on {distinct} distinct NPUs ({given})")
            responses.append(api_pb2.ContainerPreferredAllocationResponse(deviceIDs=ids))
        if packed:
            # Once per call: the request was larger than the healthy distinct NPUs.
            log.info(
                "GetPreferredAllocation: more replicas asked than healthy distinct NPUs "
                "available, packing: %s",
                "; ".join(packed),
            )
        return api_pb2.PreferredAllocationResponse(container_responses=responses)

    async def PreStartContainer(
        self,
        request: api_pb2.PreStartContainerRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> api_pb2.PreStartContainerResponse:
        return api_pb2.PreStartContainerResponse()
