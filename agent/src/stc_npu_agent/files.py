"""Atomic file writes: a reader sees the old content or the new, never half."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def atomic_write(
    path: Path, content: bytes, mode: int, temp: Path | None = None, *, make_dir: bool = True
) -> None:
    """Write ``content`` to ``path``: a temp file in the same dir (``temp``,
    default ``.<name>.tmp``), fsync, rename over ``path``, fsync of the dir.
    ``make_dir`` False leaves a missing dir to its owner (FileNotFoundError)."""
    temp = temp or path.with_name(f".{path.name}.tmp")
    if make_dir:
        path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, mode)  # whatever the umask made of it
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
