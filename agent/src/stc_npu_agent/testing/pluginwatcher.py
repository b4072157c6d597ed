"""The kubelet's plugin watcher, for the emulators: finds registration
sockets in ``plugins_registry`` and asks them who they are.

Follows the kubelet's ``pluginmanager``: at start it walks the dir (sockets
left from before a restart are found again: the kubelet never cleans it);
afterwards every new socket (a new file, or one made anew under the same
name) is handled once; dot-files are ignored; a socket removed deregisters
its plugin. ``GetInfo`` has a 1 s deadline, as the kubelet's; a socket
whose registration failed is tried again a second later (the kubelet's
reconciler keeps trying while the socket is there). The real
watcher uses inotify; this one looks every ``interval`` (10 ms), which is
fine for tests and shows in the bench's figures as at most that much.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from stc_npu_agent.pluginregistration import api_pb2 as registration_pb2
from stc_npu_agent.pluginregistration import api_pb2_grpc as registration_grpc

log = logging.getLogger(__name__)

GET_INFO_TIMEOUT = 1.0
POLL_INTERVAL = 0.01
RETRY_INTERVAL = 1.0

SocketIdentity = tuple[int, int]


def get_info(path: Path) -> registration_pb2.PluginInfo:
    """GetInfo on a registration socket, with the kubelet's 1 s deadline."""
    with grpc.insecure_channel(f"unix://{path}") as channel:
        return registration_grpc.RegistrationStub(channel).GetInfo(
            registration_pb2.InfoRequest(), timeout=GET_INFO_TIMEOUT
        )


def notify(path: Path, registered: bool, error: str = "") -> None:
    """NotifyRegistrationStatus; a plugin that does not answer is only logged."""
    try:
        with grpc.insecure_channel(f"unix://{path}") as channel:
            registration_grpc.RegistrationStub(channel).NotifyRegistrationStatus(
                registration_pb2.RegistrationStatus(plugin_registered=registered, error=error),
                timeout=GET_INFO_TIMEOUT,
            )
    except grpc.RpcError as exc:
        log.info("NotifyRegistrationStatus to %s failed: %s", path, exc.code().name)


def _sockets(directory: Path) -> dict[Path, SocketIdentity]:
    found = {}
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return {}
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISSOCK(info.st_mode):
            found[Path(entry.path)] = (info.st_ino, info.st_mtime_ns)
    return found


class PluginDirWatcher:
    """Calls ``on_added(path)`` for each new socket (again after
    RETRY_INTERVAL while it returns False) and ``on_removed(path)`` for each
    one gone, from its own thread, one at a time."""

    def __init__(
        self,
        directory: Path,
        on_added: Callable[[Path], bool],
        on_removed: Callable[[Path], bool | None],
        interval: float = POLL_INTERVAL,
    ) -> None:
        self.directory = directory
        self.on_added = on_added
        self.on_removed = on_removed
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="plugin-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        known: dict[Path, SocketIdentity] = {}
        retry_at: dict[Path, float] = {}
        while not self._stop.is_set():
            current = _sockets(self.directory)
            for path in known.keys() - current.keys():
                retry_at.pop(path, None)
                self._call(self.on_removed, path)
            now = time.monotonic()
            for path, identity in sorted(current.items()):
                if known.get(path) != identity or retry_at.get(path, now + 1) <= now:
                    retry_at.pop(path, None)
                    if not self._call(self.on_added, path):
                        retry_at[path] = time.monotonic() + RETRY_INTERVAL
            known = current
            self._stop.wait(self.interval)

    def _call(self, handler: Callable[[Path], bool | None], path: Path) -> bool:
        try:
            return handler(path) is not False
        except Exception:
            log.exception("plugin watcher handler failed for %s", path)
            return False
