"""The node's ResourceSlice (DRA, ``resource.k8s.io/v1``) built from the inventory.

Pure: the inventory and a few facts come in, plain dicts as the API serves
them come out. The publisher (``slices.py``) does the API calls.

Rules, and why:
- One pool per node, named after the node, in one slice
  (``resourceSliceCount: 1``): the scheduler sees a pool whole or not at all.
  The pool's ``generation`` goes up with every change of content, as the API
  asks; the publisher takes it from the slice it finds, so a restarted agent
  that finds the same content writes nothing.
- One device per NPU, named after its ID (``stc0``: a DNS label, stable
  across restarts), with the attributes claims select on: ``model`` (from the
  PCI device ID through a table; an unknown ID is its own model name so a
  selector can still tell it apart), ``index``, ``numaNode``, the standard
  ``resource.kubernetes.io/pcieRoot`` (devices with the same root can do
  peer-to-peer, and other drivers' devices say the same), ``pciAddress`` and
  ``driverVersion`` (the kernel driver's version, where it is a semver).
  What is not known (no NUMA topology, no PCI function) is left out rather
  than guessed.
- An Unhealthy NPU gets a ``NoSchedule`` taint whose value says why, where
  the cluster keeps device taints; where it does not, it is left out, so no
  new claim gets it (a claim already allocated keeps it: the kubelet
  prepares what the scheduler allocated).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from stc_npu_agent.core.devices import Inventory, Npu

API_VERSION = "resource.k8s.io/v1"
PCIE_ROOT_ATTRIBUTE = "resource.kubernetes.io/pcieRoot"
UNHEALTHY_TAINT_KEY = "npu.streamcomputing.com/unhealthy"
TAINT_EFFECT = "NoSchedule"
# PCI device ID (as sysfs writes it) -> marketing model name.
DEFAULT_MODELS: Mapping[str, str] = {"0x0100": "STCP920"}
# The API refuses more devices per slice (64 when any device has taints).
MAX_DEVICES_WITH_TAINTS = 64

_NAME_LIMIT = 253
_LABEL_VALUE_LIMIT = 63
_SEMVER = re.compile(
    r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?"
)

Object = dict[str, Any]


def slice_name(node_name: str, driver: str) -> str:
    """The node's slice name: ``<node>-<driver>``, a DNS subdomain as node
    names and driver names are; a hash keeps it unique when it would be too long."""
    name = f"{node_name}-{driver}"
    if len(name) <= _NAME_LIMIT:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[: _NAME_LIMIT - len(digest) - 1].rstrip('.-')}-{digest}"


def taint_value(reason: str) -> str:
    """The reason as a label value (the API's rule for taint values):
    ``missing stc1c0, stc1ctrl`` -> ``missing-stc1c0-stc1ctrl``."""
    value = re.sub(r"[^A-Za-z0-9_.]+", "-", reason)[:_LABEL_VALUE_LIMIT]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value) or "unhealthy"


def semver(text: str | None) -> str | None:
    """``text`` when it is a semantic version (what a version attribute takes)."""
    if text is None:
        return None
    text = text.strip()
    return text if _SEMVER.fullmatch(text) and len(text) <= 64 else None


def device(
    npu: Npu,
    *,
    models: Mapping[str, str],
    driver_versions: Mapping[str, str],
    taint: bool,
) -> Object:
    """One NPU as a ResourceSlice device (``taint``: Unhealthy gets a taint)."""
    pci = npu.pci
    attributes: Object = {"index": {"int": npu.index}}
    if pci.device is not None:
        attributes["model"] = {"string": models.get(pci.device, pci.device)}
    if pci.numa_node is not None:
        attributes["numaNode"] = {"int": pci.numa_node}
    if pci.pcie_root is not None:
        attributes[PCIE_ROOT_ATTRIBUTE] = {"string": pci.pcie_root}
    if pci.address is not None:
        attributes["pciAddress"] = {"string": pci.address}
    version = semver(driver_versions.get(pci.driver or ""))
    if version is not None:
        attributes["driverVersion"] = {"version": version}
    result: Object = {"name": npu.id, "attributes": attributes}
    if taint and not npu.healthy:
        result["taints"] = [
            {"key": UNHEALTHY_TAINT_KEY, "value": taint_value(npu.reason), "effect": TAINT_EFFECT}
        ]
    return result


def devices(
    inventory: Inventory,
    *,
    models: Mapping[str, str] = DEFAULT_MODELS,
    driver_versions: Mapping[str, str] | None = None,
    taints: bool,
) -> list[Object]:
    """The slice's devices: every NPU, Unhealthy ones tainted (``taints``) or left out."""
    return [
        device(npu, models=models, driver_versions=driver_versions or {}, taint=taints)
        for npu in inventory.ordered()
        if taints or npu.healthy
    ]


def slice_object(
    *,
    node_name: str,
    node_uid: str | None,
    driver: str,
    generation: int,
    device_list: Sequence[Object],
) -> Object:
    """The whole ResourceSlice. Owned by the Node when its UID is known, so
    the slice goes with a deleted Node (the kubelet removes it when the
    driver is gone from a live node)."""
    metadata: Object = {"name": slice_name(node_name, driver)}
    if node_uid:
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Node", "name": node_name, "uid": node_uid}
        ]
    return {
        "apiVersion": API_VERSION,
        "kind": "ResourceSlice",
        "metadata": metadata,
        "spec": {
            "driver": driver,
            "nodeName": node_name,
            "pool": {"name": node_name, "generation": generation, "resourceSliceCount": 1},
            "devices": list(device_list),
        },
    }


def comparable_devices(device_list: Sequence[Mapping[str, Any]]) -> list[Object]:
    """Devices as we write them: without what the API server adds
    (a taint's ``timeAdded``), to tell whether a slice needs a write."""
    result = []
    for item in device_list:
        copy = dict(item)
        if "taints" in copy:
            copy["taints"] = [
                {key: value for key, value in taint.items() if key != "timeAdded"}
                for taint in copy["taints"]
            ]
        result.append(copy)
    return result


def keep_taint_times(desired: Sequence[Object], current: Sequence[Mapping[str, Any]]) -> None:
    """Give each desired taint the ``timeAdded`` of the same taint on the
    current slice: an update must not make an old taint look new."""
    current_taints = {
        (item.get("name"), taint.get("key"), taint.get("value"), taint.get("effect")): taint
        for item in current
        for taint in item.get("taints") or ()
    }
    for item in desired:
        for taint in item.get("taints", ()):
            old = current_taints.get((item["name"], taint["key"], taint["value"], taint["effect"]))
            if old is not None and old.get("timeAdded"):
                taint["timeAdded"] = old["timeAdded"]


def taints_kept(sent: Sequence[Mapping[str, Any]], stored: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the API server kept the taints we sent (a cluster without the
    DRADeviceTaints feature drops the field silently)."""
    sent_tainted = {item["name"] for item in sent if item.get("taints")}
    stored_tainted = {item.get("name") for item in stored if item.get("taints")}
    return sent_tainted <= stored_tainted
