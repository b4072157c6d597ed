"""Simulated NPUs on the real node: device nodes in the host's /dev, sysfs, HPE.

The kubelet hands containers the host paths Allocate answers (/dev/stcN...),
so the nodes must exist in the host's real /dev: real character devices,
major 240 (nobody's), minors 8N..8N+5 for stcN, stcNc0..3, stcNctrl. Opening
one gives ENXIO (no driver), which the tests never need: the devices cgroup
and the container's view are what they check.

The sysfs tree that ties each node to a PCI function of vendor 0x23e2 bound
to driver ``stc`` is a SimNode at a private host path (SIM_ROOT/sys); the
SimNode's own dev dir holds the same device numbers. Every node made in /dev
is recorded in the state file before it is made; teardown removes exactly
those (and only while they are still our char devices).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from ci.e2e.cluster import BASE, DEVICE_MAJOR, record, unrecord

from stc_npu_agent.testing.simnode import SimNode

SIM_ROOT = BASE / "simnode"
HOST_DEV = Path("/dev")
HPE_DIR = Path("/usr/local/hpe")
HPE_MARKER = "stc-npu-e2e.txt"
# The vendor's nodes are usually 0666 (images/pod-mapped/Dockerfile): the
# example pods run as uid 1000.
NODE_MODE = 0o666
# The simulated `stc` kernel module's version (/sys/module/stc/version): the
# DRA slice's driverVersion attribute.
DRIVER_VERSION = "1.4.0"


class HostNpus:
    """NPUs 0..count-1 on the host, NUMA node index // 2 (two per node)."""

    def __init__(self, count: int) -> None:
        shutil.rmtree(SIM_ROOT, ignore_errors=True)
        record("dirs", str(SIM_ROOT))
        self.sim = SimNode(SIM_ROOT, major=DEVICE_MAJOR)
        self.count = count
        module = self.sim.sys_dir / "module" / "stc"
        module.mkdir(parents=True, exist_ok=True)
        (module / "version").write_text(f"{DRIVER_VERSION}\n")
        for index in range(count):
            self.sim.add_npu(index, numa_node=index // 2)
            self._mknod_all(index)

    @property
    def sys_dir(self) -> Path:
        """The simulated sysfs root (the agent's --sys-dir / the chart's sysDir)."""
        return self.sim.sys_dir

    def node_names(self, index: int) -> list[str]:
        return self.sim.node_names(index)

    def all_node_names(self) -> list[str]:
        return [name for i in range(self.count) for name in self.node_names(i)]

    def unplug(self, index: int) -> None:
        """Remove the NPU's host nodes (main node last, as the driver does),
        then its sysfs entries."""
        for name in reversed(self.node_names(index)):
            path = HOST_DEV / name
            path.unlink(missing_ok=True)
            unrecord("device_nodes", str(path))
        self.sim.unplug(index)

    def replug(self, index: int) -> None:
        self.sim.replug(index)
        self._mknod_all(index)

    def _mknod_all(self, index: int) -> None:
        for name in self.node_names(index):
            path = HOST_DEV / name
            major, minor = self.sim.devnum(name)
            if path.exists() or path.is_symlink():
                info = path.lstat()
                if not (stat.S_ISCHR(info.st_mode) and os.major(info.st_rdev) == DEVICE_MAJOR):
                    raise RuntimeError(
                        f"{path} exists and is not a simulated NPU node; not touching it"
                    )
                path.unlink()
            record("device_nodes", str(path))
            os.mknod(path, stat.S_IFCHR | NODE_MODE, os.makedev(major, minor))
            path.chmod(NODE_MODE)  # mknod applies the umask


def make_hpe_dir() -> Path:
    """A non-empty /usr/local/hpe for mapped mode; made (and recorded for
    removal) only when the host has none."""
    if not HPE_DIR.exists():
        record("dirs", str(HPE_DIR))
        (HPE_DIR / "bin").mkdir(parents=True)
        (HPE_DIR / HPE_MARKER).write_text("simulated HPE of the stc-npu e2e\n")
    return HPE_DIR
