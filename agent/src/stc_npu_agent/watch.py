"""File system signals from watchdog (inotify), handed to the asyncio loop.

A watch is on one directory, not recursive. A directory that does not exist
yet, or was deleted and made again, is (re)watched by ``ensure()``, which the
agent calls from its periodic check. If inotify cannot be had (no instances
or watches left), ``available`` turns False and the agent falls back to
periodic checks; the reason is logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

log = logging.getLogger(__name__)

NamesCallback = Callable[[set[str]], None]


class _Forward(FileSystemEventHandler):
    """Runs on watchdog's thread: pass the entry names to the loop, nothing else."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, root: Path, callback: NamesCallback
    ) -> None:
        self.loop = loop
        self.root = os.fsencode(root)
        self.callback = callback
        # Set when the watched directory itself goes: its inotify watch is
        # dead even if a new directory comes back with the same inode number.
        self.root_deleted = False

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type == "deleted" and os.fsencode(event.src_path) == self.root:
            self.root_deleted = True
        names = {os.path.basename(os.fsdecode(event.src_path))}
        if event.dest_path:
            names.add(os.path.basename(os.fsdecode(event.dest_path)))
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            self.loop.call_soon_threadsafe(self.callback, names)


@dataclass
class _Watch:
    callback: NamesCallback
    handler: _Forward | None = None
    watch: ObservedWatch | None = None
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the watched dir

    def alive_on(self, identity: tuple[int, int] | None) -> bool:
        if identity is None:
            return self.watch is None
        return (
            self.watch is not None
            and self.identity == identity
            and self.handler is not None
            and not self.handler.root_deleted
        )


class DirectoryWatcher:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.available = True
        self._observer: BaseObserver | None = None
        self._watches: dict[Path, _Watch] = {}

    def add(self, path: Path, callback: NamesCallback) -> None:
        self._watches[path] = _Watch(callback)
        self.ensure()

    def watching(self, path: Path) -> bool:
        entry = self._watches.get(path)
        return entry is not None and entry.watch is not None and self.available

    def ensure(self) -> None:
        """(Re)arm each watch whose directory appeared, went, or was replaced."""
        for path, entry in self._watches.items():
            if not self.available:
                return
            try:
                info = path.stat()
                identity: tuple[int, int] | None = (info.st_dev, info.st_ino)
            except OSError:
                identity = None
            if entry.alive_on(identity):
                continue
            if entry.watch is not None and self._observer is not None:
                with contextlib.suppress(KeyError, OSError):
                    self._observer.unschedule(entry.watch)
            entry.watch, entry.handler, entry.identity = None, None, None
            if identity is not None:
                handler = _Forward(self.loop, path, entry.callback)
                watch = self._schedule(path, handler)
                if watch is not None:
                    entry.watch, entry.handler, entry.identity = watch, handler, identity
                    # Entries may have changed while nothing watched: look now.
                    entry.callback(set())

    def _schedule(self, path: Path, handler: _Forward) -> ObservedWatch | None:
        try:
            if self._observer is None:
                self._observer = Observer()
                self._observer.daemon = True
                self._observer.start()
            return self._observer.schedule(handler, str(path))
        except OSError as error:
            self.available = False
            log.warning(
                "inotify unavailable (%s): falling back to periodic checks of %s", error, path
            )
            self.stop()
            return None

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=2)
