"""Prometheus metrics at /metrics on the probe port (``metrics.enabled``).

A registry of our own (not prometheus-client's global one, which would add
the process and platform collectors of whoever imports us). Gauges are read
from the agent when scraped (no second copy of its state); counters and
histograms are fed by the agent's events (``events.AgentEvents``).

Imported only when metrics are enabled: the agent's cold start does not pay
for prometheus-client otherwise.

Scrapes come from the probe server's thread while the asyncio loop updates:
prometheus-client's metrics take their own locks, and what the collector
reads from the agent are plain attribute reads of immutable objects.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from stc_npu_agent import __version__
from stc_npu_agent.core.devices import HEALTHY, SETTLING, UNHEALTHY, Inventory, Npu
from stc_npu_agent.core.health import Transition
from stc_npu_agent.events import CAUSES, AgentEvents, KubeletIdentity
from stc_npu_agent.probes import Query, Reply
from stc_npu_agent.state import ProbeRun

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from stc_npu_agent.agent import Agent

PREFIX = "stc_npu_"
# Calls answer in about a millisecond; the top buckets catch a stalled loop.
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
# A kubelet restart to Register: tens of ms when all is well; up to the
# backoff cap (5 s) and the 1.26+ dial (10 s) when not.
REGISTER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The vendor probe runs a tool with a timeout of seconds.
PROBE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Health signals known today: what makes an NPU Unhealthy in core.devices.
PRESENCE = "presence"  # a node missing, dead, or not a character device
IDENTITY = "identity"  # a node that is not this NPU's by sysfs
SETTLE = "settling"  # a new NPU waiting for all its nodes
CHECK = "check"  # any other problem


class Source(Protocol):
    """What the collector reads from the agent at scrape time."""

    @property
    def inventory(self) -> Inventory: ...

    @property
    def registered(self) -> bool: ...

    @property
    def open_streams(self) -> int: ...

    @property
    def last_scan(self) -> float: ...


class AgentSource:
    """The running agent as a ``Source``."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    @property
    def inventory(self) -> Inventory:
        return self._agent.state.inventory

    @property
    def registered(self) -> bool:
        return self._agent.registered

    @property
    def open_streams(self) -> int:
        instance = self._agent.instance
        return instance.streams.open_streams if instance is not None else 0

    @property
    def last_scan(self) -> float:
        return self._agent.state.scanned_at


def health_signal(npu: Npu) -> str:
    """The signal behind an Unhealthy NPU's reason (its first problem's)."""
    if npu.impostors:
        return IDENTITY
    if npu.reason.startswith(("missing ", "no device behind ", "not a character device")):
        return PRESENCE
    if npu.reason == SETTLING:
        return SETTLE
    # The vendor probe's signals that count (cardStatus, clusterStatus, ...).
    for name, signal in npu.signals.items():
        if signal.counts:
            return name
    return CHECK


def health_transitions(before: Inventory, after: Inventory) -> list[tuple[str, str, bool]]:
    """(NPU, signal, now healthy) for each NPU whose health flipped. An NPU
    that appears is no transition; one that recovers is counted under the
    signal that had made it Unhealthy."""
    flips = []
    for npu in after.ordered():
        old = before.get(npu.id)
        if old is None or old.healthy == npu.healthy:
            continue
        flips.append((npu.id, health_signal(old if npu.healthy else npu), npu.healthy))
    return flips


class _AgentCollector(Collector):
    def __init__(self, source: Source) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        source = self.source
        inventory = source.inventory
        npus = GaugeMetricFamily(
            f"{PREFIX}npus", "NPUs the agent lists, by the health it advertises.", labels=["health"]
        )
        healthy = len(inventory.healthy_ids())
        npus.add_metric([HEALTHY], healthy)
        npus.add_metric([UNHEALTHY], len(inventory.npus) - healthy)
        yield npus
        yield GaugeMetricFamily(
            f"{PREFIX}registered",
            "1 while registered with the kubelet, else 0.",
            value=int(source.registered),
        )
        yield GaugeMetricFamily(
            f"{PREFIX}list_and_watch_streams",
            "ListAndWatch streams the kubelet holds open to the current plugin socket.",
            value=source.open_streams,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}last_scan_timestamp_seconds",
            "When the device directory was last scanned (Unix time; a scan does not fail: an "
            "unreadable directory is an empty scan, and every NPU turns Unhealthy).",
            value=source.last_scan,
        )


class Metrics(AgentEvents):
    """The agent's metrics: fed by its events, read by ``scrape``."""

    def __init__(self, labels: Mapping[str, str] | None = None) -> None:
        # No *_created series beside every counter and histogram: they would
        # double a scrape and say only when the agent started (process-wide,
        # and this process has no other metrics).
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
        self.registry = CollectorRegistry()
        registry = self.registry
        Info(f"{PREFIX}build", "The agent's version.", registry=registry).info(
            {"version": __version__, "python": platform.python_version(), **(labels or {})}
        )
        self.registrations = Counter(
            f"{PREFIX}registrations",
            "Successful registrations with the kubelet, by cause (start: the agent started; "
            "any other: what ended the previous registration).",
            ["cause"],
            registry=registry,
        )
        for cause in CAUSES:  # every cause present from the start, at 0
            self.registrations.labels(cause)
        self.registration_failures = Counter(
            f"{PREFIX}registration_failures",
            "Register attempts that failed (each is retried with backoff).",
            registry=registry,
        )
        self.restart_to_register = Histogram(
            f"{PREFIX}kubelet_restart_to_register_seconds",
            "From a new kubelet.sock seen to Register answered by that kubelet.",
            buckets=REGISTER_BUCKETS,
            registry=registry,
        )
        self.calls = Histogram(
            f"{PREFIX}device_plugin_call_duration_seconds",
            "Allocate and GetPreferredAllocation calls, by gRPC status code; the count is "
            "the number of calls.",
            ["method", "code"],
            buckets=CALL_BUCKETS,
            registry=registry,
        )
        self.transitions = Counter(
            f"{PREFIX}health_transitions",
            "NPUs turning Healthy or Unhealthy, by the signal behind it.",
            ["signal", "health"],
            registry=registry,
        )
        self.probe_duration = Histogram(
            f"{PREFIX}probe_duration_seconds",
            "Runs of the vendor health probe.",
            buckets=PROBE_BUCKETS,
            registry=registry,
        )
        self.last_probe = Gauge(
            f"{PREFIX}last_probe_success_timestamp_seconds",
            "When the vendor health probe last read its tool's output (Unix time; 0: never).",
            registry=registry,
        )
        # kubelet.sock identity -> when first seen (monotonic); the last
        # identity registered with.
        self._first_seen: dict[KubeletIdentity, float] = {}
        self._registered_with: KubeletIdentity | None = None

    def watch(self, source: Source) -> None:
        """Read the gauges from ``source`` at every scrape."""
        self.registry.register(_AgentCollector(source))

    def scrape(self, query: Query) -> Reply:
        """The /metrics route."""
        text = generate_latest(self.registry).decode()
        return Reply(200, text.removesuffix("\n"), CONTENT_TYPE_LATEST)

    # --- events ---

    def kubelet_seen(self, kubelet: KubeletIdentity) -> None:
        if kubelet not in self._first_seen:
            # Only the current and the next kubelet matter: bounded.
            self._first_seen = {
                k: v for k, v in self._first_seen.items() if k == self._registered_with
            }
            self._first_seen[kubelet] = time.monotonic()

    def registered(self, cause: str, kubelet: KubeletIdentity | None) -> None:
        self.registrations.labels(cause).inc()
        previous, self._registered_with = self._registered_with, kubelet
        seen = self._first_seen.get(kubelet) if kubelet is not None else None
        # The first registration follows the agent's start, not a kubelet restart.
        if previous is not None and kubelet != previous and seen is not None:
            self.restart_to_register.observe(time.monotonic() - seen)

    def registration_failed(self) -> None:
        self.registration_failures.inc()

    def call_finished(self, method: str, code: str, seconds: float) -> None:
        self.calls.labels(method, code).observe(seconds)

    def inventory_changed(self, before: Inventory, after: Inventory) -> None:
        # Per NPU flip, under the signal that made it Unhealthy (the health
        # engine's own per-signal hysteresis is in /status and diagnose).
        for npu_id, signal, healthy in health_transitions(before, after):
            self.health_transition(npu_id, signal, healthy)

    def health_transition(self, npu_id: str, signal: str, healthy: bool) -> None:
        self.transitions.labels(signal, HEALTHY if healthy else UNHEALTHY).inc()

    # --- a health observer of the state (state.HealthObserver) ---

    def transition(self, change: Transition) -> None:
        """Counted per NPU flip instead (``inventory_changed``)."""

    def probe_run(self, run: ProbeRun) -> None:
        self.probe_finished(run.duration, run.ok)

    def probe_finished(self, seconds: float, ok: bool) -> None:
        self.probe_duration.observe(seconds)
        if ok:
            self.last_probe.set(time.time())
