"""A checker for CDI spec documents, written from the CDI specification.

Source: the Container Device Interface SPEC.md (cncf-tags/container-device-
interface, spec 0.8.0) and the rules its reference library applies when a
runtime loads a spec (name syntax of vendor, class and device; the version
each field needs). Kept apart from the agent on purpose: the agent's builder
and this checker are two readings of the same rules, so a mistake in one is
caught by the other.

``problems(document)`` returns every rule a document breaks (empty: valid).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# The released spec versions a consumer knows. 0.1.0 and 0.2.0 had another
# shape ("cdiDevices", "containerSpec"); the reference library computes 0.3.0
# as the earliest version of today's shape.
KNOWN_VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0")

# "letters, digits, '_', '-', '.'; starts with a letter, ends with a letter or digit"
VENDOR_OR_CLASS = re.compile(r"[A-Za-z](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?")
# device names: letters, digits, '_', '-', '.', ':'; starts and ends alphanumeric
DEVICE_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])?")
DNS_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?")

SPEC_KEYS = {"cdiVersion", "kind", "annotations", "devices", "containerEdits"}
DEVICE_KEYS = {"name", "annotations", "containerEdits"}
EDIT_KEYS = {"env", "deviceNodes", "mounts", "hooks", "intelRdt", "additionalGids"}
DEVICE_NODE_KEYS = {
    "path",
    "hostPath",
    "type",
    "major",
    "minor",
    "fileMode",
    "permissions",
    "uid",
    "gid",
}
MOUNT_KEYS = {"hostPath", "containerPath", "type", "options"}
HOOK_NAMES = {
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
}


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def required_version(document: Mapping[str, Any]) -> str:
    """The lowest version holding every feature the document uses (the
    spec's table of released versions)."""
    needed = "0.3.0"

    def need(version: str) -> None:
        nonlocal needed
        if _version_tuple(version) > _version_tuple(needed):
            needed = version

    devices = document.get("devices") or []
    edits = [document.get("containerEdits") or {}]
    edits += [device.get("containerEdits") or {} for device in devices if isinstance(device, dict)]
    for edit in edits:
        if any("type" in mount for mount in edit.get("mounts") or []):
            need("0.4.0")  # mount type
        if any("hostPath" in node for node in edit.get("deviceNodes") or []):
            need("0.5.0")  # hostPath of device nodes
        if "intelRdt" in edit or edit.get("additionalGids"):
            need("0.7.0")
    for device in devices:
        name = device.get("name", "") if isinstance(device, dict) else ""
        if name and not name[0].isalpha():
            need("0.5.0")  # device names starting with a digit
        if isinstance(device, dict) and device.get("annotations"):
            need("0.6.0")
    if document.get("annotations"):
        need("0.6.0")
    kind = document.get("kind")
    if isinstance(kind, str) and "." in kind.partition("/")[2]:
        need("0.6.0")  # dots in the class
    return needed


def _kind_problems(kind: object) -> list[str]:
    if not isinstance(kind, str):
        return ["kind: required string"]
    vendor, slash, class_ = kind.partition("/")
    if not slash or not vendor or not class_:
        return [f"kind {kind!r}: must be vendor/class"]
    problems = []
    if not VENDOR_OR_CLASS.fullmatch(vendor):
        problems.append(f"kind {kind!r}: invalid vendor {vendor!r}")
    if len(vendor) > 253 or not all(DNS_LABEL.fullmatch(label) for label in vendor.split(".")):
        problems.append(f"kind {kind!r}: the prefix must be a DNS subdomain")
    if not VENDOR_OR_CLASS.fullmatch(class_) or len(class_) > 63:
        problems.append(f"kind {kind!r}: invalid class {class_!r}")
    return problems


def _is_absolute(path: object) -> bool:
    return isinstance(path, str) and path.startswith("/")


def _edit_problems(where: str, edits: object) -> list[str]:  # noqa: PLR0912 (one rule per field)
    if not isinstance(edits, dict):
        return [f"{where}: must be an object"]
    problems = [f"{where}: unknown field {key!r}" for key in edits if key not in EDIT_KEYS]
    env = edits.get("env", [])
    names = []
    for entry in env if isinstance(env, list) else [env]:
        if not isinstance(entry, str) or "=" not in entry or entry.startswith("="):
            problems.append(f"{where}.env: {entry!r} is not NAME=VALUE")
        else:
            names.append(entry.split("=", 1)[0])
    for name in {name for name in names if names.count(name) > 1}:
        problems.append(f"{where}.env: {name} set twice")
    for index, node in enumerate(edits.get("deviceNodes") or []):
        at = f"{where}.deviceNodes[{index}]"
        if not isinstance(node, dict):
            problems.append(f"{at}: must be an object")
            continue
        problems += [f"{at}: unknown field {key!r}" for key in node if key not in DEVICE_NODE_KEYS]
        if not _is_absolute(node.get("path")):
            problems.append(f"{at}.path: required absolute path")
        if "hostPath" in node and not _is_absolute(node["hostPath"]):
            problems.append(f"{at}.hostPath: must be an absolute path")
        permissions = node.get("permissions", "")
        if not isinstance(permissions, str) or set(permissions) - set("rwm"):
            problems.append(f"{at}.permissions: only r, w, m")
        if node.get("type", "c") not in ("b", "c", "u", "p"):
            problems.append(f"{at}.type: one of b, c, u, p")
    for index, mount in enumerate(edits.get("mounts") or []):
        at = f"{where}.mounts[{index}]"
        if not isinstance(mount, dict):
            problems.append(f"{at}: must be an object")
            continue
        problems += [f"{at}: unknown field {key!r}" for key in mount if key not in MOUNT_KEYS]
        if not isinstance(mount.get("hostPath"), str) or not mount["hostPath"]:
            problems.append(f"{at}.hostPath: required")
        if not _is_absolute(mount.get("containerPath")):
            problems.append(f"{at}.containerPath: required absolute path")
        options = mount.get("options", [])
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            problems.append(f"{at}.options: a list of strings")
    for index, hook in enumerate(edits.get("hooks") or []):
        at = f"{where}.hooks[{index}]"
        if hook.get("hookName") not in HOOK_NAMES:
            problems.append(f"{at}.hookName: unknown hook")
        if not _is_absolute(hook.get("path")):
            problems.append(f"{at}.path: required absolute path")
    if not any(edits.get(key) for key in EDIT_KEYS):
        problems.append(f"{where}: no edits")
    return problems


def problems(document: object) -> list[str]:
    """Every CDI rule ``document`` breaks."""
    if not isinstance(document, dict):
        return ["the spec must be an object"]
    found = [f"unknown field {key!r}" for key in document if key not in SPEC_KEYS]
    version = document.get("cdiVersion")
    if version not in KNOWN_VERSIONS:
        found.append(f"cdiVersion {version!r}: not a released spec version")
    else:
        needed = required_version(document)
        if _version_tuple(needed) > _version_tuple(str(version)):
            found.append(f"cdiVersion {version}: the features used need {needed}")
    found += _kind_problems(document.get("kind"))
    devices = document.get("devices")
    if not isinstance(devices, list) or not devices:
        found.append("devices: at least one device is required")
        devices = []
    names: list[str] = []
    for index, device in enumerate(devices):
        at = f"devices[{index}]"
        if not isinstance(device, dict):
            found.append(f"{at}: must be an object")
            continue
        found += [f"{at}: unknown field {key!r}" for key in device if key not in DEVICE_KEYS]
        name = device.get("name")
        if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
            found.append(f"{at}.name {name!r}: invalid device name")
        else:
            names.append(name)
        # The reference library refuses a device without edits.
        found += _edit_problems(f"{at}.containerEdits", device.get("containerEdits"))
    for name in sorted({name for name in names if names.count(name) > 1}):
        found.append(f"device {name!r} defined twice")
    if "containerEdits" in document:
        found += [
            problem
            for problem in _edit_problems("containerEdits", document["containerEdits"])
            if not problem.endswith("no edits")  # empty spec-level edits are fine
        ]
    return found
