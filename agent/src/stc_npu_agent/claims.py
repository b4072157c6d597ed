"""Where the DRA driver reads ResourceClaims from: a protocol, so the
Kubernetes API client stays out of the kubelet plugin (and out of its tests).

The production source reads the claim from the API server with a Kubernetes
client library; ``FakeClaimSource`` serves claims from a dict for tests.
Until a source is configured, ``MissingClaimSource`` fails every fetch with
one line that says so (each claim's answer carries it to the kubelet).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol


class ClaimFetchError(Exception):
    """The claim could not be read (missing, no access, API unreachable): one line."""


class ClaimSource(Protocol):
    async def get_claim(self, namespace: str, name: str) -> Mapping[str, Any]:
        """The ResourceClaim ``namespace/name`` as the API serves it (a dict),
        or ClaimFetchError."""


class MissingClaimSource:
    """No Kubernetes API client is configured: nothing can be prepared."""

    async def get_claim(self, namespace: str, name: str) -> Mapping[str, Any]:
        raise ClaimFetchError(
            f"cannot read ResourceClaim {namespace}/{name}: no Kubernetes API client is "
            "configured in this agent"
        )


class FakeClaimSource:
    """Claims from a dict keyed by (namespace, name); counts fetches."""

    def __init__(self, claims: Mapping[tuple[str, str], Mapping[str, Any]] | None = None) -> None:
        self.claims: dict[tuple[str, str], Mapping[str, Any]] = dict(claims or {})
        self.fetches = 0

    def put(self, claim: Mapping[str, Any]) -> None:
        metadata = claim["metadata"]
        self.claims[(metadata["namespace"], metadata["name"])] = claim

    async def get_claim(self, namespace: str, name: str) -> Mapping[str, Any]:
        self.fetches += 1
        try:
            return self.claims[(namespace, name)]
        except KeyError:
            raise ClaimFetchError(f"ResourceClaim {namespace}/{name} not found") from None
