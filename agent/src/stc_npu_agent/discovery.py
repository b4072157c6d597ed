"""Reads the device directory and sysfs; the core turns that into an Inventory.

OS paths are parameters so tests and the demo run on a simulated node.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from stc_npu_agent.core.config import Config
from stc_npu_agent.core.devices import Naming, NodeKind, NodeObservation, PciInfo

log = logging.getLogger(__name__)


class DeviceScanner:
    def __init__(self, dev_dir: str | Path, sys_dir: str | Path, naming: Naming) -> None:
        self.dev_dir = Path(dev_dir)
        self.sys_dir = Path(sys_dir)
        self.naming = naming
        # sysfs is read once per (node, device number): a driver reload that
        # renumbers the device is read again, a steady device is not.
        self._pci_cache: dict[tuple[str, tuple[int, int]], PciInfo] = {}

    def scan(self) -> tuple[list[NodeObservation], dict[str, PciInfo]]:
        """Matching nodes in the device dir, and PCI info for NPUs' own nodes.

        A missing or unreadable device dir is an empty scan (every known NPU
        turns Unhealthy), never an exception: the agent keeps serving.
        """
        observations: list[NodeObservation] = []
        pci: dict[str, PciInfo] = {}
        try:
            entries = list(os.scandir(self.dev_dir))
        except OSError as error:
            log.debug("cannot list %s: %s", self.dev_dir, error)
            return observations, pci
        for entry in entries:
            classified = self.naming.classify(entry.name)
            if classified is None:
                continue
            observation = _observe(entry)
            if observation is None:
                continue
            observations.append(observation)
            if classified[1] and observation.rdev is not None:
                pci[entry.name] = self.pci_info(entry.name, observation.rdev)
        return observations, pci

    def pci_info(self, name: str, rdev: tuple[int, int]) -> PciInfo:
        key = (name, rdev)
        if key not in self._pci_cache:
            self._pci_cache[key] = read_pci_info(self.sys_dir, rdev)
        return self._pci_cache[key]


def _observe(entry: os.DirEntry[str]) -> NodeObservation | None:
    try:
        info = entry.stat(follow_symlinks=False)
    except OSError:
        return None  # vanished between listing and stat: as good as absent
    if stat.S_ISCHR(info.st_mode):
        rdev = (os.major(info.st_rdev), os.minor(info.st_rdev))
        return NodeObservation(entry.name, NodeKind.CHAR_DEVICE, rdev)
    return NodeObservation(entry.name, NodeKind.OTHER)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def read_pci_info(sys_dir: Path, rdev: tuple[int, int]) -> PciInfo:
    """PCI facts for a char device via /sys/dev/char/<major>:<minor>/device.

    That link leads to the class device; its ``device`` link to the parent
    PCI function, which holds ``numa_node`` (-1: no NUMA information),
    ``vendor`` and ``device``. Anything missing reads as None.
    """
    class_device = sys_dir / "dev" / "char" / f"{rdev[0]}:{rdev[1]}"
    parent = class_device / "device"
    numa_text = _read_text(parent / "numa_node")
    numa: int | None = None
    if numa_text is not None and numa_text.lstrip("-").isdigit() and int(numa_text) >= 0:
        numa = int(numa_text)
    try:
        address: str | None = os.path.basename(os.path.realpath(parent))
    except OSError:
        address = None
    if not parent.exists():
        address = None
    return PciInfo(
        numa_node=numa,
        vendor=_read_text(parent / "vendor"),
        device=_read_text(parent / "device"),
        address=address,
    )


def hpe_problem(config: Config, hpe_dir: Path) -> str | None:
    """Why mapped mode would hand pods an unusable HPE mount, or None.

    A missing host path is often created empty by the container runtime when
    it is mounted, so an empty directory counts as missing too.
    """
    if config.hpe.mode != "mapped":
        return None
    try:
        empty = not any(hpe_dir.iterdir())
    except OSError:
        empty = True
    if not empty:
        return None
    seen_at = "" if str(hpe_dir) == config.hpe.host_path else f" (seen at {hpe_dir})"
    return (
        f"hpe.mode is mapped but hpe.hostPath {config.hpe.host_path} is missing or empty on "
        f"this node{seen_at}: containers would get an empty HPE; install HPE on the node "
        "or set hpe.mode=unmapped"
    )
