"""Node labels for node-feature-discovery (NFD): what the feature file says.

Pure: the inventory and the versions read from the node come in, the file's
text comes out. The format is NFD's local feature source
(``features.d``): one ``name=value`` line per label; lines starting with
``#`` are comments, except the directive ``# +expiry-time=<RFC 3339>``, after
which NFD drops the labels that follow once that time has passed. So the
directive comes first, and the agent rewrites the file before then: labels
of a dead agent vanish on their own.

Every label is ``<resourceName>.<suffix>`` (``streamcomputing.com/npu.count``):
the resource's domain is the label's prefix, so NFD (0.13+) accepts it
without configuration, and the names cannot clash with another vendor's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # core.config imports this module, and core.devices imports core.config
    from stc_npu_agent.core.devices import Inventory

EXPIRY_DIRECTIVE = "# +expiry-time="
# Kubernetes label values: at most 63 characters, alphanumeric at both ends,
# '-', '_' and '.' between (empty is allowed, but says nothing: never written).
LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
MAX_NAME = 63

PRESENT = "present"
COUNT = "count"
HEALTHY = "healthy"
MODEL = "model"
NUMA_NODES = "numa-nodes"
DRIVER_VERSION = "driver-version"
HPE_VERSION = "hpe-version"
SUFFIXES = (PRESENT, COUNT, HEALTHY, MODEL, NUMA_NODES, DRIVER_VERSION, HPE_VERSION)
# Several models on one node: no single name is true.
MIXED = "mixed"


def label_name_problem(resource_name: str) -> str | None:
    """Why ``<resource_name>.<suffix>`` would not be a valid label name, or None."""
    short = resource_name.partition("/")[2]
    longest = max(SUFFIXES, key=len)
    if len(f"{short}.{longest}") > MAX_NAME:
        return (
            f"the label names <resourceName>.<feature> (e.g. {resource_name}.{longest}) "
            f"need the name after '/' to be at most {MAX_NAME - len(longest) - 1} characters"
        )
    return None


def is_label_value(text: str) -> bool:
    return LABEL_VALUE.fullmatch(text) is not None


def feature_labels(
    inventory: Inventory,
    resource_name: str,
    models: Mapping[str, str],
    versions: Mapping[str, str | None],
) -> dict[str, str]:
    """The labels for this node, in a fixed order.

    ``count`` is every NPU the agent lists (the kubelet's capacity),
    ``healthy`` those it advertises Healthy (the allocatable), ``numa-nodes``
    how many NUMA nodes hold them. ``model`` maps the NPUs' PCI device IDs
    through ``models`` (an unknown ID is its own value, e.g. ``0x0200``).
    ``versions`` maps DRIVER_VERSION and HPE_VERSION to what the node shows;
    a version that is missing or not a valid label value is left out.
    """
    npus = inventory.ordered()
    labels = {
        PRESENT: "true" if npus else "false",
        COUNT: str(len(npus)),
        HEALTHY: str(sum(npu.healthy for npu in npus)),
    }
    names = sorted({models.get(d, d) for d in _device_ids(npu.pci.device for npu in npus)})
    if names:
        labels[MODEL] = names[0] if len(names) == 1 else MIXED
    if npus:
        labels[NUMA_NODES] = str(len({npu.numa_node for npu in npus if npu.numa_node is not None}))
    for suffix in (DRIVER_VERSION, HPE_VERSION):
        version = versions.get(suffix)
        if version is not None and is_label_value(version):
            labels[suffix] = version
    return {f"{resource_name}.{suffix}": value for suffix, value in labels.items()}


def _device_ids(ids: Iterable[str | None]) -> set[str]:
    return {device for device in ids if device is not None}


def feature_file(labels: Mapping[str, str], expires_at: datetime) -> str:
    """The file's text: the expiry directive first, then one label per line."""
    when = expires_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [
        f"{EXPIRY_DIRECTIVE}{when}",
        "# Written by stc-npu-agent; rewritten before it expires, removed when it stops.",
        *(f"{name}={value}" for name, value in labels.items()),
    ]
    return "\n".join(lines) + "\n"
