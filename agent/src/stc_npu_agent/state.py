"""The live device state: the inventory, kept current by rescans, and a wake-up
for every ListAndWatch stream when what the kubelet sees changes.

Runs on the asyncio loop thread only (watchdog threads hand events over with
call_soon_threadsafe), so it needs no locks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from stc_npu_agent.core.devices import DeviceRules, HealthCheck, Inventory, describe_changes
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


class DeviceState:
    def __init__(self, scanner: DeviceScanner, checks: Sequence[HealthCheck] = ()) -> None:
        self.scanner = scanner
        self.rules: DeviceRules = scanner.rules
        self.checks = tuple(checks)
        self.inventory = Inventory()
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
        observations = self.scanner.scan()
        self.scanned_at = time.time()
        before = self.inventory
        loop = asyncio.get_running_loop()
        self.inventory = before.updated(
            observations, self.rules, self.checks, now=loop.time(), settle=SETTLE_SECONDS
        )
        self.events.inventory_changed(before, self.inventory)
        settles_at = self.inventory.settles_at()
        if settles_at is not None and settles_at not in self._settle_timers:
            # Look again when a new NPU's settle time is over.
            self._settle_timers[settles_at] = loop.call_at(settles_at, self._settled, settles_at)
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
