"""The device model and inventory: which NPUs exist and whether they are healthy.

Pure: a scan of the device directory comes in as plain observations (what
each node is), the inventory comes out. No file system, no clock.

Rules, and why:
- An NPU exists once its own node (``stc<N>``) has been seen. Its ID is that
  node's name, so it is stable across agent restarts.
- An NPU, once seen, stays listed. When its nodes vanish (hot-unplug, driver
  unload) it turns Unhealthy rather than disappearing: the kubelet keeps the
  capacity and the pods already bound to it keep their accounting.
- The nodes an NPU must have are all those ever seen for it. An NPU missing any
  of them, or whose node is no longer a character device (replaced by a file
  or a symlink), is Unhealthy; when they are all back it is Healthy again.
  Health always follows the present state: it is never sticky.
- A new NPU's nodes appear one by one (the driver makes them in turn), and
  nothing says how many there will be. So an NPU that appears after the first
  scan, and has never been Healthy, waits until no new node of it has come
  for a settle time before it is Healthy: a container must never get a
  partial set. NPUs present at the first scan, and NPUs coming back whose
  nodes are known, need no wait.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Protocol

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"


class NodeKind(Enum):
    CHAR_DEVICE = "char"
    OTHER = "other"  # a regular file, symlink, directory, block device...


@dataclass(frozen=True)
class NodeObservation:
    """One directory entry whose name matched an NPU pattern."""

    name: str
    kind: NodeKind
    # (major, minor) for character devices, None otherwise.
    rdev: tuple[int, int] | None = None


@dataclass(frozen=True)
class PciInfo:
    """What sysfs says about the PCI function behind an NPU's own node."""

    numa_node: int | None = None  # None: no topology (sysfs -1 or missing)
    vendor: str | None = None  # "0x23e2" for Stream Computing
    device: str | None = None
    address: str | None = None  # PCI bus/device/function, e.g. 0000:03:00.0


@dataclass(frozen=True)
class Npu:
    id: str
    index: int
    # Every node this NPU must have, own node first, then members by name.
    expected_nodes: tuple[str, ...]
    # The subset of expected_nodes present as character devices now.
    present_nodes: tuple[str, ...]
    pci: PciInfo = field(default_factory=PciInfo)
    healthy: bool = False
    reason: str = ""  # why it is Unhealthy; empty when Healthy
    ever_healthy: bool = False  # then expected_nodes is complete
    # A new NPU is not Healthy before this time (the clock the caller uses).
    settling_until: float = 0.0

    @property
    def health(self) -> str:
        return HEALTHY if self.healthy else UNHEALTHY

    @property
    def numa_node(self) -> int | None:
        return self.pci.numa_node


class Naming:
    """Classifies node names with the configured full-match patterns."""

    def __init__(self, npu_pattern: str, member_pattern: str) -> None:
        self._npu = re.compile(npu_pattern)
        self._member = re.compile(member_pattern)

    def classify(self, name: str) -> tuple[int, bool] | None:
        """(NPU index, is the NPU's own node) for a matching name, else None."""
        match = self._npu.fullmatch(name)
        if match:
            return int(match.group("index")), True
        match = self._member.fullmatch(name)
        if match:
            return int(match.group("index")), False
        return None


class HealthCheck(Protocol):
    """A health probe beyond node presence (e.g. one based on stc-smi).

    Called only for NPUs whose nodes are all present; returns None when the
    NPU is fine, otherwise a short reason. Implementations that do I/O live
    outside the core and are handed in.
    """

    def problem(self, npu: Npu) -> str | None: ...


def node_sort_key(name: str) -> tuple[tuple[int, str], ...]:
    """Natural order (stc0c2 before stc0c10, clusters before ctrl)."""
    parts = re.split(r"([0-9]+)", name)
    return tuple((int(part), "") if part.isdigit() else (-1, part) for part in parts)


def _ordered_nodes(own: str, members: Iterable[str]) -> tuple[str, ...]:
    return (own, *sorted(set(members) - {own}, key=node_sort_key))


@dataclass(frozen=True)
class Inventory:
    """All NPUs known, keyed by ID. Immutable: updates return a new one."""

    npus: Mapping[str, Npu] = field(default_factory=dict)
    # False only before the first scan: what that scan finds was there before
    # the agent, so it needs no settle time.
    scanned: bool = False

    def get(self, npu_id: str) -> Npu | None:
        return self.npus.get(npu_id)

    def ordered(self) -> list[Npu]:
        return sorted(self.npus.values(), key=lambda npu: (npu.index, npu.id))

    def healthy_ids(self) -> set[str]:
        return {npu.id for npu in self.npus.values() if npu.healthy}

    def updated(
        self,
        observations: Iterable[NodeObservation],
        naming: Naming,
        pci: Mapping[str, PciInfo],
        checks: Sequence[HealthCheck] = (),
        *,
        now: float = 0.0,
        settle: float = 0.0,
    ) -> Inventory:
        """The inventory after a full scan of the device directory.

        ``pci`` maps NPU IDs to what sysfs said (missing: keep what we knew).
        ``now`` is the caller's clock, ``settle`` how long a new NPU must go
        without a new node before it is Healthy (see the module docstring).
        """
        own_nodes: dict[int, NodeObservation] = {}
        members: dict[int, list[NodeObservation]] = {}
        for observation in observations:
            classified = naming.classify(observation.name)
            if classified is None:
                continue
            index, is_own = classified
            if is_own:
                own_nodes[index] = observation
            else:
                members.setdefault(index, []).append(observation)

        known_by_index = {npu.index: npu for npu in self.npus.values()}
        result: dict[str, Npu] = {}
        for index in sorted(set(known_by_index) | set(own_nodes)):
            previous = known_by_index.get(index)
            own = own_nodes.get(index)
            npu_id = previous.id if previous else own.name  # type: ignore[union-attr]
            seen = {observation.name: observation for observation in members.get(index, [])}
            if own is not None:
                seen[own.name] = own
            expected = _ordered_nodes(
                npu_id, (*(previous.expected_nodes if previous else ()), *seen)
            )
            present = tuple(
                name
                for name in expected
                if name in seen and seen[name].kind is NodeKind.CHAR_DEVICE
            )
            ever_healthy = previous.ever_healthy if previous else False
            settling_until = previous.settling_until if previous else 0.0
            grew = previous is None or len(expected) > len(previous.expected_nodes)
            if self.scanned and grew and not ever_healthy:
                settling_until = now + settle
            npu = Npu(
                id=npu_id,
                index=index,
                expected_nodes=expected,
                present_nodes=present,
                pci=pci.get(npu_id, previous.pci if previous else PciInfo()),
                ever_healthy=ever_healthy,
                settling_until=settling_until,
            )
            result[npu_id] = _judge(npu, seen, checks, now)
        return Inventory(result, scanned=True)

    def settles_at(self) -> float | None:
        """When the first settling NPU may turn Healthy (None: none settling)."""
        waiting = [npu.settling_until for npu in self.npus.values() if npu.reason == SETTLING]
        return min(waiting) if waiting else None


SETTLING = "new NPU, waiting for all its nodes"


def _judge(
    npu: Npu, seen: Mapping[str, NodeObservation], checks: Sequence[HealthCheck], now: float
) -> Npu:
    """Health from presence first, then the settle time, then each extra check."""
    missing = [name for name in npu.expected_nodes if name not in seen]
    not_char = [
        name for name in npu.expected_nodes if name in seen and name not in npu.present_nodes
    ]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if not_char:
        problems.append(f"not a character device: {', '.join(not_char)}")
    if not problems and not npu.ever_healthy and now < npu.settling_until:
        problems.append(SETTLING)
    if not problems:
        for check in checks:
            problem = check.problem(npu)
            if problem:
                problems.append(problem)
                break
    healthy = not problems
    return replace(
        npu,
        healthy=healthy,
        reason="; ".join(problems),
        ever_healthy=npu.ever_healthy or healthy,
    )


def describe_changes(before: Inventory, after: Inventory) -> list[str]:
    """One human line per NPU that appeared or changed health (not reason alone:
    an unplug removes six nodes one by one, and one line is enough)."""
    lines = []
    for npu in after.ordered():
        old = before.get(npu.id)
        if old is None:
            numa = "none" if npu.numa_node is None else str(npu.numa_node)
            lines.append(
                f"{npu.id} appeared: {npu.health}, NUMA {numa}, {len(npu.present_nodes)} nodes"
            )
        elif old.healthy != npu.healthy:
            why = f" ({npu.reason})" if npu.reason else ""
            lines.append(f"{npu.id} {old.health} -> {npu.health}{why}")
    return lines
