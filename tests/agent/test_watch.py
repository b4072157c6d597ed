"""DirectoryWatcher with real inotify on a real directory: which changes reach
the callback, and how a watch that could not be set is tried again."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from watchdog.observers.api import BaseObserver

from stc_npu_agent.watch import DirectoryWatcher

WAIT = 20.0
NULL_DEVICE = os.makedev(1, 3)  # the numbers of /dev/null: a node that is not ours


class Recorder:
    """Collects the names the watcher hands to the loop, in order."""

    def __init__(self) -> None:
        self.calls: list[set[str]] = []

    def __call__(self, names: set[str]) -> None:
        self.calls.append(names)

    @property
    def names(self) -> set[str]:
        return set().union(*self.calls)

    async def wait_for(self, name: str) -> None:
        async def seen() -> None:
            while name not in self.names:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(seen(), WAIT)


def run(body: Callable[[asyncio.AbstractEventLoop], Awaitable[None]]) -> None:
    async def main() -> None:
        await body(asyncio.get_running_loop())

    asyncio.run(main())


@pytest.fixture
def dev_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "dev"
    directory.mkdir()
    os.mknod(directory / "null", 0o666 | stat.S_IFCHR, NULL_DEVICE)
    os.mknod(directory / "stc0", 0o600 | stat.S_IFCHR, os.makedev(240, 0))
    return directory


def test_open_close_and_writes_of_an_unrelated_node_never_reach_the_callback(
    dev_dir: Path,
) -> None:
    """A busy /dev/null must not wake the agent: the watch asks the kernel
    for entries made, removed, moved or changed in their attributes only."""

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        watcher = DirectoryWatcher(loop)
        recorder = Recorder()
        watcher.add(dev_dir, recorder)
        try:
            assert watcher.watching(dev_dir)
            for _ in range(50):
                fd = os.open(dev_dir / "null", os.O_RDONLY)
                os.close(fd)
                fd = os.open(dev_dir / "null", os.O_WRONLY)
                os.write(fd, b"x")
                os.close(fd)
            # Events arrive in order: once this one is seen, any event of the
            # opens, writes and closes above would have been seen before it.
            (dev_dir / "sentinel").touch()
            await recorder.wait_for("sentinel")
            assert "null" not in recorder.names
        finally:
            watcher.stop()

    run(body)


def _create(directory: Path) -> set[str]:
    os.mknod(directory / "stc1", 0o600 | stat.S_IFCHR, os.makedev(240, 6))
    return {"stc1"}


def _delete(directory: Path) -> set[str]:
    (directory / "stc0").unlink()
    return {"stc0"}


def _rename_within(directory: Path) -> set[str]:
    (directory / "stc0").rename(directory / "stc9")
    return {"stc0", "stc9"}


def _move_in(directory: Path) -> set[str]:
    outside = directory.parent / "stc5"
    os.mknod(outside, 0o600 | stat.S_IFCHR, os.makedev(240, 30))
    outside.rename(directory / "stc5")
    return {"stc5"}


def _move_out(directory: Path) -> set[str]:
    (directory / "stc0").rename(directory.parent / "stc0")
    return {"stc0"}


def _replace(directory: Path) -> set[str]:
    # How udev replaces a node: a new one made aside, renamed over the old.
    os.mknod(directory / ".stc0.tmp", 0o600 | stat.S_IFCHR, os.makedev(240, 1))
    (directory / ".stc0.tmp").replace(directory / "stc0")
    return {"stc0"}


def _chmod(directory: Path) -> set[str]:
    (directory / "stc0").chmod(0o666)
    return {"stc0"}


def _chown(directory: Path) -> set[str]:
    os.chown(directory / "stc0", 1000, 1000)
    return {"stc0"}


@pytest.mark.parametrize(
    "change", [_create, _delete, _rename_within, _move_in, _move_out, _replace, _chmod, _chown]
)
def test_entries_made_removed_moved_or_changed_reach_the_callback(
    dev_dir: Path, change: Callable[[Path], set[str]]
) -> None:
    async def body(loop: asyncio.AbstractEventLoop) -> None:
        watcher = DirectoryWatcher(loop)
        recorder = Recorder()
        watcher.add(dev_dir, recorder)
        try:
            expected = change(dev_dir)
            for name in expected:
                await recorder.wait_for(name)
        finally:
            watcher.stop()

    run(body)


@pytest.fixture
def schedule_hook(monkeypatch: pytest.MonkeyPatch) -> list[Callable[[str], None]]:
    """Functions run (once each, in turn) right before watchdog sets a watch."""
    hooks: list[Callable[[str], None]] = []
    real_schedule = BaseObserver.schedule

    def schedule(self: BaseObserver, handler: Any, path: str, **kwargs: Any) -> Any:
        if hooks:
            hooks.pop(0)(path)
        return real_schedule(self, handler, path, **kwargs)

    monkeypatch.setattr(BaseObserver, "schedule", schedule)
    return hooks


def test_a_directory_gone_while_its_watch_is_set_is_watched_when_it_is_back(
    dev_dir: Path, schedule_hook: list[Callable[[str], None]], caplog: pytest.LogCaptureFixture
) -> None:
    """The race of a directory removed between its stat and inotify_add_watch
    (a real ENOENT) is no reason to give up inotify: the next ensure() (the
    agent's 1 s tick) watches the directory once it exists again."""
    caplog.set_level(logging.INFO, logger="stc_npu_agent.watch")

    def remove_it(path: str) -> None:
        for entry in Path(path).iterdir():
            entry.unlink()
        Path(path).rmdir()

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        schedule_hook.append(remove_it)
        watcher = DirectoryWatcher(loop)
        recorder = Recorder()
        watcher.add(dev_dir, recorder)
        try:
            assert not watcher.watching(dev_dir)
            dev_dir.mkdir()
            watcher.ensure()
            assert watcher.watching(dev_dir)
            (dev_dir / "stc3").touch()
            await recorder.wait_for("stc3")
        finally:
            watcher.stop()

    run(body)
    assert "inotify unavailable" not in caplog.text


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "inotify watch limit reached"),
        OSError(errno.EMFILE, "inotify instance limit reached"),
    ],
)
def test_out_of_inotify_resources_falls_back_then_retries_and_recovers(
    dev_dir: Path,
    schedule_hook: list[Callable[[str], None]],
    caplog: pytest.LogCaptureFixture,
    error: OSError,
) -> None:
    """Out of watches or instances: periodic checks (``watching`` is False),
    said once; inotify is tried again after a while, and its return is said once."""
    caplog.set_level(logging.INFO, logger="stc_npu_agent.watch")

    def exhausted(path: str) -> None:
        raise error

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        clock = Clock()
        watcher = DirectoryWatcher(loop, retry_after=30.0, clock=clock)
        recorder = Recorder()
        schedule_hook.extend([exhausted, exhausted])
        watcher.add(dev_dir, recorder)
        try:
            assert not watcher.watching(dev_dir)
            assert not watcher.available
            watcher.ensure()  # too soon: not tried again
            assert len(schedule_hook) == 1
            clock.now += 31
            watcher.ensure()  # tried again, still exhausted
            assert not schedule_hook
            assert not watcher.watching(dev_dir)
            clock.now += 1
            watcher.ensure()
            assert not watcher.watching(dev_dir)  # waits out its interval again
            clock.now += 30
            watcher.ensure()
            assert watcher.watching(dev_dir)
            assert watcher.available
            (dev_dir / "stc3").touch()
            await recorder.wait_for("stc3")
            watcher.ensure()
        finally:
            watcher.stop()

    run(body)
    assert caplog.text.count("inotify unavailable") == 1
    assert str(error.strerror) in caplog.text
    assert caplog.text.count("inotify works again") == 1
