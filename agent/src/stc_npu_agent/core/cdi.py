"""The node's CDI (Container Device Interface) spec, and CDI's rule for device names.

Pure: builds the spec document (plain dicts, ready for JSON) from the
inventory and the config; the shell (``stc_npu_agent.cdi``) writes it.

What the spec holds, and why:
- ``kind`` is the resource name (``streamcomputing.com/npu``): one name for
  the resource and the CDI device class, so ``streamcomputing.com/npu=stc0``
  reads as "NPU stc0 of that resource".
- One device per NPU that has device nodes now, named by its ID, with exactly
  the nodes an Allocate answer would give it (``present_nodes``). Nodes are
  given by path alone: the runtime takes type, major and minor from the host's
  node when it creates the container, so the spec stays true across a driver
  reload that renumbers minors.
- The spec-level edits (applied once to a container that gets any of the
  devices) carry what is per container, not per NPU: in mapped mode the HPE
  mount (read-only) and the env the HPE runtime reads. Per-device env would
  not do for anything that lists the container's NPUs: runtimes apply each
  device's edits in turn and a later value of the same variable replaces the
  earlier one, so a two-NPU container would see one NPU's value. That is why
  STC_NPU_DEVICES and STC_SET_DEVICES are never in the spec: Allocate's own
  env carries them, computed for the container's whole set.
- ``cdiVersion`` is the lowest version that has every feature used (see
  ``required_version``), so that older CDI consumers accept the file too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from stc_npu_agent.core.allocation import HOST_DEV, hpe_env
from stc_npu_agent.core.config import HpeConfig
from stc_npu_agent.core.devices import Inventory

# 0.3.0 is the first version with today's shape ("devices", "containerEdits",
# "deviceNodes" with "path"); the reference library computes no lower one.
BASE_VERSION = "0.3.0"
# Device names not starting with a letter came in 0.5.0.
DIGIT_NAME_VERSION = "0.5.0"
# Dots in the class part of the kind came in 0.6.0.
DOTTED_CLASS_VERSION = "0.6.0"

# A read-only recursive bind mount, private, as the CRI runtimes make of a
# read-only mount in an Allocate answer; and, since the tree is the host's,
# no setuid binaries or device nodes through it.
HPE_MOUNT_OPTIONS = ("ro", "nosuid", "nodev", "rbind", "rprivate")

_DEVICE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?")


def cdi_device_name_problem(name: str) -> str | None:
    """Why CDI would refuse ``name`` as a device name, or None."""
    if not _DEVICE_NAME.fullmatch(name):
        return (
            f"CDI device name {name!r} must start and end with a letter or digit "
            "and hold only letters, digits, '_', '-', '.', ':'"
        )
    return None


def required_version(kind: str, device_names: list[str]) -> str:
    """The lowest cdiVersion with every feature the spec uses."""
    version = BASE_VERSION
    if any(not name[:1].isalpha() for name in device_names):
        version = DIGIT_NAME_VERSION
    if "." in kind.partition("/")[2]:
        version = DOTTED_CLASS_VERSION
    return version


@dataclass(frozen=True)
class CdiSpec:
    document: dict[str, Any]
    # NPUs left out, with why (a name CDI refuses); empty as a rule.
    skipped: tuple[str, ...] = ()

    @property
    def device_names(self) -> list[str]:
        return [device["name"] for device in self.document["devices"]]


def build_spec(inventory: Inventory, kind: str, hpe: HpeConfig) -> CdiSpec:
    """The spec document for every NPU that has device nodes now.

    An NPU with no node at all (unplugged) is left out: CDI refuses a device
    without edits, and there is nothing a container could get. A spec with no
    devices at all is not a valid CDI spec: ``document["devices"]`` is then
    empty and the shell removes the file instead of writing it.
    """
    devices: list[dict[str, Any]] = []
    skipped = []
    for npu in inventory.ordered():
        if not npu.present_nodes:
            continue
        problem = cdi_device_name_problem(npu.id)
        if problem:
            skipped.append(f"{npu.id}: {problem}")
            continue
        devices.append(
            {
                "name": npu.id,
                "containerEdits": {
                    "deviceNodes": [{"path": f"{HOST_DEV}/{name}"} for name in npu.present_nodes]
                },
            }
        )
    document: dict[str, Any] = {
        "cdiVersion": required_version(kind, [device["name"] for device in devices]),
        "kind": kind,
        "devices": devices,
    }
    if hpe.mode == "mapped":
        document["containerEdits"] = {
            "env": [f"{name}={value}" for name, value in hpe_env(hpe)],
            "mounts": [
                {
                    "hostPath": hpe.host_path,
                    "containerPath": hpe.container_path,
                    "options": list(HPE_MOUNT_OPTIONS),
                }
            ],
        }
    return CdiSpec(document, tuple(skipped))
