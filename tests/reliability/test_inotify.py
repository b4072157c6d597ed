"""The agent's inotify as the kernel sees it (/proc/<pid>/fdinfo): what its
watches ask for, and inotify lost and given back (real limits, contained in
a private user namespace)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from stc_npu_agent.testing.kubelet import KubeletEmulator
from stc_npu_agent.testing.simnode import SimNode
from tests.agent.conftest import RESOURCE, AgentFactory

from .kit import poll

WAIT = 30.0
# <linux/inotify.h>
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE, IN_CLOSE_NOWRITE, IN_OPEN, IN_ACCESS = (
    0x2,
    0x4,
    0x8,
    0x10,
    0x20,
    0x1,
)
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200


def inotify_masks(pid: int) -> dict[int, int]:
    """Inode number -> event mask of every inotify watch the process holds."""
    masks = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != "anon_inode:inotify":
                continue
            info = (Path(f"/proc/{pid}/fdinfo") / fd.name).read_text()
        except OSError:
            continue  # closed between listing and reading
        for match in re.finditer(
            r"^inotify wd:\S+ ino:([0-9a-f]+) .*? mask:([0-9a-f]+)", info, re.M
        ):
            masks[int(match.group(1), 16)] = int(match.group(2), 16)
    return masks


def test_watches_ask_only_for_entries_made_removed_moved_or_changed(
    kubelet: KubeletEmulator, kubelet_dir: Path, node: SimNode, start_agent: AgentFactory
) -> None:
    """No event for opens, closes, reads or writes of any node in /dev."""
    agent = start_agent()
    kubelet.wait_registered(RESOURCE, timeout=WAIT)
    watched = {node.dev_dir.stat().st_ino, kubelet_dir.stat().st_ino}
    poll(lambda: set(inotify_masks(agent.process.pid)) >= watched, timeout=WAIT, what="watches")
    for inode, mask in inotify_masks(agent.process.pid).items():
        assert inode in watched
        wanted = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB
        assert mask & wanted == wanted, hex(mask)
        unwanted = IN_OPEN | IN_CLOSE_NOWRITE | IN_CLOSE_WRITE | IN_MODIFY | IN_ACCESS
        assert mask & unwanted == 0, hex(mask)
    assert agent.terminate() == 0


def userns_works() -> bool:
    try:
        probe = subprocess.run(
            ["unshare", "--user", "--map-root-user", "true"], check=False, capture_output=True
        )
    except FileNotFoundError:
        return False
    return probe.returncode == 0


@pytest.mark.skipif(not userns_works(), reason="needs unshare --user (user namespaces)")
@pytest.mark.parametrize(
    ("limit", "restored"), [("max_inotify_instances", 128), ("max_inotify_watches", 8192)]
)
def test_inotify_given_back_is_used_again(
    limit: str,
    restored: int,
    kubelet: KubeletEmulator,
    node: SimNode,
    start_agent: AgentFactory,
) -> None:
    """Out of inotify, the agent lives on periodic checks but keeps asking:
    once the limit is raised it watches again, and says so once."""
    set_limit = f'echo 0 > /proc/sys/user/{limit} && exec "$@"'
    wrapper = ["unshare", "--user", "--map-root-user", "sh", "-c", set_limit, "sh"]
    agent = start_agent(prefix=wrapper)
    pid = agent.process.pid
    kubelet.wait_registered(RESOURCE, timeout=WAIT)
    agent.wait_log("inotify unavailable", timeout=WAIT)
    assert inotify_masks(pid) == {}
    # The limit belongs to the agent's user namespace: raise it from inside.
    subprocess.run(
        ["nsenter", "--user", "--target", str(pid), "sh", "-c",
         f"echo {restored} > /proc/sys/user/{limit}"],
        check=True,
    )  # fmt: skip
    agent.wait_log("inotify works again", timeout=WAIT)
    watched = node.dev_dir.stat().st_ino
    poll(lambda: watched in inotify_masks(pid), timeout=WAIT, what="/dev watched again")
    node.unplug(1)
    kubelet.wait_until(
        lambda: not kubelet.devices(RESOURCE)["stc1"].healthy, timeout=WAIT, what="stc1 down"
    )
    log = agent.log()
    assert log.count("inotify unavailable") == 1
    assert log.count("inotify works again") == 1
    assert agent.terminate() == 0
