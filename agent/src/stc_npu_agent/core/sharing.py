"""Sharing an NPU: the device IDs advertised for it, and the NPU behind an ID.

Pure. With ``sharing.replicas`` N > 1 each NPU is advertised as N devices,
``stc0::0`` .. ``stc0::N-1``; whoever gets a replica gets the whole NPU
(all its nodes), with no memory or fault isolation from the other holders.
With N = 1 (the default) the ID is the NPU's own, as without sharing, so
turning sharing off gives back exactly the IDs pods held before.

Why ``::``: it cannot occur in a device node name the patterns accept as an
NPU's own (a ``/`` never, and ``:`` in ``/dev`` names is unheard of), so an ID
splits back into NPU and replica without doubt; and CDI device names allow
``:``, should a replica ever be named there.
"""

from __future__ import annotations

from collections.abc import Sequence

from stc_npu_agent.core.devices import Inventory

SEPARATOR = "::"


def replica_ids(npu_id: str, replicas: int) -> tuple[str, ...]:
    """The IDs advertised for one NPU, in replica order."""
    if replicas == 1:
        return (npu_id,)
    return tuple(f"{npu_id}{SEPARATOR}{k}" for k in range(replicas))


def npu_id_of(device_id: str, replicas: int) -> str | None:
    """The NPU ID behind an advertised ID under ``replicas``, or None when
    ``device_id`` is no replica ID of that form (the inventory decides
    whether the NPU exists)."""
    if replicas == 1:
        return device_id
    npu_id, separator, replica = device_id.rpartition(SEPARATOR)
    if not separator or not npu_id or not _plain_number(replica):
        return None
    return npu_id if int(replica) < replicas else None


def replica_number(device_id: str) -> int:
    """The replica's number (0 without sharing): for a stable order."""
    _, separator, replica = device_id.rpartition(SEPARATOR)
    return int(replica) if separator and _plain_number(replica) else 0


def _plain_number(text: str) -> bool:
    return text.isascii() and text.isdigit() and (text == "0" or not text.startswith("0"))


def stale_id_hint(unknown: Sequence[str], inventory: Inventory, replicas: int) -> str:
    """Why unknown IDs may have been valid once: IDs of a known NPU under
    another ``sharing.replicas`` (a pod from before the change). Empty when
    none is."""
    stale = [device_id for device_id in unknown if _names_known_npu(device_id, inventory)]
    if not stale:
        return ""
    if replicas == 1:
        now = "sharing is off: each NPU's ID is its own, e.g. stc0"
    else:
        last = replicas - 1
        now = f"sharing.replicas is {replicas}: IDs are <npu>{SEPARATOR}0 .. <npu>{SEPARATOR}{last}"
    return f" ({now}; {stale[0]!r} is from another sharing.replicas and is no longer advertised)"


def _names_known_npu(device_id: str, inventory: Inventory) -> bool:
    npu_id, separator, replica = device_id.rpartition(SEPARATOR)
    if separator and _plain_number(replica):
        return inventory.get(npu_id) is not None
    return inventory.get(device_id) is not None


def repeated_npus(device_ids: Sequence[str], replicas: int) -> dict[str, int]:
    """NPUs that ``device_ids`` name more than once (packed replicas), with
    how often; in first-seen order."""
    counts: dict[str, int] = {}
    for device_id in device_ids:
        npu_id = npu_id_of(device_id, replicas)
        if npu_id is not None:
            counts[npu_id] = counts.get(npu_id, 0) + 1
    return {npu_id: count for npu_id, count in counts.items() if count > 1}
