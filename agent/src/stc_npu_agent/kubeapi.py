"""The Kubernetes API, for mode dra only: ResourceSlices, ResourceClaims, the Node.

Through lightkube (asyncio, httpx underneath; no generated client for the
whole API). Imported only in mode dra, so device-plugin mode starts and
runs without the library loaded. Objects go in and out as plain dicts (the
JSON the API serves): lightkube's generic resources, so no typed model of
``resource.k8s.io/v1`` has to match the cluster's version.

Credentials: the pod's ServiceAccount token (mounted only in mode dra),
re-read by lightkube as it is rotated; the API server's address from the
``KUBERNETES_SERVICE_HOST``/``_PORT`` environment every pod gets. Tests and
the bench hand in a server URL instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2
from lightkube import ApiError as LightkubeApiError
from lightkube import AsyncClient, ConfigError, KubeConfig
from lightkube.config.models import Cluster, User
from lightkube.generic_resource import create_global_resource, create_namespaced_resource

from stc_npu_agent.claims import ClaimFetchError
from stc_npu_agent.core.slices import DEFAULT_MODELS
from stc_npu_agent.discovery import driver_version
from stc_npu_agent.slices import MIN_INTERVAL, ApiError, SlicePublisher

if TYPE_CHECKING:
    from lightkube.generic_resource import GenericGlobalResource

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
REQUEST_TIMEOUT = 10.0
DRA_DRIVER = "npu.streamcomputing.com"

ResourceSlice = create_global_resource("resource.k8s.io", "v1", "ResourceSlice", "resourceslices")
ResourceClaim = create_namespaced_resource(
    "resource.k8s.io", "v1", "ResourceClaim", "resourceclaims"
)
Node = create_global_resource("", "v1", "Node", "nodes")

# The HTTP library logs every request at info: the publisher says what matters.
logging.getLogger("httpx2").setLevel(logging.WARNING)


def in_cluster_config(service_account_dir: Path = SERVICE_ACCOUNT_DIR) -> KubeConfig:
    """The pod's own credentials, or ApiError(0, ...) saying what is missing."""
    try:
        return KubeConfig.from_service_account(service_account_dir)
    except (OSError, KeyError, ConfigError) as error:
        raise ApiError(
            0,
            f"no in-cluster Kubernetes credentials ({error}): mode dra needs the pod's "
            f"ServiceAccount token at {service_account_dir} and KUBERNETES_SERVICE_HOST",
        ) from error


def server_config(url: str, token: str = "") -> KubeConfig:
    """A config for one server URL (tests, the bench, a local fake API server)."""
    return KubeConfig.from_one(cluster=Cluster(server=url), user=User(token=token or None))


class KubeApi:
    """What the DRA driver does with the API: the SliceApi of ``slices.py``
    and the ClaimSource of the kubelet plugin, on one connection pool."""

    def __init__(self, config: KubeConfig) -> None:
        self.client = AsyncClient(config=config, timeout=httpx2.Timeout(REQUEST_TIMEOUT))

    async def close(self) -> None:
        await self.client.close()

    # SliceApi
    async def node_uid(self, name: str) -> str | None:
        node = await self._call(self.client.get(Node, name))
        metadata = node.to_dict().get("metadata") or {}
        return metadata.get("uid")

    async def get_slice(self, name: str) -> dict[str, Any] | None:
        try:
            found = await self._call(self.client.get(ResourceSlice, name))
        except ApiError as error:
            if error.status == 404:
                return None
            raise
        return dict(found.to_dict())

    async def create_slice(self, obj: dict[str, Any]) -> dict[str, Any]:
        created = await self._call(self.client.create(_slice(obj)))
        return dict(created.to_dict())

    async def replace_slice(self, obj: dict[str, Any]) -> dict[str, Any]:
        replaced = await self._call(self.client.replace(_slice(obj)))
        return dict(replaced.to_dict())

    async def delete_slice(self, name: str) -> None:
        await self._call(self.client.delete(ResourceSlice, name))

    # ClaimSource
    async def get_claim(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            claim = await self._call(self.client.get(ResourceClaim, name, namespace=namespace))
        except ApiError as error:
            raise ClaimFetchError(
                f"cannot read ResourceClaim {namespace}/{name}: {error}"
            ) from None
        return dict(claim.to_dict())

    async def _call(self, request: Any) -> Any:
        """Await a lightkube call; its errors become one-line ApiErrors."""
        try:
            return await request
        except LightkubeApiError as error:
            status = error.status
            raise ApiError(
                status.code or 0, f"{status.code} {status.reason}: {status.message}"
            ) from None
        except OSError as error:
            raise ApiError(0, f"API server unreachable: {error}") from None
        except Exception as error:  # httpx's transport errors are not OSErrors
            if type(error).__module__.startswith(("httpx", "httpcore")):
                raise ApiError(0, f"API server unreachable: {error}") from None
            raise


def _slice(obj: dict[str, Any]) -> GenericGlobalResource:
    resource: GenericGlobalResource = ResourceSlice.from_dict(obj)
    return resource


def slice_publisher(
    api: KubeApi,
    node_name: str,
    sys_dir: Path,
    *,
    models: Mapping[str, str] = DEFAULT_MODELS,
    min_interval: float = MIN_INTERVAL,
) -> SlicePublisher:
    """The node's ResourceSlice sink, with the kernel driver's version read
    from ``sys_dir`` (``/sys/module/<driver>/version``) at each change."""
    return SlicePublisher(
        api,
        node_name,
        driver=DRA_DRIVER,
        models=models,
        driver_version=lambda driver: driver_version(sys_dir, driver),
        min_interval=min_interval,
    )
