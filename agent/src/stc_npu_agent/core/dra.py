"""DRA, the pure part: which of a ResourceClaim's devices are ours, and the
checkpoint of prepared claims.

Pure: the claim arrives as a plain mapping (the ResourceClaim object as the
API serves it, ``resource.k8s.io/v1``), the checkpoint as bytes; the shell
(``stc_npu_agent.draplugin``) fetches, writes and serves.

A claim is ours to prepare when its UID is the one the kubelet asked for
(a claim deleted and made anew under the same name is another claim) and its
allocation has results of our driver, each in this node's pool (the pool is
the node name) and naming an NPU the node has now, with device nodes: the
answer is the NPU's CDI device ID in the spec the agent writes
(``<resourceName>=<id>``, e.g. ``streamcomputing.com/npu=stc0``), so the
runtime resolves it exactly as it does for the device plugin's cdi-cri.

What device-plugin mode puts in Allocate's env, the container's list of
NPUs (``STC_NPU_DEVICES``, and ``STC_SET_DEVICES`` with ``stcSetDevices``),
comes in a claim spec of its own (``claim_spec``, one file per claim): one
CDI device per request of the claim, holding only that env for the request's
NPUs, whose ID each of the request's devices carries besides its NPU's. A
container given a request gets exactly its NPUs' list. (A container given
several requests or claims of ours gets the list of one of them: runtimes
apply each device's env in turn and the last value wins.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stc_npu_agent.core.allocation import npu_list_env, spec_file_name
from stc_npu_agent.core.cdi import cdi_device_name_problem, required_version
from stc_npu_agent.core.config import StcSetDevices
from stc_npu_agent.core.devices import Inventory, Npu, in_index_order

CHECKPOINT_VERSION = 1


class ClaimError(ValueError):
    """Why one claim cannot be prepared; one line, reported in the claim's answer."""


@dataclass(frozen=True)
class PreparedDevice:
    request: str
    pool: str
    device: str
    cdi_device_ids: tuple[str, ...]


@dataclass(frozen=True)
class PreparedClaim:
    uid: str
    namespace: str
    name: str
    devices: tuple[PreparedDevice, ...]
    # Per request: the env ("NAME=value") of its CDI device in the claim spec.
    request_env: tuple[tuple[str, tuple[str, ...]], ...] = ()


def request_device_name(uid: str, request: str) -> str:
    """The claim spec's CDI device of one request (a subrequest's "a/b"
    becomes "a.b": CDI names have no slash)."""
    return f"claim-{uid}-{request.replace('/', '.')}"


def claim_spec_file_name(kind: str, uid: str) -> str:
    """streamcomputing.com-npu_claim-<uid>.json, beside the node's spec."""
    return spec_file_name(kind).removesuffix(".json") + f"_claim-{uid}.json"


def claim_spec(kind: str, claim: PreparedClaim) -> dict[str, Any]:
    """The CDI spec of one claim's env (see the module's docstring)."""
    devices: list[dict[str, Any]] = [
        {
            "name": request_device_name(claim.uid, request),
            "containerEdits": {"env": list(env)},
        }
        for request, env in claim.request_env
    ]
    return {
        "cdiVersion": required_version(kind, [device["name"] for device in devices]),
        "kind": kind,
        "devices": devices,
    }


def request_env(npus: list[Npu], stc_set_devices: StcSetDevices) -> tuple[str, ...]:
    """What Allocate's env says of a container's NPUs, for one request's."""
    ordered = in_index_order(npus)
    return tuple(f"{name}={value}" for name, value in npu_list_env(ordered, stc_set_devices))


def cdi_device_id(kind: str, npu_id: str) -> str:
    """The fully qualified CDI name of one NPU in the agent's spec."""
    return f"{kind}={npu_id}"


def _field(document: object, *path: str) -> object:
    for key in path:
        if not isinstance(document, Mapping):
            return None
        document = document.get(key)
    return document


def prepare_claim(
    claim: Mapping[str, Any],
    *,
    uid: str,
    driver: str,
    pool: str,
    kind: str,
    inventory: Inventory,
    stc_set_devices: StcSetDevices = "none",
) -> PreparedClaim:
    """Our devices of ``claim`` and their CDI IDs, or ClaimError saying why not."""
    namespace = str(_field(claim, "metadata", "namespace") or "")
    name = str(_field(claim, "metadata", "name") or "")
    where = f"claim {namespace}/{name}"
    actual_uid = _field(claim, "metadata", "uid")
    if actual_uid != uid:
        raise ClaimError(
            f"{where}: UID is {actual_uid!r}, the kubelet asked for {uid!r} "
            "(the claim was deleted and made anew)"
        )
    results = _field(claim, "status", "allocation", "devices", "results")
    if not isinstance(results, list):
        raise ClaimError(f"{where}: not allocated (no status.allocation.devices.results)")
    ours = [r for r in results if isinstance(r, Mapping) and r.get("driver") == driver]
    if not ours:
        raise ClaimError(f"{where}: no device of driver {driver} in its allocation")
    found: list[tuple[str, Npu]] = []
    for result in ours:
        request, result_pool, device = (
            str(result.get(key) or "") for key in ("request", "pool", "device")
        )
        if result_pool != pool:
            raise ClaimError(
                f"{where}: device {device} is allocated in pool {result_pool!r}, "
                f"not this node's pool {pool!r}"
            )
        npu = inventory.get(device)
        if npu is None:
            raise ClaimError(f"{where}: device {device!r} is not an NPU of this node")
        if not npu.present_nodes:
            raise ClaimError(f"{where}: {device} has no device nodes now ({npu.reason})")
        problem = cdi_device_name_problem(device) or cdi_device_name_problem(
            request_device_name(uid, request)
        )
        if problem:
            raise ClaimError(f"{where}: {problem}")
        found.append((request, npu))
    requests = sorted({request for request, _ in found})
    devices = tuple(
        PreparedDevice(
            request,
            pool,
            npu.id,
            (
                cdi_device_id(kind, npu.id),
                cdi_device_id(kind, request_device_name(uid, request)),
            ),
        )
        for request, npu in found
    )
    envs = tuple(
        (request, request_env([npu for r, npu in found if r == request], stc_set_devices))
        for request in requests
    )
    return PreparedClaim(uid, namespace, name, devices, envs)


def checkpoint_document(claims: Mapping[str, PreparedClaim]) -> bytes:
    document = {
        "version": CHECKPOINT_VERSION,
        "claims": {
            uid: {
                "namespace": claim.namespace,
                "name": claim.name,
                "devices": [
                    {
                        "request": device.request,
                        "pool": device.pool,
                        "device": device.device,
                        "cdiDeviceIds": list(device.cdi_device_ids),
                    }
                    for device in claim.devices
                ],
                "requestEnv": {request: list(env) for request, env in claim.request_env},
            }
            for uid, claim in sorted(claims.items())
        },
    }
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def parse_checkpoint(content: bytes) -> dict[str, PreparedClaim]:
    """The prepared claims in a checkpoint; ValueError (one line) if it is not one."""
    try:
        document = json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not JSON: {error}") from None
    if not isinstance(document, Mapping) or document.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"not a version {CHECKPOINT_VERSION} checkpoint")
    raw_claims = document.get("claims")
    if not isinstance(raw_claims, Mapping):
        raise ValueError("claims: expected a mapping")
    claims = {}
    try:
        for uid, raw in raw_claims.items():
            devices = tuple(
                PreparedDevice(
                    str(d["request"]),
                    str(d["pool"]),
                    str(d["device"]),
                    tuple(str(i) for i in d["cdiDeviceIds"]),
                )
                for d in raw["devices"]
            )
            # A checkpoint of an older agent has no requestEnv: no claim spec.
            envs = tuple(
                (str(request), tuple(str(line) for line in env))
                for request, env in raw.get("requestEnv", {}).items()
            )
            claims[str(uid)] = PreparedClaim(
                str(uid), str(raw["namespace"]), str(raw["name"]), devices, envs
            )
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"claims: malformed entry ({error!r})") from None
    return claims
