"""The device model and inventory: which NPUs exist and whether they are healthy.

Pure: a scan of the device directory comes in as plain observations (what
each node is), the inventory comes out. No file system, no clock.

Rules, and why:
- An NPU exists once its own node (``stc<N>``) has been seen. Its ID is that
  node's name, so it is stable across agent restarts.
- An NPU, once seen, stays listed. When its nodes vanish (hot-unplug, driver
  unload) it turns Unhealthy rather than disappearing: the kubelet keeps the
  capacity and the pods already bound to it keep their accounting.
- Names are the configured patterns' full matches, with the index as a plain
  decimal number: ``stc01`` is not NPU 1 (it would mix its nodes into
  ``stc1``'s), and a name whose index is empty or absent is no NPU's.
- The nodes an NPU must have are its required members (configured; by
  default the documented ``c0..c3`` and ``ctrl``) and all those ever seen for
  it. An NPU missing any of them, from the first scan on, or whose node is no
  longer a character device (replaced by a file or a symlink), is Unhealthy;
  when they are all back it is Healthy again. Health always follows the
  present state: it is never sticky.
- A name is not enough: every node of an NPU must be a character device that
  sysfs resolves to a PCI function of an allowed vendor, bound to an allowed
  driver, and the members to the very function of the NPU's own node (one
  card's nodes are one PCI function on the STCP920; a member on another
  function is another card's node, or none). Its numbers must be those of
  the kernel device of the same name (udev names nodes after them), so one
  device cannot be handed out twice under two names. Anything else, e.g.
  ``mknod stc7 c 1 3``, is listed but never Healthy, with the reason.
- A new NPU's nodes appear one by one (the driver makes them in turn), and
  nothing says how many there will be. So an NPU that appears after the first
  scan, and has never been Healthy, waits until no new node of it has come
  for a settle time before it is Healthy: a container must never get a
  partial set. NPUs present at the first scan, and NPUs coming back whose
  nodes are known, need no wait.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum

from stc_npu_agent.core.config import INDEX, DiscoveryConfig
from stc_npu_agent.core.health import (
    PCI_DRIVER,
    PRESENCE,
    HealthBook,
    Reading,
    Signals,
    immediate,
    ordered,
)

HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"


class NodeKind(Enum):
    CHAR_DEVICE = "char"
    # A char device node whose numbers no device has (no sysfs entry): the
    # kernel removed the device and udev has yet to remove the node, or it
    # was made by hand. Dead, like a missing node, not an impostor.
    NO_DEVICE = "no device"
    OTHER = "other"  # a regular file, symlink, directory, block device...


@dataclass(frozen=True)
class PciInfo:
    """What sysfs says about the PCI function behind a character device."""

    numa_node: int | None = None  # None: no topology (sysfs -1 or missing)
    vendor: str | None = None  # "0x23e2" for Stream Computing
    device: str | None = None
    address: str | None = None  # PCI bus/device/function, e.g. 0000:03:00.0
    driver: str | None = None  # the bound kernel driver; None: none bound
    # The PCI root complex the function sits under (its first sysfs ancestor,
    # e.g. pci0000:00): DRA's standard resource.kubernetes.io/pcieRoot.
    pcie_root: str | None = None


@dataclass(frozen=True)
class NodeObservation:
    """One directory entry whose name matched an NPU pattern."""

    name: str
    kind: NodeKind
    # (major, minor) for character devices, None otherwise.
    rdev: tuple[int, int] | None = None
    # The PCI function sysfs resolves a character device to; None when it
    # resolves to none, with ``unresolved`` saying why (one short phrase).
    pci: PciInfo | None = None
    unresolved: str = ""
    # The kernel's name for the device with these numbers (its sysfs class
    # device), which udev gives the node: another name is another node's
    # numbers under this name (e.g. ``mknod stc5 c 240 0`` beside stc0).
    kernel_name: str | None = None


@dataclass(frozen=True)
class Npu:
    id: str
    index: int
    # Every node this NPU must have, own node first, then members by name.
    expected_nodes: tuple[str, ...]
    # The subset of expected_nodes present as character devices now.
    present_nodes: tuple[str, ...]
    # The own node's PCI function (remembered while the node is away).
    pci: PciInfo = field(default_factory=PciInfo)
    # (major, minor) of each present node: Allocate checks they still are.
    devnums: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    # Nodes that are not this NPU's by sysfs, one phrase each.
    impostors: tuple[str, ...] = ()
    healthy: bool = False
    reason: str = ""  # why it is Unhealthy; empty when Healthy
    # Every signal read so far, by name (core.health): what the reason says,
    # and what an ignored or recovering signal reads.
    signals: Signals = field(default_factory=dict)
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
        """(NPU index, is the NPU's own node) for a matching name, else None.

        Never raises: an index that is empty, missing, not plain ASCII
        decimal, or has a leading zero makes the name not ours.
        """
        for pattern, is_own in ((self._npu, True), (self._member, False)):
            match = pattern.fullmatch(name)
            index = _index(match.group("index")) if match else None
            if index is not None:
                return index, is_own
        return None


def _index(text: str | None) -> int | None:
    if not text or not (text.isascii() and text.isdigit()):
        return None
    if len(text) > 1 and text.startswith("0"):
        return None
    return int(text)


class DeviceRules:
    """What makes a node an NPU's: its name, and what sysfs says it is."""

    def __init__(self, discovery: DiscoveryConfig | None = None) -> None:
        discovery = discovery or DiscoveryConfig()
        self.naming = Naming(discovery.npu_pattern, discovery.member_pattern)
        self.required_members = discovery.required_members
        self.pci_vendors = discovery.pci_vendors
        self.drivers = discovery.drivers

    def classify(self, name: str) -> tuple[int, bool] | None:
        return self.naming.classify(name)

    def required_names(self, index: int) -> tuple[str, ...]:
        return tuple(member.replace(INDEX, str(index)) for member in self.required_members)

    def function_problem(self, pci: PciInfo) -> str | None:
        """Why this PCI function is not an allowed NPU, or None."""
        where = f"PCI {pci.address}"
        if pci.vendor not in self.pci_vendors:
            vendor = pci.vendor or "unknown"
            return f"{where} vendor {vendor} is not allowed ({', '.join(self.pci_vendors)})"
        if pci.driver is None:
            return f"{where} has no driver bound"
        if pci.driver not in self.drivers:
            return f"{where} is bound to {pci.driver}, not {' or '.join(self.drivers)}"
        return None

    def impostors(
        self,
        npu_id: str,
        expected: Iterable[str],
        seen: Mapping[str, NodeObservation],
        own: PciInfo,
    ) -> tuple[str, ...]:
        """One phrase per present node that is not this NPU's by sysfs.

        A function's own problem (vendor, driver) is named once, at the
        first node on it; each member must be on the own node's function.
        """
        problems: list[str] = []
        named_functions: set[str | None] = set()
        for name in expected:
            observation = seen.get(name)
            if observation is None or observation.kind is not NodeKind.CHAR_DEVICE:
                continue
            pci = observation.pci
            if pci is None:
                problems.append(f"{name}: {observation.unresolved or 'no PCI function in sysfs'}")
                continue
            kernel_name = observation.kernel_name
            if kernel_name is not None and kernel_name != name and observation.rdev:
                major, minor = observation.rdev
                problems.append(f"{name}: {major}:{minor} is {kernel_name} by the kernel")
                continue
            problem = self.function_problem(pci)
            if problem and pci.address not in named_functions:
                named_functions.add(pci.address)
                problems.append(f"{name}: {problem}")
            elif not problem and name != npu_id and own.address and pci.address != own.address:
                problems.append(f"{name}: on PCI {pci.address}, not {npu_id}'s {own.address}")
        return tuple(problems)


def node_sort_key(name: str) -> tuple[tuple[int, str], ...]:
    """Natural order (stc0c2 before stc0c10, clusters before ctrl)."""
    parts = re.split(r"([0-9]+)", name)
    return tuple((int(part), "") if part.isdigit() else (-1, part) for part in parts)


def _ordered_nodes(own: str, members: Iterable[str]) -> tuple[str, ...]:
    return (own, *sorted(set(members) - {own}, key=node_sort_key))


def in_index_order(npus: Iterable[Npu]) -> list[Npu]:
    """NPUs by index (stc2 before stc10): the order every list of NPUs the
    agent hands out or writes is in."""
    return sorted(npus, key=lambda npu: (npu.index, npu.id))


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
        return in_index_order(self.npus.values())

    def healthy_ids(self) -> set[str]:
        return {npu.id for npu in self.npus.values() if npu.healthy}

    def updated(
        self,
        observations: Iterable[NodeObservation],
        rules: DeviceRules,
        vendor: HealthBook | None = None,
        *,
        now: float = 0.0,
        settle: float = 0.0,
    ) -> Inventory:
        """The inventory after a full scan of the device directory.

        An NPU's PCI facts are its own node's (while that node is away or
        resolves to nothing: what we knew). ``now`` is the caller's clock,
        ``settle`` how long a new NPU must go without a new node before it is
        Healthy (see the module docstring). ``vendor`` holds the vendor
        probe's signals, judged with the nodes' own.
        """
        own_nodes: dict[int, NodeObservation] = {}
        members: dict[int, list[NodeObservation]] = {}
        for observation in observations:
            classified = rules.classify(observation.name)
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
                npu_id,
                (
                    *(previous.expected_nodes if previous else ()),
                    *rules.required_names(index),
                    *seen,
                ),
            )
            devnums = {
                name: seen[name].rdev
                for name in expected
                if name in seen and seen[name].kind is NodeKind.CHAR_DEVICE
            }
            ever_healthy = previous.ever_healthy if previous else False
            settling_until = previous.settling_until if previous else 0.0
            grew = previous is None or len(expected) > len(previous.expected_nodes)
            if self.scanned and grew and not ever_healthy:
                settling_until = now + settle
            own_pci = own.pci if own is not None else None
            npu_pci = own_pci or (previous.pci if previous else PciInfo())
            npu = Npu(
                id=npu_id,
                index=index,
                expected_nodes=expected,
                present_nodes=tuple(devnums),
                pci=npu_pci,
                devnums={name: rdev for name, rdev in devnums.items() if rdev is not None},
                impostors=rules.impostors(npu_id, expected, seen, npu_pci),
                ever_healthy=ever_healthy,
                settling_until=settling_until,
            )
            result[npu_id] = _judge(npu, seen, (vendor or HealthBook()).signals(npu_id), now)
        return Inventory(result, scanned=True)

    def settles_at(self) -> float | None:
        """When the first settling NPU may turn Healthy (None: none settling)."""
        waiting = [npu.settling_until for npu in self.npus.values() if npu.reason == SETTLING]
        return min(waiting) if waiting else None


SETTLING = "new NPU, waiting for all its nodes"


def _judge(npu: Npu, seen: Mapping[str, NodeObservation], vendor: Signals, now: float) -> Npu:
    """Health from the nodes' signals (presence, then the settle time, and
    the PCI identity) and the vendor probe's signals that count."""
    missing = [name for name in npu.expected_nodes if name not in seen]
    kinds = {name: seen[name].kind for name in npu.expected_nodes if name in seen}
    dead = [name for name, kind in kinds.items() if kind is NodeKind.NO_DEVICE]
    not_char = [name for name, kind in kinds.items() if kind is NodeKind.OTHER]
    absent = []
    if missing:
        absent.append(f"missing {', '.join(missing)}")
    if dead:
        absent.append(f"no device behind {', '.join(dead)}")
    if not_char:
        absent.append(f"not a character device: {', '.join(not_char)}")
    complete = not absent and not npu.impostors
    if complete and not npu.ever_healthy and now < npu.settling_until:
        absent.append(SETTLING)
    signals = {
        PRESENCE: immediate(Reading(PRESENCE, bool(absent), "; ".join(absent) or "all nodes")),
        PCI_DRIVER: immediate(
            Reading(PCI_DRIVER, bool(npu.impostors), "; ".join(npu.impostors) or "bound")
        ),
        **vendor,
    }
    # Impostors first: it may be no NPU at all.
    problems = [*npu.impostors, *absent]
    problems += [
        state.describe(name)
        for name, state in ordered(signals)
        if state.counts and name not in (PRESENCE, PCI_DRIVER)
    ]
    healthy = not problems
    return replace(
        npu,
        healthy=healthy,
        reason="; ".join(problems),
        signals=signals,
        # Complete once: a new node later is a change, not a new NPU settling.
        ever_healthy=npu.ever_healthy or (complete and SETTLING not in absent),
    )


def describe_changes(before: Inventory, after: Inventory) -> list[str]:
    """One human line per NPU that appeared, changed health, or whose impostor
    nodes changed; not for other reason changes alone (an unplug removes six
    nodes one by one, and one line is enough), and never for a scan that
    changed nothing."""
    lines = []
    for npu in after.ordered():
        old = before.get(npu.id)
        why = f" ({npu.reason})" if npu.reason else ""
        if old is None:
            numa = "none" if npu.numa_node is None else str(npu.numa_node)
            lines.append(
                f"{npu.id} appeared: {npu.health}{why}, NUMA {numa}, {len(npu.present_nodes)} nodes"
            )
        elif old.healthy != npu.healthy:
            lines.append(f"{npu.id} {old.health} -> {npu.health}{why}")
        elif old.impostors != npu.impostors:
            now = "; ".join(npu.impostors) if npu.impostors else "none left"
            lines.append(f"{npu.id} still {npu.health}, nodes that are not its own: {now}")
    return lines
