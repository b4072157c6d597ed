"""Reads the device directory and sysfs; the core turns that into an Inventory.

OS paths are parameters so tests and the demo run on a simulated node.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from stc_npu_agent.core.config import Config
from stc_npu_agent.core.devices import DeviceRules, NodeKind, NodeObservation, PciInfo

log = logging.getLogger(__name__)


class DeviceScanner:
    def __init__(self, dev_dir: str | Path, sys_dir: str | Path, rules: DeviceRules) -> None:
        self.dev_dir = Path(dev_dir)
        self.sys_dir = Path(sys_dir)
        self.rules = rules
        # Entries whose scan raised, named once each (see scan()).
        self._failed: set[str] = set()

    def scan(self) -> list[NodeObservation]:
        """Every node in the device dir whose name matches, with what sysfs
        says is behind it.

        A missing or unreadable device dir is an empty scan (every known NPU
        turns Unhealthy), never an exception: the agent keeps serving. Each
        entry stands alone: one that cannot be read is absent, and even an
        unforeseen error in one entry costs only that entry.
        """
        try:
            entries = list(os.scandir(self.dev_dir))
        except OSError as error:
            log.debug("cannot list %s: %s", self.dev_dir, error)
            return []
        observations: list[NodeObservation] = []
        for entry in entries:
            try:
                observation = self._observe(entry)
            except Exception:  # one odd entry must not hide the NPUs
                if entry.name not in self._failed:
                    self._failed.add(entry.name)
                    log.exception("skipping %s in %s", entry.name, self.dev_dir)
                continue
            if observation is not None:
                observations.append(observation)
        return observations

    def _observe(self, entry: os.DirEntry[str]) -> NodeObservation | None:
        if self.rules.classify(entry.name) is None:
            return None
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            return None  # vanished between listing and stat: as good as absent
        if not stat.S_ISCHR(info.st_mode):
            return NodeObservation(entry.name, NodeKind.OTHER)
        rdev = (os.major(info.st_rdev), os.minor(info.st_rdev))
        return observe_char_device(self.sys_dir, entry.name, rdev)

    def devnum(self, name: str) -> tuple[int, int] | None:
        """(major, minor) of node ``name`` now; None unless a char device."""
        try:
            info = os.lstat(self.dev_dir / name)
        except OSError:
            return None
        if not stat.S_ISCHR(info.st_mode):
            return None
        return os.major(info.st_rdev), os.minor(info.st_rdev)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _link_name(path: Path) -> str | None:
    """The last part of where symlink ``path`` leads; None if there is none."""
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def observe_char_device(sys_dir: Path, name: str, rdev: tuple[int, int]) -> NodeObservation:
    """A char device node and the PCI function behind it, via sysfs.

    /sys/dev/char/<major>:<minor> leads to the class device; without it no
    device has these numbers (the kernel removed it and udev has yet to
    remove the node, or the node was made by hand). The class device's
    ``device`` link leads to the parent, a PCI function when its
    ``subsystem`` is the pci bus; the function holds ``vendor``, ``device``,
    ``numa_node`` (-1: no NUMA information) and, when a driver is bound, a
    ``driver`` link. Never raises: what cannot be read (EACCES included) is
    the node's ``unresolved`` reason.
    """
    devnum = f"{rdev[0]}:{rdev[1]}"
    class_device = sys_dir / "dev" / "char" / devnum

    def unresolved(why: str) -> NodeObservation:
        return NodeObservation(name, NodeKind.CHAR_DEVICE, rdev, None, why)

    try:
        os.lstat(class_device)
    except FileNotFoundError:
        return NodeObservation(name, NodeKind.NO_DEVICE, rdev)
    except OSError as error:
        return unresolved(f"cannot read sysfs for {devnum}: {error.strerror}")
    try:
        function = Path(os.path.realpath(class_device / "device", strict=True))
        bus = os.path.basename(os.path.realpath(function / "subsystem", strict=True))
    except FileNotFoundError:
        return unresolved(f"{devnum} is not a PCI device")
    except OSError as error:
        return unresolved(f"cannot read sysfs for {devnum}: {error.strerror}")
    if bus != "pci":
        return unresolved(f"{devnum} is not a PCI device (it is on the {bus} bus)")
    numa_text = _read_text(function / "numa_node")
    numa: int | None = None
    if numa_text is not None and numa_text.lstrip("-").isdigit() and int(numa_text) >= 0:
        numa = int(numa_text)
    pci = PciInfo(
        numa_node=numa,
        vendor=_read_text(function / "vendor"),
        device=_read_text(function / "device"),
        address=function.name,
        driver=_link_name(function / "driver"),
    )
    return NodeObservation(name, NodeKind.CHAR_DEVICE, rdev, pci)


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
