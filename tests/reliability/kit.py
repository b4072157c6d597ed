"""Helpers for the reliability suites: what a process holds, what listens."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SOCKET_NAME = re.compile(r"stc-npu\.[0-9a-f]+\.sock")
# Every host path an Allocate may ever hand out.
DEVICE_PATH = re.compile(r"/dev/stc[0-9]+(c[0-9]+|ctrl)?")
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp{,6}


@dataclass(frozen=True)
class Held:
    """What one process holds: fds (and how many are sockets), threads."""

    fds: int
    sockets: int
    threads: int

    def within(self, baseline: Held, slack: int) -> bool:
        return (
            self.fds <= baseline.fds + slack
            and self.sockets <= baseline.sockets + slack
            and self.threads <= baseline.threads + slack
        )


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed between listing and reading
        match = re.fullmatch(r"socket:\[([0-9]+)\]", target)
        if match:
            inodes.add(int(match.group(1)))
    return inodes


def held(pid: int) -> Held:
    return Held(
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        sockets=len(socket_inodes(pid)),
        threads=len(os.listdir(f"/proc/{pid}/task")),
    )


def inet_inodes(pid: int, *, listening_only: bool) -> set[int]:
    """Inodes of TCP (LISTEN, or any) and UDP sockets in ``pid``'s net namespace."""
    inodes = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            state, inode = fields[3], int(fields[9])
            if table.startswith("udp") or not listening_only or state == LISTEN:
                inodes.add(inode)
    return inodes


def own_sockets(kubelet_dir: Path) -> list[str]:
    try:
        return sorted(p.name for p in kubelet_dir.iterdir() if SOCKET_NAME.fullmatch(p.name))
    except FileNotFoundError:
        return []


def poll(predicate: Callable[[], bool], *, timeout: float = 20.0, what: str = "") -> None:
    """Wait until ``predicate()``; the timeout is a generous deadline only."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
