"""The e2e transcript: each step with its duration, and the measured figures.

Lines go to stdout and are appended to a log file; figures are appended to a
JSON-lines file, so that the driver (run.py) can print every figure of the
run in one block at the end even though the tests run in a child process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# One clock for the whole run: the driver (run.py) exports its start time,
# so the lines of the pytest child continue its count.
START_ENV = "STC_E2E_T0"
_start = float(os.environ.get(START_ENV, time.time()))
_log_path: Path | None = None
_figures_path: Path | None = None


def configure(log_path: Path, figures_path: Path) -> None:
    """Where lines and figures go (the directories are created)."""
    global _log_path, _figures_path
    log_path.parent.mkdir(parents=True, exist_ok=True)
    figures_path.parent.mkdir(parents=True, exist_ok=True)
    _log_path, _figures_path = log_path, figures_path


def started_at() -> float:
    """The wall-clock time the transcript counts from."""
    return _start


def say(text: str) -> None:
    """One transcript line, stamped with the time since this process started."""
    line = f"[{time.time() - _start:7.1f}s] {text}"
    # sys.__stdout__: pytest's capture must not swallow the transcript.
    out = sys.__stdout__ or sys.stdout
    out.write(line + "\n")
    out.flush()
    if _log_path is not None:
        with _log_path.open("a") as log:
            log.write(line + "\n")


@contextmanager
def step(name: str) -> Iterator[None]:
    """A named step: its start, and its end with the duration (or FAILED)."""
    say(f"> {name}")
    started = time.monotonic()
    try:
        yield
    except BaseException as error:
        say(f"  FAILED {name} after {time.monotonic() - started:.1f} s: {error!r}"[:400])
        raise
    say(f"  ok {name} ({time.monotonic() - started:.1f} s)")


def figure(name: str, value: float, unit: str = "s", note: str = "") -> None:
    """A measured figure: printed now, and kept for the summary block."""
    say(f"  figure: {name} = {value:.2f} {unit}{f' ({note})' if note else ''}")
    if _figures_path is not None:
        record = {"name": name, "value": value, "unit": unit, "note": note}
        with _figures_path.open("a") as out:
            out.write(json.dumps(record) + "\n")


def read_figures(figures_path: Path) -> list[dict[str, object]]:
    """The figures recorded so far (none when the file does not exist)."""
    if not figures_path.exists():
        return []
    return [json.loads(line) for line in figures_path.read_text().splitlines() if line.strip()]
