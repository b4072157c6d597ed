"""Helpers of the e2e scenarios: what a pod sees, the host's view of a
container, and the kubelet's own log lines."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from ci.e2e.cluster import CGROUP_FS, CGROUP_NAME, DEVICE_MAJOR, LOG_DIR

# klog: I1206 03:26:53.836898   12954 server.go:87] "message" key="value"
T = TypeVar("T")

# (v1.23 puts "??? " before the source file)
_KLOG = re.compile(
    r"^[IWEF](\d{2})(\d{2}) (\d{2}:\d{2}:\d{2}\.\d{6})\s+(\d+) (?:\?\?\? )?\S+\] (.*)$"
)


@dataclass(frozen=True)
class LogLine:
    at: datetime
    pid: int
    text: str


def kubelet_log(pid: int, log_name: str = "kubelet") -> list[LogLine]:
    """The klog lines of kubelet process ``pid`` (its log holds every run)."""
    year = datetime.now().year
    lines = []
    for raw in (LOG_DIR / f"{log_name}.log").read_text(errors="replace").splitlines():
        match = _KLOG.match(raw)
        if match and int(match.group(4)) == pid:
            month, day, clock = match.group(1), match.group(2), match.group(3)
            at = datetime.strptime(f"{year}-{month}-{day} {clock}", "%Y-%m-%d %H:%M:%S.%f")
            lines.append(LogLine(at, pid, match.group(5)))
    return lines


def first_line(lines: list[LogLine], *needles: str, after: datetime | None = None) -> LogLine:
    """The first line holding every needle (at or after ``after``)."""
    for line in lines:
        if all(n in line.text for n in needles) and (after is None or line.at >= after):
            return line
    raise LookupError(f"no kubelet log line with {needles!r}")


def registration_delay(
    pid: int, server_line: str, register_line: str, resource: str, log_name: str = "kubelet"
) -> tuple[float, datetime, datetime]:
    """Seconds from kubelet ``pid`` starting its registration server to our
    Register, both read from the kubelet's own log."""
    lines = kubelet_log(pid, log_name)
    server = first_line(lines, server_line)
    register = first_line(lines, register_line, resource, after=server.at)
    return (register.at - server.at).total_seconds(), server.at, register.at


def npu_node_names(npu_ids: list[str]) -> set[str]:
    """The /dev names of NPUs ``stcN``: stcN, stcNc0..3, stcNctrl."""
    names = set()
    for npu in npu_ids:
        names |= {npu, f"{npu}ctrl", *(f"{npu}c{c}" for c in range(4))}
    return names


def cgroup_of(pid: int, hierarchy: str) -> Path:
    """The host path of ``pid``'s cgroup in a v1 hierarchy (e.g. devices)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if hierarchy in controllers.split(","):
            return CGROUP_FS / hierarchy / path.lstrip("/")
    raise LookupError(f"process {pid} has no {hierarchy} cgroup")


def allowed_npu_minors(devices_list: str) -> set[int]:
    """Minors of major DEVICE_MAJOR that a devices.list lets through."""
    minors = set()
    for entry in devices_list.split("\n"):
        match = re.fullmatch(rf"c {DEVICE_MAJOR}:(\d+|\*) \w+", entry.strip())
        if match:
            if match.group(1) == "*":
                raise AssertionError(f"the devices cgroup allows every minor: {entry!r}")
            minors.add(int(match.group(1)))
    return minors


def container_devices_minors(proc_self_cgroup: str) -> set[int]:
    """Minors of DEVICE_MAJOR that a container's devices cgroup lets
    through, from the container's own /proc/self/cgroup (cgroup v1, no
    cgroup namespace: it names the host path)."""
    path = next(
        line.split(":", 2)[2]
        for line in proc_self_cgroup.splitlines()
        if "devices" in line.split(":", 2)[1].split(",")
    )
    devices_list = CGROUP_FS / "devices" / path.lstrip("/") / "devices.list"
    return allowed_npu_minors(devices_list.read_text())


def pod_processes(marker: str) -> list[int]:
    """Host pids of processes in the node's pod cgroups whose command line
    holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cgroups = (entry / "cgroup").read_text()
        except OSError:
            continue
        if marker in cmdline and f"/{CGROUP_NAME}/" in cgroups:
            found.append(int(entry.name))
    return sorted(found)


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def since(started: float) -> float:
    return time.monotonic() - started


def wait_result(fetch: Callable[[], T], what: str, timeout: float = 120) -> T:
    """Call ``fetch`` until it returns instead of raising; its value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fetch()
        except (LookupError, OSError, ValueError) as error:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:.0f} s waiting for {what}: {error}"
                ) from error
            time.sleep(0.5)
