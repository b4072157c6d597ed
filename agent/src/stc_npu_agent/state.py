"""The live device state: the inventory, kept current by rescans, and a wake-up
for every ListAndWatch stream when what the kubelet sees changes.

It is the hub of health: sources feed it (the device scan; the vendor probe
through ``probe_finished``), and observers follow it (``HealthObserver``:
each signal transition, each probe run).

Runs on the asyncio loop thread only (watchdog threads hand events over with
call_soon_threadsafe), so it needs no locks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from stc_npu_agent.core.config import HealthConfig, SignalPolicy
from stc_npu_agent.core.devices import DeviceRules, Inventory, NodeObservation, describe_changes
from stc_npu_agent.core.health import HealthBook, Reading, Transition, transitions
from stc_npu_agent.discovery import DeviceScanner
from stc_npu_agent.events import NO_EVENTS, AgentEvents

log = logging.getLogger(__name__)

# How long a new NPU must go without a new node before it is Healthy: the
# driver makes an NPU's nodes within milliseconds of each other.
SETTLE_SECONDS = 0.25

KubeletView = tuple[tuple[str, str, int | None], ...]


def kubelet_view(inventory: Inventory) -> KubeletView:
    """Exactly what a ListAndWatch message carries: ID, health, NUMA node."""
    return tuple((npu.id, npu.health, npu.numa_node) for npu in inventory.ordered())


@dataclass(frozen=True)
class ProbeRun:
    """One run of the vendor probe over every NPU."""

    finished_at: float  # wall clock (time.time()), for "last successful probe"
    duration: float  # seconds
    npus: int  # NPUs probed
    failed: tuple[str, ...]  # NPUs whose probe failed (timeout, exit, output)

    @property
    def ok(self) -> bool:
        return not self.failed


class HealthObserver(Protocol):
    """Follows health (e.g. metrics). Called on the event loop thread, after
    the inventory changed; must not block. An exception is logged, not raised."""

    def transition(self, change: Transition) -> None: ...

    def probe_run(self, run: ProbeRun) -> None: ...


class DeviceState:
    def __init__(self, scanner: DeviceScanner, health: HealthConfig | None = None) -> None:
        self.scanner = scanner
        self.rules: DeviceRules = scanner.rules
        self.policies: Mapping[str, SignalPolicy] = (health or HealthConfig()).signals
        self.health = HealthBook()
        self.observers: list[HealthObserver] = []
        self.last_probe: ProbeRun | None = None
        self.last_good_probe: ProbeRun | None = None
        self.inventory = Inventory()
        self._observations: list[NodeObservation] = []
        self.rescans = 0
        self.events: AgentEvents = NO_EVENTS
        self.scanned_at = 0.0  # the last scan without error (Unix time)
        self._view: KubeletView = ()
        self._changed = asyncio.Event()
        self._inventory_changed = asyncio.Event()
        self._rescan_pending = False
        # One timer per settle deadline: every rescan while an NPU settles
        # sees the same deadline, and must not add a timer of its own.
        self._settle_timers: dict[float, asyncio.TimerHandle] = {}

    def rescan(self) -> bool:
        """Scan now; wake the streams if the kubelet's view changed."""
        self._rescan_pending = False
        self.rescans += 1
        self._observations = self.scanner.scan()
        self.scanned_at = time.time()
        return self._judge()

    def _judge(self) -> bool:
        """The inventory from the last scan and the current signals; wake the
        streams if the kubelet's view changed."""
        observations = self._observations
        before = self.inventory
        loop = asyncio.get_running_loop()
        self.inventory = before.updated(
            observations, self.rules, self.health, now=loop.time(), settle=SETTLE_SECONDS
        )
        self.events.inventory_changed(before, self.inventory)
        settles_at = self.inventory.settles_at()
        if settles_at is not None and settles_at not in self._settle_timers:
            # Look again when a new NPU's settle time is over.
            self._settle_timers[settles_at] = loop.call_at(settles_at, self._settled, settles_at)
        self._report_transitions(before)
        for line in describe_changes(before, self.inventory):
            log.info("device %s", line)
        if self.inventory != before:
            # Sinks follow every change, also one the kubelet does not see
            # (a node of an NPU that is Unhealthy already).
            self._inventory_changed.set()
            self._inventory_changed = asyncio.Event()
        view = kubelet_view(self.inventory)
        if view == self._view:
            return False
        self._view = view
        self.wake()
        return True

    def probe_readings(self, npu_id: str, readings: Sequence[Reading]) -> None:
        """One NPU's vendor probe readings, as soon as they are in (a slow or
        hung run of another NPU must not hold them back): into the signals,
        judged with the nodes."""
        self.health = self.health.observed(npu_id, readings, self.policies)
        # The nodes as last scanned: every change to them has its own rescan.
        self._judge()

    def probe_finished(self, run: ProbeRun) -> None:
        """A vendor probe run over every NPU is over."""
        self.last_probe = run
        if run.ok:
            self.last_good_probe = run
        self._notify(run)

    def probe_document(self) -> dict[str, object] | None:
        """The vendor probe's last runs for /status (None: no run yet)."""
        run, good = self.last_probe, self.last_good_probe
        if run is None:
            return None
        return {
            "lastRunAt": run.finished_at,
            "lastRunSeconds": run.duration,
            "lastRunFailed": list(run.failed),
            "lastSuccessAt": good.finished_at if good is not None else None,
        }

    def _report_transitions(self, before: Inventory) -> None:
        """One log line per signal that turned bad or good, for NPUs known
        before (a new NPU's line says how it appeared)."""
        for npu in self.inventory.ordered():
            old = before.get(npu.id)
            if old is None:
                continue
            for change in transitions(npu.id, old.signals, npu.signals):
                log.info(
                    "health %s %s %s -> %s: %s",
                    change.npu,
                    change.signal,
                    change.old,
                    change.new,
                    change.value,
                )
                self._notify(change)

    def _notify(self, event: Transition | ProbeRun) -> None:
        for observer in self.observers:
            try:
                if isinstance(event, Transition):
                    observer.transition(event)
                else:
                    observer.probe_run(event)
            except Exception:  # a broken observer must not stop health
                log.exception("health observer %r failed", observer)

    def _settled(self, deadline: float) -> None:
        del self._settle_timers[deadline]
        self.schedule_rescan()

    def schedule_rescan(self) -> None:
        """Coalesce a burst of file system events into one rescan."""
        if not self._rescan_pending:
            self._rescan_pending = True
            asyncio.get_running_loop().call_soon(self.rescan)

    def wake(self) -> None:
        """Wake every waiting stream (to send the list, or to notice a close)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def next_change(self) -> asyncio.Event:
        """The event the next change sets; take it before reading the state."""
        return self._changed

    def next_inventory_change(self) -> asyncio.Event:
        """Set by the next rescan that changes anything in the inventory."""
        return self._inventory_changed
