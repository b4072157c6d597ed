"""The DRA kubelet plugin: the ``dra/v1`` (and ``v1beta1``) DRAPlugin service
and the device health stream, translating between protobuf and the core.

- NodePrepareResources: per claim, the checkpoint's answer if the claim was
  prepared before (idempotent, no API call: a kubelet restart or a retry
  must get the same devices), else the claim is fetched through the
  ``ClaimSource``, checked (``core/dra.py``), written to the checkpoint, and
  only then answered; while the CDI spec that resolves the answers is
  missing, every claim fails with that reason. Per-claim failures go into the claim's ``error``; one
  claim's failure never fails the others.
- Each prepared claim has a CDI spec file of its own beside the node's
  (``core/dra.py``'s ``claim_spec``: the env that lists each request's
  NPUs), written before the checkpoint, removed after the claim is
  forgotten, and written again at start for every checkpointed claim
  (``/var/run`` is emptied on reboot, and a kubelet that prepared a claim
  before does not ask again); one whose claim is not in the checkpoint is
  removed at start.
- NodeUnprepareResources: forgets the claim (an unknown claim is done
  already: success).
- The checkpoint (``<dra.stateDir>/checkpoint.json``) is written atomically
  on every change and read at start, so an agent restart in the middle of
  pod startup loses nothing. An unreadable one is set aside, with one line.
- NodeWatchResources (health ``v1``, and the same messages under the
  ``v1alpha1``/``v1beta1`` paths): the health of every NPU of the inventory,
  sent at once, again on every change the kubelet's view has, and at least
  every ``HEALTH_RESEND_INTERVAL`` with no change: the kubelet counts a
  device it has not heard of for 30 s as Unknown in pod status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc

from stc_npu_agent.claims import ClaimFetchError, ClaimSource
from stc_npu_agent.core.config import StcSetDevices
from stc_npu_agent.core.devices import Inventory
from stc_npu_agent.core.dra import (
    ClaimError,
    PreparedClaim,
    checkpoint_document,
    claim_spec,
    claim_spec_file_name,
    parse_checkpoint,
    prepare_claim,
)
from stc_npu_agent.dra import api_pb2 as dra_pb2
from stc_npu_agent.dra import api_pb2_grpc as dra_grpc
from stc_npu_agent.drahealth import api_pb2 as health_pb2
from stc_npu_agent.drahealth import api_pb2_grpc as health_grpc
from stc_npu_agent.files import atomic_write
from stc_npu_agent.plugin import StreamTracker
from stc_npu_agent.state import DeviceState

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.json"
CHECKPOINT_MODE = 0o600
CLAIM_SPEC_MODE = 0o644  # the runtime reads it; nothing in it is secret
# The service versions the kubelet may pick from (GetInfo.supported_versions):
# v1 first, the newest; the kubelet uses the newest it knows.
DRA_SERVICES = ("v1.DRAPlugin", "v1beta1.DRAPlugin")
_DRA_V1BETA1 = "k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin"
# The health service's packages, newest first; one set of messages serves all.
_HEALTH_PACKAGES = ("v1", "v1beta1", "v1alpha1")
_HEALTH = {"Healthy": health_pb2.HEALTHY, "Unhealthy": health_pb2.UNHEALTHY}
MAX_HEALTH_MESSAGE = 1024
# The kubelet's health cache reports a device it has not heard of for 30 s
# as Unknown (a constant there; the message's health_check_timeout_seconds
# is not used yet): the whole list is sent again well within that.
HEALTH_RESEND_INTERVAL = 10.0


class PreparedClaims:
    """The prepared claims, kept in a checkpoint file."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / CHECKPOINT_NAME
        self.claims: dict[str, PreparedClaim] = {}
        self.writes = 0

    def load(self) -> None:
        try:
            content = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as error:
            log.warning("cannot read the DRA checkpoint %s: %s", self.path, error.strerror)
            return
        try:
            self.claims = parse_checkpoint(content)
        except ValueError as error:
            aside = self.path.with_name(f"{self.path.name}.bad")
            self.path.replace(aside)
            log.warning(
                "the DRA checkpoint %s is unreadable (%s): set aside as %s; prepared claims "
                "are prepared again when the kubelet asks",
                self.path,
                error,
                aside.name,
            )
            return
        if self.claims:
            log.info("DRA checkpoint: %d prepared claims", len(self.claims))

    def save(self, claims: dict[str, PreparedClaim]) -> None:
        """Write ``claims``; they become current only once on disk."""
        atomic_write(self.path, checkpoint_document(claims), CHECKPOINT_MODE)
        self.claims = claims
        self.writes += 1


def _devices_pb(claim: PreparedClaim) -> list[dra_pb2.Device]:
    return [
        dra_pb2.Device(
            request_names=[device.request] if device.request else [],
            pool_name=device.pool,
            device_name=device.device,
            cdi_device_ids=list(device.cdi_device_ids),
        )
        for device in claim.devices
    ]


class ClaimWriteError(Exception):
    """A file of a claim could not be written; one line saying which and why."""


class DraPluginService(dra_grpc.DRAPluginServicer):
    def __init__(
        self,
        state: DeviceState,
        claims: ClaimSource,
        prepared: PreparedClaims,
        *,
        driver: str,
        pool: str,
        kind: str,
        cdi_spec: Path,
        stc_set_devices: StcSetDevices = "none",
    ) -> None:
        self.state = state
        self.stc_set_devices = stc_set_devices
        # The spec that resolves the answers' CDI IDs (the CDI spec sink writes it).
        self.cdi_spec = cdi_spec
        self.claims = claims
        self.prepared = prepared
        self.driver = driver
        self.pool = pool
        self.kind = kind
        # One change of the checkpoint at a time (a fetch awaits in between).
        self._lock = asyncio.Lock()

    async def NodePrepareResources(
        self,
        request: dra_pb2.NodePrepareResourcesRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> dra_pb2.NodePrepareResourcesResponse:
        answers = {}
        async with self._lock:
            for claim in request.claims:
                answers[claim.uid] = await self._prepare(claim)
        return dra_pb2.NodePrepareResourcesResponse(claims=answers)

    async def _prepare(self, claim: dra_pb2.Claim) -> dra_pb2.NodePrepareResourceResponse:
        where = f"{claim.namespace}/{claim.name} ({claim.uid})"
        try:
            prepared = await self._prepared(claim)
        except ClaimError as error:
            log.warning("NodePrepareResources %s refused: %s", where, error)
            return dra_pb2.NodePrepareResourceResponse(error=str(error))
        except ClaimWriteError as error:
            log.warning("NodePrepareResources %s failed: %s", where, error)
            return dra_pb2.NodePrepareResourceResponse(error=str(error))
        return dra_pb2.NodePrepareResourceResponse(devices=_devices_pb(prepared))

    async def _prepared(self, claim: dra_pb2.Claim) -> PreparedClaim:
        """The claim prepared (from the checkpoint, or now), or ClaimError /
        ClaimWriteError saying why not."""
        if not self.cdi_spec.is_file():
            # The runtime could not resolve the IDs: the pod would fail later
            # with a vaguer error. The kubelet asks again.
            raise ClaimError(
                f"the CDI spec {self.cdi_spec} is missing (see the agent's log for why): "
                "its devices cannot be resolved"
            )
        known = self.prepared.claims.get(claim.uid)
        if known is not None:
            self._write_claim_spec(known, only_if_missing=True)
            return known
        try:
            document = await self.claims.get_claim(claim.namespace, claim.name)
        except ClaimFetchError as error:
            raise ClaimError(str(error)) from error
        prepared = prepare_claim(
            document,
            uid=claim.uid,
            driver=self.driver,
            pool=self.pool,
            kind=self.kind,
            inventory=self.state.inventory,
            stc_set_devices=self.stc_set_devices,
        )
        self._write_claim_spec(prepared)
        try:
            self.prepared.save({**self.prepared.claims, claim.uid: prepared})
        except OSError as error:
            self._remove_claim_spec(claim.uid)
            raise ClaimWriteError(
                f"cannot write the checkpoint {self.prepared.path}: {error.strerror}"
            ) from error
        log.info(
            "prepared claim %s/%s (%s): %s",
            claim.namespace,
            claim.name,
            claim.uid,
            ",".join(dict.fromkeys(i for d in prepared.devices for i in d.cdi_device_ids)),
        )
        return prepared

    async def NodeUnprepareResources(
        self,
        request: dra_pb2.NodeUnprepareResourcesRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> dra_pb2.NodeUnprepareResourcesResponse:
        answers = {}
        async with self._lock:
            for claim in request.claims:
                answers[claim.uid] = self._unprepare(claim)
        return dra_pb2.NodeUnprepareResourcesResponse(claims=answers)

    def _unprepare(self, claim: dra_pb2.Claim) -> dra_pb2.NodeUnprepareResourceResponse:
        if claim.uid not in self.prepared.claims:
            return dra_pb2.NodeUnprepareResourceResponse()  # nothing to undo
        remaining = {uid: c for uid, c in self.prepared.claims.items() if uid != claim.uid}
        try:
            self.prepared.save(remaining)
        except OSError as error:
            message = f"cannot write the checkpoint {self.prepared.path}: {error.strerror}"
            log.warning("NodeUnprepareResources %s failed: %s", claim.uid, message)
            return dra_pb2.NodeUnprepareResourceResponse(error=message)
        self._remove_claim_spec(claim.uid)
        log.info("unprepared claim %s/%s (%s)", claim.namespace, claim.name, claim.uid)
        return dra_pb2.NodeUnprepareResourceResponse()

    # --- the claims' own CDI specs ---

    def _claim_spec_path(self, uid: str) -> Path:
        return self.cdi_spec.parent / claim_spec_file_name(self.kind, uid)

    def _write_claim_spec(self, claim: PreparedClaim, *, only_if_missing: bool = False) -> None:
        if not claim.request_env:  # prepared by an agent that wrote none
            return
        path = self._claim_spec_path(claim.uid)
        if only_if_missing and path.is_file():
            return
        content = json.dumps(claim_spec(self.kind, claim), indent=2) + "\n"
        try:
            atomic_write(path, content.encode(), CLAIM_SPEC_MODE)
        except OSError as error:
            raise ClaimWriteError(
                f"cannot write the claim's CDI spec {path}: {error.strerror}"
            ) from error

    def _remove_claim_spec(self, uid: str) -> None:
        _remove_spec(self._claim_spec_path(uid))

    def sync_claim_specs(self) -> None:
        """At start: a spec for every checkpointed claim, none for others."""
        for claim in self.prepared.claims.values():
            try:
                self._write_claim_spec(claim, only_if_missing=True)
            except ClaimWriteError as error:
                log.warning("claim %s/%s: %s", claim.namespace, claim.name, error)
        kept = {self._claim_spec_path(uid) for uid in self.prepared.claims}
        with contextlib.suppress(OSError):
            for path in self.cdi_spec.parent.glob(claim_spec_file_name(self.kind, "*")):
                if path not in kept:
                    _remove_spec(path)


def _remove_spec(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        log.warning("cannot remove the claim's CDI spec %s: %s", path, error.strerror)


def health_response(inventory: Inventory, pool: str) -> health_pb2.NodeWatchResourcesResponse:
    now = int(time.time())
    return health_pb2.NodeWatchResourcesResponse(
        devices=[
            health_pb2.DeviceHealth(
                device=health_pb2.DeviceIdentifier(pool_name=pool, device_name=npu.id),
                health=_HEALTH.get(npu.health, health_pb2.UNKNOWN),
                last_updated_time=now,
                message=npu.reason[:MAX_HEALTH_MESSAGE],
            )
            for npu in inventory.ordered()
        ]
    )


class HealthService(health_grpc.DRAResourceHealthServicer):
    def __init__(self, state: DeviceState, streams: StreamTracker, pool: str) -> None:
        self.state = state
        self.streams = streams
        self.pool = pool

    async def NodeWatchResources(
        self,
        request: health_pb2.NodeWatchResourcesRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[health_pb2.NodeWatchResourcesResponse]:
        streams = self.streams
        streams.open_streams += 1
        streams.opened_total += 1
        log.info("kubelet opened the device health stream: %d NPUs", len(self.state.inventory.npus))
        ended_by_kubelet = True
        try:
            while not streams.closing:
                change = self.state.next_change()  # taken before sending: no lost wake-up
                yield health_response(self.state.inventory, self.pool)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(change.wait(), HEALTH_RESEND_INTERVAL)
            ended_by_kubelet = False
        finally:
            streams.open_streams -= 1
            if ended_by_kubelet:
                streams.lost()


def _handler(
    servicer: Any, method: str, request: Any, response: Any, *, stream: bool = False
) -> grpc.RpcMethodHandler[Any, Any]:
    make: Callable[..., grpc.RpcMethodHandler[Any, Any]] = (
        grpc.unary_stream_rpc_method_handler if stream else grpc.unary_unary_rpc_method_handler
    )
    return make(
        getattr(servicer, method),
        request_deserializer=request.FromString,
        response_serializer=response.SerializeToString,
    )


def add_dra_services(
    server: grpc.aio.Server, plugin: DraPluginService, health: HealthService
) -> None:
    """DRAPlugin v1 and v1beta1, and the health stream under each package's path."""
    dra_grpc.add_DRAPluginServicer_to_server(plugin, server)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                _DRA_V1BETA1,
                {
                    "NodePrepareResources": _handler(
                        plugin,
                        "NodePrepareResources",
                        dra_pb2.NodePrepareResourcesRequest,
                        dra_pb2.NodePrepareResourcesResponse,
                    ),
                    "NodeUnprepareResources": _handler(
                        plugin,
                        "NodeUnprepareResources",
                        dra_pb2.NodeUnprepareResourcesRequest,
                        dra_pb2.NodeUnprepareResourcesResponse,
                    ),
                },
            ),
            *(
                grpc.method_handlers_generic_handler(
                    f"{package}.DRAResourceHealth",
                    {
                        "NodeWatchResources": _handler(
                            health,
                            "NodeWatchResources",
                            health_pb2.NodeWatchResourcesRequest,
                            health_pb2.NodeWatchResourcesResponse,
                            stream=True,
                        )
                    },
                )
                for package in _HEALTH_PACKAGES
            ),
        )
    )
