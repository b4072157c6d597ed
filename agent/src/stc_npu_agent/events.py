"""What the agent reports as it happens, for whoever counts it (the metrics).

The lifecycle, the device state and the gRPC service call one ``AgentEvents``
object; this base class ignores every event, so the agent runs the same with
metrics off, and nothing is imported for them. ``metrics.Metrics`` counts.

Registration causes are a small fixed set (metric labels, never free text).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stc_npu_agent.core.devices import Inventory

# Why a registration happened: the agent started, or what ended the last one.
START = "start"
KUBELET_RESTART = "kubelet_restart"  # a new kubelet.sock
KUBELET_STOPPED = "kubelet_stopped"  # kubelet.sock removed
SOCKET_DELETED = "socket_deleted"  # our own socket deleted (a kubelet cleans its dir)
STREAM_ENDED = "stream_ended"  # the kubelet ended ListAndWatch
NO_STREAM = "no_stream"  # the kubelet opened no ListAndWatch in time
CAUSES = (START, KUBELET_RESTART, KUBELET_STOPPED, SOCKET_DELETED, STREAM_ENDED, NO_STREAM)

# A kubelet.sock's identity, as agent.socket_identity gives it.
KubeletIdentity = tuple[int, int]


class AgentEvents:
    """Every event the agent reports; each does nothing here."""

    def kubelet_seen(self, kubelet: KubeletIdentity) -> None:
        """The agent noticed this kubelet.sock (called again for the same one)."""

    def registered(self, cause: str, kubelet: KubeletIdentity | None) -> None:
        """Register succeeded with the kubelet of this kubelet.sock."""

    def registration_failed(self) -> None:
        """One Register attempt failed (it is retried with backoff)."""

    def call_finished(self, method: str, code: str, seconds: float) -> None:
        """A DevicePlugin call (Allocate, GetPreferredAllocation) answered
        with this gRPC status code name (OK, INVALID_ARGUMENT, ...)."""

    def inventory_changed(self, before: Inventory, after: Inventory) -> None:
        """A rescan changed the inventory (a new object, not a copy)."""

    # --- health signals and the vendor probe -------------------------------
    # Health: metrics.Metrics derives NPU health flips from inventory_changed
    # (under the signal that caused each); the vendor probe's runs come
    # through the state's health observers (see Agent.run).

    def health_transition(self, npu_id: str, signal: str, healthy: bool) -> None:
        """An NPU turned Healthy or Unhealthy because of ``signal``."""

    def probe_finished(self, seconds: float, ok: bool) -> None:
        """One vendor probe run ended (``ok``: its output was read)."""


NO_EVENTS = AgentEvents()
