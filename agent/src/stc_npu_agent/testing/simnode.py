"""A simulated STC NPU node: a fake ``/dev`` and ``/sys`` under a root dir.

The device nodes are REAL character devices (``mknod``, needs root or
CAP_MKNOD) so code under test can ``stat`` them exactly as on a host; nothing
ever opens them. The sysfs tree has the link structure standard Linux gives a
char device of a PCI driver (see docs ``stc-hardware.md``)::

    dev/stc<i>, stc<i>c0..c3, stc<i>ctrl           char, major 240, minor i*8+k
    sys/devices/pci0000:00/0000:00:<slot>.<fn>/<BDF>/  the NPU's PCI function:
        vendor, device, numa_node, class, uevent, subsystem -> bus/pci,
        driver -> bus/pci/drivers/stc
        stc/<node>/dev ("240:0"), uevent, device -> ../../, subsystem -> class/stc
    sys/dev/char/<major>:<minor>   -> ../../devices/.../stc/<node>
    sys/class/stc/<node>           -> ../../devices/.../stc/<node>
    sys/bus/pci/drivers/stc/<BDF>  -> ../../../../devices/.../<BDF>

with k = 0 for the NPU itself, 1..4 for clusters c0..c3 and 5 for ctrl;
BDF ``0000:<index+3>:00.0`` behind root port ``0000:00:<index+1>.0``. The
sysfs class name of the real driver is unknown; ``stc`` is our assumption.

Order of operations (each operation is immediate, no sleeps): ``add_npu`` and
``replug`` follow a driver's probe, ``unplug`` its remove, in reverse:

* plug: PCI function dir, driver link, then per node in the order
  ``stc<i>, c0..c3, ctrl``: its sysfs class dir and links, then its /dev node
  (udev makes the node after the kernel announced the class device). So the
  main node ``stc<i>`` appears FIRST, before its clusters: a watcher that
  reacts to ``stc<i>`` alone can see an NPU with members still missing.
* unplug: per node in the order ``ctrl, c3..c0, stc<i>``: sysfs entries, then
  the /dev node; finally the driver link and the PCI function dir. So the
  main node goes LAST.

Impostors, for the agent's identity checks: ``add_foreign_node`` makes a char
device that is no NPU (by default the numbers of /dev/null, whose sysfs entry
is a virtual device without a PCI parent), ``replace_with_device`` puts other
device numbers under an NPU node's name, and ``bind_driver`` rebinds (or
unbinds) an NPU's PCI function while its /dev nodes stay.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAJOR = 240
# Minor numbers: each NPU owns a block of 8 (k: 0 main, 1..4 clusters, 5 ctrl).
_MINORS_PER_NPU = 8
_CTRL_K = 5
_MAX_CLUSTERS = 4
# Each NPU sits behind a root port 0000:00:<slot>.<function>: slots 1..31
# (device numbers are 5 bits, 0 unused), then functions 1..7 of the same
# slots, so up to 248 NPUs keep valid, distinct PCI addresses.
_PCI_SLOTS = 31
_MAX_INDEX = _PCI_SLOTS * 8 - 1
_DEV_MODE = 0o660
# PCI class "processing accelerator" (0x12), as accelerator cards report.
_PCI_CLASS = "0x120000"
_CLASS_NAME = "stc"
_DRIVER_NAME = "stc"
# /dev/null's numbers: a char device every node has, and no NPU.
NULL_DEVNUM = (1, 3)


@dataclass(frozen=True)
class _NpuSpec:
    index: int
    numa_node: int | None
    clusters: int
    vendor: str
    device: str
    with_ctrl: bool


class SimNode:
    """A fake ``/dev`` and ``/sys`` under ``root`` holding simulated STC NPUs.

    ``root/dev`` and ``root/sys`` are created at once; NPUs are added with
    ``add_npu``. Not thread-safe: drive it from one thread (the test).
    """

    def __init__(self, root: Path, *, major: int = DEFAULT_MAJOR) -> None:
        self.root = Path(root)
        self.major = major
        self.dev_dir = self.root / "dev"
        self.sys_dir = self.root / "sys"
        self._specs: dict[int, _NpuSpec] = {}
        self._unplugged: set[int] = set()
        for d in (
            self.dev_dir,
            self.sys_dir / "devices" / "pci0000:00",
            self.sys_dir / "dev" / "char",
            self.sys_dir / "class" / _CLASS_NAME,
            self.sys_dir / "bus" / "pci" / "drivers" / _DRIVER_NAME,
        ):
            d.mkdir(parents=True, exist_ok=True)

    # --- public API -------------------------------------------------------

    def add_npu(
        self,
        index: int,
        *,
        numa_node: int | None = 0,
        clusters: int = 4,
        vendor: str = "0x23e2",
        device: str = "0x0100",
        with_ctrl: bool = True,
    ) -> None:
        """Add NPU ``index`` (its /dev nodes and sysfs tree).

        ``numa_node=None`` writes ``-1`` (no NUMA information), as the kernel
        does. ``clusters`` is 0..4 (nodes c0..c<clusters-1>).
        """
        if not 0 <= index <= _MAX_INDEX:
            raise ValueError(f"NPU index {index} out of range 0..{_MAX_INDEX}")
        if not 0 <= clusters <= _MAX_CLUSTERS:
            raise ValueError(f"clusters {clusters} out of range 0..{_MAX_CLUSTERS}")
        if index in self._specs:
            raise ValueError(f"NPU {index} already exists")
        self._specs[index] = _NpuSpec(index, numa_node, clusters, vendor, device, with_ctrl)
        self._plug(index)

    def unplug(self, index: int) -> None:
        """Hot-unplug NPU ``index``: its /dev nodes, sysfs class entries and
        links, driver link and PCI function dir go (main node last)."""
        self._spec(index)
        if index in self._unplugged:
            raise ValueError(f"NPU {index} is already unplugged")
        pci = self.pci_dir(index)
        for name in reversed(self.node_names(index)):
            minor = self._minor(name)
            _unlink_if_present(self.sys_dir / "dev" / "char" / f"{self.major}:{minor}")
            _unlink_if_present(self.sys_dir / "class" / _CLASS_NAME / name)
            shutil.rmtree(pci / _CLASS_NAME / name, ignore_errors=True)
            _unlink_if_present(self.dev_dir / name)
        for driver_dir in (self.sys_dir / "bus" / "pci" / "drivers").iterdir():
            _unlink_if_present(driver_dir / self.bdf(index))
        shutil.rmtree(pci, ignore_errors=True)
        self._unplugged.add(index)

    def replug(self, index: int) -> None:
        """Restore exactly what ``unplug`` removed (same NUMA node, clusters...)."""
        self._spec(index)
        if index not in self._unplugged:
            raise ValueError(f"NPU {index} is not unplugged")
        self._unplugged.discard(index)
        self._plug(index)

    def remove_node(self, name: str) -> None:
        """Delete one /dev node only (partial failure); sysfs stays."""
        self._present_index(name)
        _unlink_if_present(self.dev_dir / name)

    def restore_node(self, name: str) -> None:
        """Put back the real char device ``name``, replacing whatever is there."""
        self._present_index(name)
        path = self.dev_dir / name
        _unlink_if_present(path)
        self._mknod(name)

    def replace_with_regular_file(self, name: str) -> None:
        """Put a regular file where the char device ``name`` was."""
        self._present_index(name)
        path = self.dev_dir / name
        _unlink_if_present(path)
        path.write_text("not a device\n")

    def replace_with_symlink(self, name: str, target: str) -> None:
        """Put a symlink to ``target`` (taken literally) where ``name`` was."""
        self._present_index(name)
        path = self.dev_dir / name
        _unlink_if_present(path)
        os.symlink(target, path)

    def replace_with_device(self, name: str, devnum: tuple[int, int]) -> None:
        """Put a char device with other numbers (``devnum``) where ``name`` was,
        e.g. another NPU's node (``devnum("stc1c0")``) or /dev/null's."""
        self._present_index(name)
        path = self.dev_dir / name
        _unlink_if_present(path)
        _mknod(path, devnum)

    def add_foreign_node(self, name: str, devnum: tuple[int, int] = NULL_DEVNUM) -> None:
        """A char device ``name`` in /dev that is no NPU (``mknod dev/stc7 c 1 3``).

        Its sysfs entry, as the kernel has for /dev/null and other virtual
        devices, is a class device under ``devices/virtual`` without a
        ``device`` link: no PCI function behind it.
        """
        path = self.dev_dir / name
        if os.path.lexists(path):
            raise ValueError(f"{name} already exists")
        major, minor = devnum
        link = self.sys_dir / "dev" / "char" / f"{major}:{minor}"
        if not os.path.lexists(link):
            cdev = self.sys_dir / "devices" / "virtual" / "foreign" / f"{major}-{minor}"
            cdev.mkdir(parents=True)
            (cdev / "dev").write_text(f"{major}:{minor}\n")
            _relative_symlink(link, cdev)
        _mknod(path, devnum)

    def bind_driver(self, index: int, driver: str | None) -> None:
        """Bind NPU ``index``'s PCI function to ``driver`` (None: unbind it), as
        ``echo BDF > .../unbind`` and a ``bind`` to another driver would; its
        /dev nodes and class devices stay (static nodes a reload left)."""
        self._present_index(f"stc{index}")
        pci = self.pci_dir(index)
        drivers = self.sys_dir / "bus" / "pci" / "drivers"
        for bound in drivers.iterdir():
            _unlink_if_present(bound / self.bdf(index))
        _unlink_if_present(pci / "driver")
        if driver is not None:
            driver_dir = drivers / driver
            driver_dir.mkdir(exist_ok=True)
            _relative_symlink(pci / "driver", driver_dir)
            _relative_symlink(driver_dir / self.bdf(index), pci)

    def node_names(self, index: int) -> list[str]:
        """The /dev node names NPU ``index`` has, in creation order."""
        spec = self._spec(index)
        names = [f"stc{index}"]
        names += [f"stc{index}c{c}" for c in range(spec.clusters)]
        if spec.with_ctrl:
            names.append(f"stc{index}ctrl")
        return names

    def present_npus(self) -> list[int]:
        """Indices of the NPUs added and not unplugged, ascending."""
        return sorted(i for i in self._specs if i not in self._unplugged)

    def bdf(self, index: int) -> str:
        """The PCI address of NPU ``index``, e.g. ``0000:03:00.0``."""
        return f"0000:{index + 3:02x}:00.0"

    def pci_dir(self, index: int) -> Path:
        """The NPU's PCI function dir under ``sys/devices``."""
        bridge = f"0000:00:{index % _PCI_SLOTS + 1:02x}.{index // _PCI_SLOTS}"
        return self.sys_dir / "devices" / "pci0000:00" / bridge / self.bdf(index)

    def devnum(self, name: str) -> tuple[int, int]:
        """(major, minor) of node ``name``."""
        return self.major, self._minor(name)

    # --- internals --------------------------------------------------------

    def _spec(self, index: int) -> _NpuSpec:
        try:
            return self._specs[index]
        except KeyError:
            raise KeyError(f"no NPU {index} on this node") from None

    def _index_of(self, name: str) -> int:
        for index in self._specs:
            if name in self.node_names(index):
                return index
        raise KeyError(f"no device node {name!r} on this node")

    def _present_index(self, name: str) -> int:
        index = self._index_of(name)
        if index in self._unplugged:
            raise ValueError(f"NPU {index} is unplugged; replug it first")
        return index

    def _minor(self, name: str) -> int:
        index = self._index_of(name)
        suffix = name[len(f"stc{index}") :]
        if suffix == "":
            k = 0
        elif suffix == "ctrl":
            k = _CTRL_K
        else:
            k = 1 + int(suffix[1:])
        return index * _MINORS_PER_NPU + k

    def _mknod(self, name: str) -> None:
        _mknod(self.dev_dir / name, self.devnum(name))

    def _plug(self, index: int) -> None:
        spec = self._spec(index)
        pci = self.pci_dir(index)
        pci.mkdir(parents=True)
        (pci / "vendor").write_text(f"{spec.vendor}\n")
        (pci / "device").write_text(f"{spec.device}\n")
        numa = -1 if spec.numa_node is None else spec.numa_node
        (pci / "numa_node").write_text(f"{numa}\n")
        (pci / "class").write_text(f"{_PCI_CLASS}\n")
        vendor_id = spec.vendor.removeprefix("0x").upper()
        device_id = spec.device.removeprefix("0x").upper()
        (pci / "uevent").write_text(
            f"DRIVER={_DRIVER_NAME}\nPCI_ID={vendor_id}:{device_id}\n"
            f"PCI_SLOT_NAME={self.bdf(index)}\n"
        )
        _relative_symlink(pci / "subsystem", self.sys_dir / "bus" / "pci")
        driver_dir = self.sys_dir / "bus" / "pci" / "drivers" / _DRIVER_NAME
        _relative_symlink(pci / "driver", driver_dir)
        _relative_symlink(driver_dir / self.bdf(index), pci)
        for name in self.node_names(index):
            minor = self._minor(name)
            cdev = pci / _CLASS_NAME / name
            cdev.mkdir(parents=True)
            (cdev / "dev").write_text(f"{self.major}:{minor}\n")
            (cdev / "uevent").write_text(f"MAJOR={self.major}\nMINOR={minor}\nDEVNAME={name}\n")
            os.symlink("../../", cdev / "device")
            _relative_symlink(cdev / "subsystem", self.sys_dir / "class" / _CLASS_NAME)
            _relative_symlink(self.sys_dir / "dev" / "char" / f"{self.major}:{minor}", cdev)
            _relative_symlink(self.sys_dir / "class" / _CLASS_NAME / name, cdev)
            self._mknod(name)


def _mknod(path: Path, devnum: tuple[int, int]) -> None:
    os.mknod(path, _DEV_MODE | stat.S_IFCHR, os.makedev(*devnum))
    os.chmod(path, _DEV_MODE)  # mknod's mode is filtered by the umask


def _relative_symlink(link: Path, target: Path) -> None:
    """Make ``link`` point at ``target`` with a relative path, as sysfs does."""
    os.symlink(os.path.relpath(target, link.parent), link)


def _unlink_if_present(path: Path) -> None:
    # Also removes dangling symlinks (Path.exists() would say False for them).
    if path.is_symlink() or path.exists():
        path.unlink()
