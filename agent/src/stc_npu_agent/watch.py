"""File system signals from watchdog (inotify), handed to the asyncio loop.

A watch is on one directory, not recursive, and asks the kernel only for
entries made, removed, moved, or changed in their attributes: never for
opens, closes, reads or writes, which on a busy ``/dev`` (``/dev/null``,
ttys) come by the thousand per second and mean nothing to the agent.

A directory that does not exist yet, was deleted and made again, or went
away while its watch was being set, is (re)watched by ``ensure()``, which
the agent calls from its periodic check. Only running out of inotify
(instances, watches, memory) turns ``available`` False: the agent then falls
back to periodic checks, and ``ensure()`` tries inotify again every
``retry_after`` seconds. Losing it and getting it back are each logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.inotify import InotifyEmitter, InotifyObserver
from watchdog.observers.inotify_c import InotifyConstants, Mask

log = logging.getLogger(__name__)

NamesCallback = Callable[[set[str]], None]

# How long the agent lives on periodic checks before it asks for inotify again.
RETRY_SECONDS = 10.0

# The changes the agent acts on. watchdog sets the kernel's mask from this
# list, so the rest (open, close, access, modify) never leaves the kernel.
EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileAttribEvent,  # chmod/chown of a node: its health may change
    DirAttribEvent,
]

# Errors that mean inotify itself is used up, not that one directory is amiss.
OUT_OF_INOTIFY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.ENOMEM})
# The directory went (or became a file) between its stat and its watch.
GONE = frozenset({errno.ENOENT, errno.ENOTDIR})


class _Emitter(InotifyEmitter):
    def get_event_mask_from_filter(self) -> Mask:
        # watchdog puts IN_ATTRIB in the mask only together with IN_MODIFY
        # (for FileModifiedEvent), and every write to /dev/null is an
        # IN_MODIFY: ask for IN_ATTRIB alone.
        return Mask(super().get_event_mask_from_filter() | InotifyConstants.IN_ATTRIB)


class _Observer(InotifyObserver):
    def __init__(self) -> None:
        super().__init__()
        self._emitter_class = _Emitter


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
    problem: str | None = None  # why the last attempt failed, as logged

    def alive_on(self, identity: tuple[int, int] | None) -> bool:
        if identity is None:
            return self.watch is None
        return (
            self.watch is not None
            and self.identity == identity
            and self.handler is not None
            and not self.handler.root_deleted
        )

    def forget(self) -> None:
        self.watch, self.handler, self.identity = None, None, None


class DirectoryWatcher:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        retry_after: float = RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.loop = loop
        self.retry_after = retry_after
        self._clock = clock
        self._observer: BaseObserver | None = None
        self._watches: dict[Path, _Watch] = {}
        # Set while inotify is used up: when to try it again.
        self._retry_at: float | None = None

    @property
    def available(self) -> bool:
        return self._retry_at is None

    def add(self, path: Path, callback: NamesCallback) -> None:
        self._watches[path] = _Watch(callback)
        self.ensure()

    def watching(self, path: Path) -> bool:
        entry = self._watches.get(path)
        return entry is not None and entry.watch is not None and self.available

    def ensure(self) -> None:
        """(Re)arm each watch whose directory appeared, went, or was replaced."""
        retrying = self._retry_at is not None
        if self._retry_at is not None and self._clock() < self._retry_at:
            return
        for path, entry in self._watches.items():
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
            entry.forget()
            if identity is None:
                continue
            handler = _Forward(self.loop, path, entry.callback)
            try:
                entry.watch = self._schedule(path, handler)
            except OSError as error:
                if error.errno in OUT_OF_INOTIFY:
                    self._fall_back(error, path)
                    return
                self._note_problem(path, entry, error)
                continue
            entry.handler, entry.identity = handler, identity
            if entry.problem is not None:
                log.info("watching %s again", path)
                entry.problem = None
            # Entries may have changed while nothing watched: look now.
            entry.callback(set())
        if retrying:
            self._retry_at = None
            log.info("inotify works again: watching %s", ", ".join(map(str, self._watches)))

    def _schedule(self, path: Path, handler: _Forward) -> ObservedWatch:
        if self._observer is None:
            observer = _Observer()
            observer.daemon = True
            observer.start()
            self._observer = observer
        return self._observer.schedule(handler, str(path), event_filter=EVENTS)

    def _fall_back(self, error: OSError, path: Path) -> None:
        if self._retry_at is None:
            log.warning(
                "inotify unavailable (%s): falling back to periodic checks of %s;"
                " trying it again every %.0f s",
                error.strerror or error,
                path,
                self.retry_after,
            )
        self._retry_at = self._clock() + self.retry_after
        self.stop()

    @staticmethod
    def _note_problem(path: Path, entry: _Watch, error: OSError) -> None:
        if error.errno in GONE:
            return  # it went since its stat: the next ensure() sees that
        problem = error.strerror or str(error)
        if problem != entry.problem:
            log.warning("cannot watch %s (%s): checking it periodically instead", path, problem)
            entry.problem = problem

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        for entry in self._watches.values():
            entry.forget()
        if observer is not None:
            observer.stop()
            observer.join(timeout=2)
