"""The ResourceSlice publisher (DRA mode): a sink that keeps the node's slice
true to the inventory on the API server.

The slice itself is built in ``core/slices.py``; this module decides when to
write and talks to the API through ``SliceApi`` (``kubeapi.py``).
- Published at start, then on every change of what the slice would say
  (inventory or health); the lifecycle's tick costs nothing when it is the
  same. Every minute, and at once on ``resync()`` (to be called on each
  registration with the kubelet: a starting kubelet deletes the slices of
  drivers not yet registered), the slice is read back, so one deleted or
  changed by someone else is put right.
- Coalesced: at most one write per ``min_interval`` (1 s by default); the
  changes in between are folded into the next write, which carries the
  latest inventory. An NPU flapping on thousands of nodes costs the API
  server at most one write per node per interval.
- A restarted agent reads the slice first and writes nothing when its
  devices are already right: restarts and rolling updates do not churn it.
- Not deleted when the agent stops: a restart or an update must not make
  the node's NPUs vanish from the scheduler. It goes when the Node goes (an
  owner reference) and when the driver is gone from the node: the kubelet
  deletes a driver's slices once its plugin has been unregistered for a
  while (30 s), which an uninstall does and a restart does not.
- Unhealthy NPUs are tainted ``NoSchedule`` where the API server keeps
  device taints. Whether it does is read from its answer to a write with a
  taint (a server without the DRADeviceTaints feature drops the field
  silently); from then on, until the agent restarts, Unhealthy NPUs are
  left out instead.
- API errors are one warning line per distinct problem; the write is
  retried with backoff, and the agent keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from stc_npu_agent.core import slices as core
from stc_npu_agent.core.devices import Inventory

log = logging.getLogger(__name__)

MIN_INTERVAL = 1.0  # seconds between two writes of the slice
RESYNC_INTERVAL = 60.0  # seconds between read-backs when nothing changed
MAX_BACKOFF = 30.0


class ApiError(Exception):
    """An API call failed: ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SliceApi(Protocol):
    async def node_uid(self, name: str) -> str | None: ...

    async def get_slice(self, name: str) -> dict[str, Any] | None:
        """The slice, or None when there is none."""

    async def create_slice(self, obj: dict[str, Any]) -> dict[str, Any]: ...

    async def replace_slice(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Update with ``metadata.resourceVersion``: ApiError 409 when stale."""

    async def delete_slice(self, name: str) -> None: ...


class SlicePublisher:
    name = "resource-slices"

    def __init__(
        self,
        api: SliceApi,
        node_name: str,
        *,
        driver: str,
        models: Mapping[str, str] = core.DEFAULT_MODELS,
        driver_version: Callable[[str], str | None] = lambda driver: None,
        min_interval: float = MIN_INTERVAL,
        resync_interval: float = RESYNC_INTERVAL,
    ) -> None:
        self.api = api
        self.node_name = node_name
        self.driver = driver
        self.models = models
        self.driver_version = driver_version
        self.min_interval = min_interval
        self.resync_interval = resync_interval
        self.slice_name = core.slice_name(node_name, driver)
        self.writes = 0
        self.write_times: deque[float] = deque(maxlen=100)  # monotonic, the latest writes
        # None until a write with a taint shows whether the server keeps taints.
        self.taints_supported: bool | None = None
        self._inventory: Inventory | None = None
        self._current: dict[str, Any] | None = None  # the slice as last read or written
        self._known = False  # _current is what the server has (None: no slice)
        self._node_uid: str | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_write = -float("inf")
        self._problem = ""
        # Set whenever the server's slice matches the latest inventory.
        self.in_sync = asyncio.Event()

    def status(self) -> dict[str, object]:
        """For the agent's /status: is the slice as the inventory says, and
        if not, the last reason (the agent is Ready once the kubelet
        registered it, whatever the API server does)."""
        return {
            "name": self.slice_name,
            "inSync": self.in_sync.is_set(),
            "writes": self.writes,
            "problem": self._problem or None,
        }

    # The Sink protocol (called on the loop's thread).
    def update(self, inventory: Inventory) -> None:
        if self._inventory is not None and self._devices(inventory) == self._devices(
            self._inventory
        ):
            self._inventory = inventory
            return
        self._inventory = inventory
        self.in_sync.clear()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    def stop(self) -> None:
        """Stop writing; the slice stays (see the module docstring)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def resync(self) -> None:
        """Read the slice back and put it right now (e.g. after the kubelet,
        which deletes slices when it starts, registered us again)."""
        self._known = False
        if self._task is not None:
            self.in_sync.clear()
            self._wake.set()

    async def delete(self) -> None:
        """Remove the node's slice (an operator's explicit clean-up)."""
        self.stop()
        with contextlib.suppress(ApiError):
            await self.api.delete_slice(self.slice_name)

    def _devices(self, inventory: Inventory) -> list[dict[str, Any]]:
        drivers = {npu.pci.driver for npu in inventory.npus.values() if npu.pci.driver}
        versions = {driver: v for driver in drivers if (v := self.driver_version(driver))}
        return core.devices(
            inventory,
            models=self.models,
            driver_versions=versions,
            taints=self.taints_supported is not False,
        )

    async def _run(self) -> None:
        backoff = self.min_interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.resync_interval)
            if not self._wake.is_set():
                self._known = False  # resync: read the slice back
            self._wake.clear()
            delay = self._last_write + self.min_interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # changes meanwhile fold into this write
            self._wake.clear()
            try:
                await self._publish()
            except Exception as error:  # an API error, or a slice we cannot read
                self._known = False
                if not isinstance(error, ApiError):
                    log.debug("publishing ResourceSlice %s", self.slice_name, exc_info=True)
                self._report(f"cannot publish ResourceSlice {self.slice_name}: {error}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                self._wake.set()
                continue
            backoff = self.min_interval
            self._report("")

    async def _publish(self) -> None:
        """One round: read if needed, write if the devices differ."""
        inventory = self._inventory
        if inventory is None:
            return
        if self._node_uid is None:
            self._node_uid = await self._read_node_uid()
        if not self._known:
            self._current = await self.api.get_slice(self.slice_name)
            self._known = True
        desired = self._devices(inventory)
        current = self._current
        if current is not None and self._same(current, desired):
            self.in_sync.set()
            return
        generation = 1
        if current is not None:
            # A slice someone else wrote may lack fields: ours replaces it.
            pool = (current.get("spec") or {}).get("pool") or {}
            generation = int(pool.get("generation") or 0) + 1
            core.keep_taint_times(desired, (current.get("spec") or {}).get("devices") or [])
        obj = core.slice_object(
            node_name=self.node_name,
            node_uid=self._node_uid or None,
            driver=self.driver,
            generation=generation,
            device_list=desired,
        )
        self._last_write = time.monotonic()
        self.writes += 1
        self.write_times.append(self._last_write)
        if current is None:
            stored = await self.api.create_slice(obj)
        else:
            obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            stored = await self.api.replace_slice(obj)
        self._current = stored
        log.info(
            "published ResourceSlice %s (pool generation %d): %s",
            self.slice_name,
            generation,
            ", ".join(_summary(device) for device in desired) or "no devices",
        )
        self._learn_taint_support(desired, stored)
        # The latest inventory, not the one written: it may have moved on
        # while the write was on its way.
        latest = self._inventory
        if latest is not None and self._same(stored, self._devices(latest)):
            self.in_sync.set()
        else:
            self._wake.set()  # the inventory moved on, or taints fell back

    def _learn_taint_support(self, sent: list[dict[str, Any]], stored: dict[str, Any]) -> None:
        if not any(device.get("taints") for device in sent):
            return
        kept = core.taints_kept(sent, (stored.get("spec") or {}).get("devices") or [])
        if kept != self.taints_supported:
            self.taints_supported = kept
            if not kept:
                log.warning(
                    "the API server dropped the device taints of ResourceSlice %s (feature "
                    "DRADeviceTaints off): Unhealthy NPUs are left out of the slice instead",
                    self.slice_name,
                )

    def _same(self, current: dict[str, Any], desired: list[dict[str, Any]]) -> bool:
        spec = current.get("spec") or {}
        return (
            spec.get("nodeName") == self.node_name
            and (spec.get("pool") or {}).get("name") == self.node_name
            and (spec.get("pool") or {}).get("resourceSliceCount") == 1
            and core.comparable_devices(spec.get("devices") or []) == desired
            and _owner_uid(current) == (self._node_uid or None)
        )

    async def _read_node_uid(self) -> str:
        """The Node's UID for the owner reference; "" when the agent may not
        read it (or it is not there). Any other error (no answer, a server
        error) fails the round, so the Node is read again with its retries:
        an agent that started before it could reach the API server must not
        publish an orphan slice for good."""
        try:
            return await self.api.node_uid(self.node_name) or ""
        except ApiError as error:
            if error.status not in (401, 403, 404):
                raise
            log.warning(
                "cannot read Node %s (%s): its ResourceSlice gets no owner reference and "
                "outlives a deleted Node until the kubelet's clean-up",
                self.node_name,
                error,
            )
            return ""

    def _report(self, problem: str) -> None:
        """Warn once per distinct problem (retries repeat it)."""
        if problem and problem != self._problem:
            log.warning("%s; retrying", problem)
        elif not problem and self._problem:
            log.info("ResourceSlice %s is published again", self.slice_name)
        self._problem = problem


def _owner_uid(obj: dict[str, Any]) -> str | None:
    for owner in (obj.get("metadata") or {}).get("ownerReferences") or ():
        if owner.get("kind") == "Node":
            return str(owner.get("uid"))
    return None


def _summary(device: dict[str, Any]) -> str:
    taints = device.get("taints")
    return f"{device['name']} (tainted: {taints[0]['value']})" if taints else device["name"]
