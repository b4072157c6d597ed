"""SimNode builds real char devices and a sysfs tree with the kernel's links."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from stc_npu_agent.testing.simnode import SimNode


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under root -> what it is (file content, link target, devnum)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(path)
            elif stat.S_ISCHR(st.st_mode):
                out[rel] = f"chr:{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}:{st.st_mode:o}"
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            else:
                out[rel] = "file:" + path.read_text()
    return out


@pytest.fixture
def node(tmp_path: Path) -> SimNode:
    sim = SimNode(tmp_path / "root")
    sim.add_npu(0)
    sim.add_npu(1, numa_node=None)
    return sim


def test_creates_dev_and_sys(tmp_path: Path) -> None:
    sim = SimNode(tmp_path / "r")
    assert sim.dev_dir == tmp_path / "r" / "dev"
    assert sim.sys_dir == tmp_path / "r" / "sys"
    assert sim.dev_dir.is_dir()
    assert sim.sys_dir.is_dir()
    assert sim.present_npus() == []


def test_real_char_devices_with_numbers_and_mode(node: SimNode) -> None:
    assert node.node_names(1) == ["stc1", "stc1c0", "stc1c1", "stc1c2", "stc1c3", "stc1ctrl"]
    expected_k = {"": 0, "c0": 1, "c1": 2, "c2": 3, "c3": 4, "ctrl": 5}
    for index in (0, 1):
        for name in node.node_names(index):
            st = os.lstat(node.dev_dir / name)
            assert stat.S_ISCHR(st.st_mode), name
            assert os.major(st.st_rdev) == 240
            k = expected_k[name.removeprefix(f"stc{index}")]
            assert os.minor(st.st_rdev) == index * 8 + k, name
            assert stat.S_IMODE(st.st_mode) == 0o660
            assert node.devnum(name) == (240, index * 8 + k)
    assert sorted(p.name for p in node.dev_dir.iterdir()) == sorted(
        node.node_names(0) + node.node_names(1)
    )


def test_major_is_a_parameter(tmp_path: Path) -> None:
    sim = SimNode(tmp_path / "r", major=511)
    sim.add_npu(2, clusters=2, with_ctrl=False)
    assert sim.node_names(2) == ["stc2", "stc2c0", "stc2c1"]
    st = os.lstat(sim.dev_dir / "stc2c1")
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (511, 18)
    assert (sim.sys_dir / "dev" / "char" / "511:18").is_dir()
    assert not (sim.dev_dir / "stc2ctrl").exists()


def test_sysfs_links_resolve_from_dev_char_to_pci_function(node: SimNode) -> None:
    sys = node.sys_dir
    link = sys / "dev" / "char" / "240:9"  # stc1c0: 1*8 + 1
    assert link.is_symlink()
    assert not os.readlink(link).startswith("/")
    cdev = link.resolve()
    assert cdev.name == "stc1c0"
    assert cdev.parent.name == "stc"
    assert (cdev / "dev").read_text() == "240:9\n"
    assert os.readlink(cdev / "device") in ("../../", "../..")
    pci = (cdev / "device").resolve()
    assert pci == node.pci_dir(1).resolve()
    assert pci.name == node.bdf(1) == "0000:04:00.0"
    assert (pci / "vendor").read_text() == "0x23e2\n"
    assert (pci / "device").read_text() == "0x0100\n"
    assert (pci / "numa_node").read_text() == "-1\n"
    assert (pci / "class").exists()
    # NPU 0 has NUMA node 0; its main node is 240:0.
    pci0 = (sys / "dev" / "char" / "240:0" / "device").resolve()
    assert (pci0 / "numa_node").read_text() == "0\n"
    assert pci0.name == "0000:03:00.0"
    # class and driver links.
    assert (sys / "class" / "stc" / "stc1ctrl").resolve() == (
        sys / "dev" / "char" / "240:13"
    ).resolve()
    drv = sys / "bus" / "pci" / "drivers" / "stc" / node.bdf(1)
    assert os.readlink(drv).startswith("../../../../devices/")
    assert drv.resolve() == pci
    assert (pci / "driver").resolve() == (sys / "bus" / "pci" / "drivers" / "stc").resolve()
    # Every class-device dir has a dev file matching its link name.
    for entry in (sys / "dev" / "char").iterdir():
        assert (entry / "dev").read_text() == f"{entry.name}\n"


def test_custom_ids_and_numa(tmp_path: Path) -> None:
    sim = SimNode(tmp_path / "r")
    sim.add_npu(3, numa_node=1, vendor="0x1234", device="0x0950")
    pci = (sim.sys_dir / "class" / "stc" / "stc3" / "device").resolve()
    assert (pci / "vendor").read_text() == "0x1234\n"
    assert (pci / "device").read_text() == "0x0950\n"
    assert (pci / "numa_node").read_text() == "1\n"


def test_unplug_removes_everything_and_replug_restores_it(node: SimNode) -> None:
    before = _snapshot(node.root)
    node.unplug(1)
    assert node.present_npus() == [0]
    for name in node.node_names(1):
        assert not os.path.lexists(node.dev_dir / name)
        assert not os.path.lexists(node.sys_dir / "class" / "stc" / name)
    for minor in range(8, 14):
        assert not os.path.lexists(node.sys_dir / "dev" / "char" / f"240:{minor}")
    assert not os.path.lexists(node.sys_dir / "bus" / "pci" / "drivers" / "stc" / node.bdf(1))
    assert not node.pci_dir(1).exists()
    # NPU 0 untouched.
    assert stat.S_ISCHR(os.lstat(node.dev_dir / "stc0").st_mode)
    assert (node.sys_dir / "dev" / "char" / "240:0" / "dev").exists()
    with pytest.raises(ValueError, match="already unplugged"):
        node.unplug(1)

    node.replug(1)
    assert node.present_npus() == [0, 1]
    assert _snapshot(node.root) == before
    with pytest.raises(ValueError, match="not unplugged"):
        node.replug(1)


def test_remove_and_restore_one_node(node: SimNode) -> None:
    node.remove_node("stc0c2")
    assert not os.path.lexists(node.dev_dir / "stc0c2")
    assert (node.sys_dir / "class" / "stc" / "stc0c2").exists()  # sysfs stays
    assert node.present_npus() == [0, 1]
    node.restore_node("stc0c2")
    st = os.lstat(node.dev_dir / "stc0c2")
    assert stat.S_ISCHR(st.st_mode)
    assert os.minor(st.st_rdev) == 3


def test_bad_input_replacements(node: SimNode) -> None:
    node.replace_with_regular_file("stc0ctrl")
    st = os.lstat(node.dev_dir / "stc0ctrl")
    assert stat.S_ISREG(st.st_mode)

    node.replace_with_symlink("stc0", "/dev/null")
    assert (node.dev_dir / "stc0").is_symlink()
    assert os.readlink(node.dev_dir / "stc0") == "/dev/null"

    node.replace_with_symlink("stc1", "stc0c0")  # relative, to a real device
    assert os.readlink(node.dev_dir / "stc1") == "stc0c0"

    for name in ("stc0ctrl", "stc0", "stc1"):
        node.restore_node(name)
        assert stat.S_ISCHR(os.lstat(node.dev_dir / name).st_mode)


def test_errors(node: SimNode) -> None:
    with pytest.raises(ValueError, match="already exists"):
        node.add_npu(0)
    with pytest.raises(ValueError, match="clusters"):
        node.add_npu(5, clusters=5)
    with pytest.raises(KeyError):
        node.remove_node("stc9")
    with pytest.raises(KeyError):
        node.node_names(7)
    node.unplug(0)
    with pytest.raises(ValueError, match="unplugged"):
        node.restore_node("stc0")


def test_room_for_64_npus_with_distinct_pci_addresses(tmp_path: Path) -> None:
    node = SimNode(tmp_path / "big")
    for index in range(64):
        node.add_npu(index)
    pci_dirs = {node.pci_dir(index) for index in range(64)}
    assert len(pci_dirs) == 64
    assert all(path.is_dir() for path in pci_dirs)
    assert len(list(node.dev_dir.iterdir())) == 64 * 6


def test_pci_function_is_on_the_pci_bus(node: SimNode) -> None:
    subsystem = node.pci_dir(0) / "subsystem"
    assert subsystem.resolve() == (node.sys_dir / "bus" / "pci").resolve()


def test_foreign_node_has_no_pci_parent(node: SimNode) -> None:
    node.add_foreign_node("stc7")
    st = os.lstat(node.dev_dir / "stc7")
    assert stat.S_ISCHR(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    cdev = node.sys_dir / "dev" / "char" / "1:3"
    assert (cdev / "dev").read_text() == "1:3\n"
    assert not os.path.lexists(cdev / "device")
    node.add_foreign_node("stc8")  # the same numbers again: one sysfs entry
    with pytest.raises(ValueError, match="already exists"):
        node.add_foreign_node("stc0")


def test_replace_with_device_keeps_the_name(node: SimNode) -> None:
    node.replace_with_device("stc0c1", node.devnum("stc1c1"))
    st = os.lstat(node.dev_dir / "stc0c1")
    assert stat.S_ISCHR(st.st_mode)
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == node.devnum("stc1c1")


def test_bind_driver_rebinds_and_unbinds(node: SimNode) -> None:
    drivers = node.sys_dir / "bus" / "pci" / "drivers"
    pci = node.pci_dir(0)
    node.bind_driver(0, "vfio-pci")
    assert (pci / "driver").resolve() == (drivers / "vfio-pci").resolve()
    assert (drivers / "vfio-pci" / node.bdf(0)).resolve() == pci.resolve()
    assert not os.path.lexists(drivers / "stc" / node.bdf(0))
    node.bind_driver(0, None)
    assert not os.path.lexists(pci / "driver")
    assert not os.path.lexists(drivers / "vfio-pci" / node.bdf(0))
    assert stat.S_ISCHR(os.lstat(node.dev_dir / "stc0").st_mode)  # nodes stay
    node.bind_driver(0, "stc")
    node.unplug(0)
    node.replug(0)
    assert (pci / "driver").resolve() == (drivers / "stc").resolve()
