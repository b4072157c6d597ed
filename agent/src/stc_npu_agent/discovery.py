"""Reads the device directory and sysfs; the core turns that into an Inventory.

OS paths are parameters so tests and the demo run on a simulated node.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import replace
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
        # The PCI function each device number resolved to, by the target of
        # its /sys/dev/char link: resolving takes ~50 syscalls, comparing the
        # link one. A new device with the same numbers has another target.
        self._functions: dict[tuple[int, int], tuple[str, _Function]] = {}
        self._char_dir = os.path.join(self.sys_dir, "dev", "char")

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
        return self._char_device(entry.name, rdev)

    def _char_device(self, name: str, rdev: tuple[int, int]) -> NodeObservation:
        """A char device node and the PCI function sysfs resolves it to.

        /sys/dev/char/<major>:<minor> links to the class device; without it no
        device has these numbers (the kernel removed it and udev has yet to
        remove the node, or the node was made by hand). The driver is read on
        every scan: a function can be rebound without its nodes changing.
        Never raises: what cannot be read (EACCES included) is the node's
        ``unresolved`` reason, and is tried again on the next scan.
        """
        devnum = f"{rdev[0]}:{rdev[1]}"
        # Plain strings, not Path: this runs for every node on every scan.
        link = os.path.join(self._char_dir, devnum)
        try:
            target: str | None = os.readlink(link)
        except FileNotFoundError:
            self._functions.pop(rdev, None)
            return NodeObservation(name, NodeKind.NO_DEVICE, rdev)
        except OSError as error:
            if error.errno != errno.EINVAL:
                return NodeObservation(
                    name, NodeKind.CHAR_DEVICE, rdev, None, _cannot(devnum, error)
                )
            target = None  # not a symlink (a copied tree?): resolve every time
        cached = self._functions.get(rdev)
        if target is None or cached is None or cached[0] != target:
            function = resolve_function(Path(link), devnum)
            if target is not None and function.pci is not None:
                self._functions[rdev] = (target, function)
        else:
            function = cached[1]
        if function.pci is None:
            return NodeObservation(name, NodeKind.CHAR_DEVICE, rdev, None, function.unresolved)
        kernel_name = os.path.basename(target) if target is not None else function.kernel_name
        pci = function.with_driver()
        return NodeObservation(name, NodeKind.CHAR_DEVICE, rdev, pci, kernel_name=kernel_name)

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


def _link_name(path: str) -> str | None:
    """The last part of where symlink ``path`` leads; None if there is none."""
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


class _Function:
    """What a class device's parent is: a PCI function, or why it is none."""

    def __init__(
        self, path: Path | None, pci: PciInfo | None, unresolved: str = "", kernel_name: str = ""
    ) -> None:
        self.pci = pci  # without the driver: that is read on every scan
        self.unresolved = unresolved
        self.kernel_name = kernel_name  # the class device's name
        self._driver_link = os.path.join(path, "driver") if path is not None else ""
        self._last: PciInfo | None = None

    def with_driver(self) -> PciInfo:
        """The PCI facts with the driver bound now (the same object while it is)."""
        assert self.pci is not None
        driver = _link_name(self._driver_link)
        if self._last is None or self._last.driver != driver:
            self._last = replace(self.pci, driver=driver)
        return self._last


def _cannot(devnum: str, error: OSError) -> str:
    return f"cannot read sysfs for {devnum}: {error.strerror}"


def resolve_function(class_device: Path, devnum: str) -> _Function:
    """The parent of a class device, when it is a PCI function (its
    ``subsystem`` is the pci bus), with ``vendor``, ``device`` and
    ``numa_node`` (-1: no NUMA information)."""
    try:
        kernel_name = os.path.basename(os.path.realpath(class_device, strict=True))
        function = Path(os.path.realpath(class_device / "device", strict=True))
        bus = os.path.basename(os.path.realpath(function / "subsystem", strict=True))
    except FileNotFoundError:
        return _Function(None, None, f"{devnum} is not a PCI device")
    except OSError as error:
        return _Function(None, None, _cannot(devnum, error))
    if bus != "pci":
        return _Function(None, None, f"{devnum} is not a PCI device (it is on the {bus} bus)")
    numa_text = _read_text(function / "numa_node")
    numa: int | None = None
    if numa_text is not None and numa_text.lstrip("-").isdigit() and int(numa_text) >= 0:
        numa = int(numa_text)
    pci = PciInfo(
        numa_node=numa,
        vendor=_read_text(function / "vendor"),
        device=_read_text(function / "device"),
        address=function.name,
        pcie_root=pcie_root(function),
    )
    return _Function(function, pci, kernel_name=kernel_name)


def pcie_root(function: Path) -> str | None:
    """The root complex of a resolved PCI function path: the ``pciDDDD:BB``
    directory right under ``devices`` (``/sys/devices/pci0000:00/0000:00:01.0/
    0000:03:00.0`` -> ``pci0000:00``), as the kubelet's own helpers name it."""
    parts = function.parts
    # The last such pair: the sysfs root itself may sit anywhere (a test tree).
    for index in range(len(parts) - 2, -1, -1):
        if parts[index] == "devices" and parts[index + 1].startswith("pci"):
            return parts[index + 1]
    return None


def driver_version(sys_dir: str | Path, driver: str) -> str | None:
    """The loaded kernel module's version (``/sys/module/<driver>/version``),
    None when the module says none."""
    return _read_text(Path(sys_dir) / "module" / driver / "version")


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
