"""Sinks: side effects that follow the inventory (the CDI spec file, the
NFD feature file).

The inventory is the hub; a sink turns the current inventory into one side
effect outside the agent. The lifecycle runs every sink at start, on every
change of the inventory (not only those the kubelet sees), on a tick (so a
side effect undone by someone else is redone within a tick), and once on a
clean stop. A sink's failure is its own: it is logged, and the agent keeps
serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from stc_npu_agent.core.config import Config
from stc_npu_agent.core.devices import Inventory
from stc_npu_agent.state import DeviceState

log = logging.getLogger(__name__)


class Sink(Protocol):
    name: str

    def update(self, inventory: Inventory) -> None:
        """Make the side effect match ``inventory``; cheap when it already does."""

    def stop(self) -> None:
        """The agent stops cleanly: undo the side effect if that is right."""


def no_prepared_claims() -> int:
    return 0


def sinks_for(
    config: Config,
    other_agent_serving: Callable[[], bool],
    *,
    sys_dir: Path,
    hpe_dir: Path | None,
    prepared_claims: Callable[[], int] = no_prepared_claims,
) -> list[Sink]:
    """The sinks the config asks for. ``other_agent_serving`` tells a sink at
    stop whether another agent of ours serves this node (a rolling update's
    overlap), whose side effects must stay; ``prepared_claims`` (mode dra)
    how many claims the node's pods hold, whose CDI IDs must stay resolvable."""
    sinks: list[Sink] = []
    if config.uses_cdi:
        from stc_npu_agent.cdi import CdiSpecSink  # noqa: PLC0415 (only when used)

        sinks.append(
            CdiSpecSink(
                Path(config.cdi.spec_dir),
                config.resource_name,
                config.hpe,
                other_agent_serving,
                prepared_claims,
            )
        )
    if config.nfd.enabled:
        from stc_npu_agent.nfd import NfdFeatureFile  # noqa: PLC0415 (only when used)

        sinks.append(NfdFeatureFile(config, other_agent_serving, sys_dir=sys_dir, hpe_dir=hpe_dir))
    return sinks


class SinkSet:
    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = tuple(sinks)

    def update(self, inventory: Inventory) -> None:
        for sink in self.sinks:
            try:
                sink.update(inventory)
            except Exception:
                log.exception("sink %s failed to follow the inventory", sink.name)

    async def follow(self, state: DeviceState, tick: float) -> None:
        """Update every sink on each change of ``state``, and at least every ``tick``."""
        if not self.sinks:
            return
        while True:
            change = state.next_inventory_change()  # taken before reading, as a stream does
            self.update(state.inventory)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(change.wait(), tick)

    def stop(self) -> None:
        for sink in self.sinks:
            try:
                sink.stop()
            except Exception:
                log.exception("sink %s failed to stop", sink.name)
