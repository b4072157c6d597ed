"""What a container gets for a set of NPU IDs, and which IDs to prefer.

Pure: works on an Inventory and the config. The kubelet never sends
unknown, unhealthy or duplicate IDs itself; refusing them here is the
defence against races and other callers, and must never stop the agent.

How the devices reach the container (``deviceListStrategy``):
- ``device-specs``: DeviceSpecs for every node, the HPE mount and env in
  mapped mode: the runtime needs nothing but the answer.
- ``cdi-cri``: CDI device names (``streamcomputing.com/npu=stc0``); the
  runtime takes the nodes, the HPE mount and the HPE env from the agent's CDI
  spec (``core/cdi.py``). With cdi-cri alone the answer carries no
  DeviceSpecs and no mount: the spec is the one source, as a DRA driver's
  would be.
- both: both, the same nodes and mount twice (runtimes replace a device or a
  mount at the same container path, so the container sees each once).
Env that describes the container's whole set of NPUs (``STC_NPU_DEVICES``,
``STC_SET_DEVICES``) is always in the answer's env, whatever the strategy:
only Allocate sees the set (see core/cdi.py for why a CDI spec cannot).

``STC_SET_DEVICES`` (``stcSetDevices``) lists the NPC clusters the HPE
runtime may use: list position = logical cluster ID, value = cluster ID as the
runtime numbers it; cluster k of NPU N is 4·N+k on the host.
- ``global``: host numbering, in NPU order: stc1 and stc3 give
  ``4,5,6,7,12,13,14,15``. For a runtime that maps a cluster ID to
  ``/dev/stc<ID/4>``: the container has its nodes at their host names.
- ``local``: renumbered from 0 over the container's own NPUs in NPU order:
  stc1 and stc3 give ``0,1,2,3,4,5,6,7``, where 0-3 are stc1's clusters and
  4-7 stc3's. For a runtime that numbers the NPUs it can see from 0. The
  device nodes keep their host names either way.

With sharing (``sharing.replicas`` > 1, see core/sharing.py) the IDs are
replicas (``stc0::1``); everything in the answer names physical NPUs, each
once: a container given two replicas of stc0 gets stc0's nodes once and
``STC_NPU_DEVICES=stc0``. ``sharing.failRequestsGreaterThanOne`` refuses a
container more than one replica with INVALID_ARGUMENT: the request itself is
what is wrong (a retry, or a fresh device list, cannot help), as for any
other request the config rules out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

from stc_npu_agent.core.config import Config, HpeConfig, SharingConfig, StcSetDevices
from stc_npu_agent.core.devices import Inventory, Npu, in_index_order
from stc_npu_agent.core.sharing import npu_id_of, replica_number, stale_id_hint

# Lists the allocated NPU IDs inside the container, e.g. "stc0,stc2".
DEVICES_ENV = "STC_NPU_DEVICES"
# The HPE runtime's list of usable clusters (stcSetDevices).
SET_DEVICES_ENV = "STC_SET_DEVICES"
# An STCP920 has 4 NPC clusters; cluster k of NPU N is cluster 4·N+k.
CLUSTERS_PER_NPU = 4
# Device specs always name the host's /dev: the agent may see it elsewhere
# (--dev-dir), the container runtime does not.
HOST_DEV = "/dev"
_SHOWN_IDS = 8


class ErrorKind(Enum):
    INVALID_ARGUMENT = "invalid argument"  # the request itself is wrong
    FAILED_PRECONDITION = "failed precondition"  # right request, wrong moment


class AllocationError(Exception):
    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class DeviceSpec:
    host_path: str
    container_path: str
    permissions: str = "rw"


@dataclass(frozen=True)
class Mount:
    host_path: str
    container_path: str
    read_only: bool = True


@dataclass(frozen=True)
class ContainerAllocation:
    devices: tuple[DeviceSpec, ...]
    mounts: tuple[Mount, ...]
    envs: tuple[tuple[str, str], ...]
    # Fully qualified CDI device names (cdi-cri).
    cdi_devices: tuple[str, ...] = ()
    # The physical NPUs the container gets, each once, in NPU order.
    npus: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delivery:
    """How an answer names the devices: the config's deviceListStrategy,
    stcSetDevices and, for cdi-cri, the CDI kind (the resource name)."""

    device_specs: bool = True
    cdi_kind: str | None = None
    stc_set_devices: StcSetDevices = "none"
    # The spec file that resolves the CDI names (cdi-cri only).
    cdi_spec_file: str | None = None

    @classmethod
    def from_config(cls, config: Config) -> Delivery:
        uses_cdi = config.uses_cdi
        return cls(
            device_specs="device-specs" in config.device_list_strategy,
            cdi_kind=config.resource_name if uses_cdi else None,
            stc_set_devices=config.stc_set_devices,
            cdi_spec_file=(
                f"{config.cdi.spec_dir}/{spec_file_name(config.resource_name)}"
                if uses_cdi
                else None
            ),
        )

    def without_cdi(self) -> Delivery:
        """DeviceSpecs alone: for when the CDI spec is missing. A name the
        runtime cannot resolve fails the whole container, which the
        DeviceSpecs alone would start."""
        return replace(self, cdi_kind=None)


# Today's answer, and the default: DeviceSpecs only, no STC_SET_DEVICES.
DEVICE_SPECS_ONLY = Delivery()
NO_SHARING = SharingConfig()


def hpe_env(hpe: HpeConfig) -> tuple[tuple[str, str], ...]:
    """The env the HPE runtime reads, as the vendor's images set it, for
    HPE mounted at hpe.containerPath (mapped mode only)."""
    if hpe.mode != "mapped":
        return ()
    return (("LD_LIBRARY_PATH", f"{hpe.container_path}/lib"), ("RISCV", hpe.container_path))


def cluster_ids(npus: Sequence[Npu], mode: StcSetDevices) -> list[int]:
    """STC_SET_DEVICES values for ``npus`` (in the order given), see above."""
    if mode == "global":
        return [CLUSTERS_PER_NPU * npu.index + k for npu in npus for k in range(CLUSTERS_PER_NPU)]
    if mode == "local":
        return list(range(CLUSTERS_PER_NPU * len(npus)))
    return []


def npu_list_env(npus: Sequence[Npu], stc_set_devices: StcSetDevices) -> list[tuple[str, str]]:
    """The env that lists a container's NPUs (in the order given), see above."""
    envs = [(DEVICES_ENV, ",".join(npu.id for npu in npus))]
    if stc_set_devices != "none":
        clusters = cluster_ids(npus, stc_set_devices)
        envs.append((SET_DEVICES_ENV, ",".join(str(cluster) for cluster in clusters)))
    return envs


def show_ids(ids: Sequence[str]) -> str:
    """IDs for an error message: quoted (NULs and slashes stay visible), capped."""
    shown = ", ".join(repr(device_id)[:72] for device_id in ids[:_SHOWN_IDS])
    more = len(ids) - _SHOWN_IDS
    return shown + (f" and {more} more" if more > 0 else "")


def _duplicates(ids: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    repeated: list[str] = []
    for device_id in ids:
        if device_id in seen and device_id not in repeated:
            repeated.append(device_id)
        seen.add(device_id)
    return repeated


def _resolve(inventory: Inventory, ids: Sequence[str], what: str, replicas: int = 1) -> list[Npu]:
    """The NPU behind each of ``ids`` (replica IDs under ``replicas``), or
    AllocationError naming the offending IDs."""
    repeated = _duplicates(ids)
    if repeated:
        raise AllocationError(ErrorKind.INVALID_ARGUMENT, f"duplicate {what}: {show_ids(repeated)}")
    unknown = [device_id for device_id in ids if _npu(inventory, device_id, replicas) is None]
    if unknown:
        hint = stale_id_hint(unknown, inventory, replicas)
        raise AllocationError(
            ErrorKind.INVALID_ARGUMENT, f"unknown {what}: {show_ids(unknown)}{hint}"
        )
    npus = [inventory.npus[npu_id_of(device_id, replicas) or ""] for device_id in ids]
    unhealthy = list({npu.id: npu for npu in npus if not npu.healthy}.values())
    if unhealthy:
        reasons = "; ".join(f"{npu.id}: {npu.reason}" for npu in unhealthy[:_SHOWN_IDS])
        raise AllocationError(ErrorKind.FAILED_PRECONDITION, f"unhealthy {what}: {reasons}")
    return npus


def _npu(inventory: Inventory, device_id: str, replicas: int) -> Npu | None:
    npu_id = npu_id_of(device_id, replicas)
    return None if npu_id is None else inventory.get(npu_id)


def plan_allocation(
    inventory: Inventory,
    ids: Sequence[str],
    hpe: HpeConfig,
    delivery: Delivery = DEVICE_SPECS_ONLY,
    *,
    sharing: SharingConfig = NO_SHARING,
) -> ContainerAllocation:
    """Device nodes, mounts, env and CDI names for one container asking for ``ids``."""
    if not ids:
        raise AllocationError(ErrorKind.INVALID_ARGUMENT, "no device IDs in the request")
    if sharing.shared and sharing.fail_requests_greater_than_one and len(ids) > 1:
        raise AllocationError(
            ErrorKind.INVALID_ARGUMENT,
            f"sharing.failRequestsGreaterThanOne: a container may get one replica of a shared "
            f"NPU, this one asks for {len(ids)}: {show_ids(ids)}",
        )
    resolved = _resolve(inventory, ids, "device IDs", sharing.replicas)
    npus = in_index_order({npu.id: npu for npu in resolved}.values())
    npu_ids = tuple(npu.id for npu in npus)
    envs = npu_list_env(npus, delivery.stc_set_devices)
    if not delivery.device_specs:
        # cdi-cri alone: nodes, HPE mount and HPE env come from the CDI spec.
        return ContainerAllocation((), (), tuple(envs), _cdi_names(npus, delivery), npu_ids)
    devices = tuple(
        DeviceSpec(f"{HOST_DEV}/{name}", f"{HOST_DEV}/{name}")
        for npu in npus
        for name in npu.present_nodes
    )
    mounts = (
        (Mount(hpe.host_path, hpe.container_path, read_only=True),) if hpe.mode == "mapped" else ()
    )
    envs += hpe_env(hpe)
    return ContainerAllocation(devices, mounts, tuple(envs), _cdi_names(npus, delivery), npu_ids)


def spec_file_name(kind: str) -> str:
    """The CDI spec's file name, one per kind: streamcomputing.com-npu.json."""
    return kind.replace("/", "-") + ".json"


def qualified_name(kind: str, device: str) -> str:
    """The fully qualified CDI device name, e.g. streamcomputing.com/npu=stc0."""
    return f"{kind}={device}"


def _cdi_names(npus: Sequence[Npu], delivery: Delivery) -> tuple[str, ...]:
    kind = delivery.cdi_kind
    return () if kind is None else tuple(qualified_name(kind, npu.id) for npu in npus)


def preferred_allocation(
    inventory: Inventory,
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    *,
    replicas: int = 1,
) -> list[str]:
    """The IDs to prefer: must-include first, then distinct NPUs, then as few
    NUMA nodes as possible.

    With sharing (``replicas`` > 1) the IDs are replicas, and the set takes
    replicas of NPUs not yet in it while there are any (a container gets the
    most NPUs its request can have); only a request larger than the healthy
    distinct NPUs packs a second replica of an NPU, and then onto the NPUs it
    holds fewest times. Each such round picks NPUs by the NUMA policy below,
    and of an NPU its lowest-numbered available replica.

    NUMA policy: after the NPUs already in the set (the must-include IDs'
    first), fill from their NUMA nodes; then, if one NUMA node can supply the
    rest, the smallest such node (best fit keeps larger groups whole for
    larger requests); otherwise the largest nodes first, so the set spans the
    fewest NUMA nodes. Ties break on NUMA id, then NPU index: the answer is a
    function of the inputs alone. Unhealthy IDs in ``available`` are skipped
    (the kubelet may race a health change).
    """
    if size <= 0:
        raise AllocationError(
            ErrorKind.INVALID_ARGUMENT, f"allocation size must be positive, got {size}"
        )
    unknown = [device_id for device_id in available if _npu(inventory, device_id, replicas) is None]
    if unknown:
        hint = stale_id_hint(unknown, inventory, replicas)
        raise AllocationError(
            ErrorKind.INVALID_ARGUMENT, f"unknown available IDs: {show_ids(unknown)}{hint}"
        )
    if _duplicates(available):
        raise AllocationError(
            ErrorKind.INVALID_ARGUMENT,
            f"duplicate available IDs: {show_ids(_duplicates(available))}",
        )
    chosen = _resolve(inventory, must_include, "must-include IDs", replicas)
    offered = set(available)
    missing_from_available = [device_id for device_id in must_include if device_id not in offered]
    if missing_from_available:
        raise AllocationError(
            ErrorKind.INVALID_ARGUMENT,
            f"must-include IDs not in available: {show_ids(missing_from_available)}",
        )
    if len(chosen) > size:
        raise AllocationError(
            ErrorKind.INVALID_ARGUMENT,
            f"{len(chosen)} must-include IDs exceed the allocation size {size}",
        )
    taken = set(must_include)
    # Free healthy replicas per NPU, lowest replica number first.
    free: dict[str, list[str]] = {}
    npus: dict[str, Npu] = {}
    for device_id in sorted(available, key=replica_number):
        npu = _npu(inventory, device_id, replicas)
        if device_id not in taken and npu is not None and npu.healthy:
            free.setdefault(npu.id, []).append(device_id)
            npus[npu.id] = npu
    usable = len(chosen) + sum(len(ids) for ids in free.values())
    if usable < size:
        raise AllocationError(
            ErrorKind.FAILED_PRECONDITION,
            f"allocation size {size} exceeds the {usable} healthy available IDs",
        )

    result = list(must_include)
    in_set = list(chosen)  # the NPUs of result, in order, once per ID
    need = size - len(result)
    while need > 0:
        # NPUs with a free replica that the set holds fewest times.
        counts = Counter(npu.id for npu in in_set)
        held = {npu_id: counts[npu_id] for npu_id in free}
        fewest = min(held.values())
        round_npus = [npus[npu_id] for npu_id, count in held.items() if count == fewest]
        picked = _numa_fill(in_set, round_npus, min(need, len(round_npus)))
        for npu in picked:
            result.append(free[npu.id].pop(0))
            if not free[npu.id]:
                del free[npu.id]
        in_set += picked
        need -= len(picked)
    return result


def _numa_key(numa: int | None) -> int:
    return 1 << 30 if numa is None else numa  # no topology sorts last


def _numa_fill(in_set: Sequence[Npu], candidates: Sequence[Npu], need: int) -> list[Npu]:
    """``need`` of ``candidates`` (distinct NPUs) by the NUMA policy, given
    the NPUs already in the set (see ``preferred_allocation``)."""
    groups: dict[int | None, list[Npu]] = {}
    for npu in in_index_order(candidates):
        groups.setdefault(npu.numa_node, []).append(npu)
    result: list[Npu] = []
    # 1. The NUMA nodes of the NPUs in the set, in the order they came.
    for numa in dict.fromkeys(npu.numa_node for npu in in_set):
        take = groups.pop(numa, [])[:need]
        result += take
        need -= len(take)
    # 2. Then whole NUMA nodes: best single fit, else largest first.
    while need > 0:
        fitting = [numa for numa, group in groups.items() if len(group) >= need]
        if fitting:
            numa = min(fitting, key=lambda n: (len(groups[n]), _numa_key(n)))
        else:
            numa = min(groups, key=lambda n: (-len(groups[n]), _numa_key(n)))
        take = groups.pop(numa)[:need]
        result += take
        need -= len(take)
    return result
