"""A fake ``stc-smi`` for tests, the demo and e2e: prints the documented
formats for the NPUs in a JSON state file, which can be changed at any time
(each run reads it anew), and can be told per NPU to report a card off, a
DEAD cluster, a hot card, or to hang, crash, or print garbage or partial output.

As a program: ``python -m stc_npu_agent.testing.fake_stc_smi --state FILE
ARGS...`` (or ``FAKE_STC_SMI_STATE=FILE``); ``FakeStcSmi(directory)`` writes
an executable ``stc-smi`` script there that does just that, so the agent can
be pointed at it as its tool path. The state file::

    {"npus": {"0": {"status": "on", "clusters": ["WORK", "WORK", "WORK", "WORK"],
                    "temperature": 45, "alert": 85, "shutdown": 95,
                    "behaviour": "normal"}}}

``behaviour``: normal | hang (for HANG_SECONDS, unless killed) | crash (exit 1 with a
message) | abort (SIGABRT) | garbage | partial (stops after the card's status
line) | wrong-npu (answers for another NPU). An NPU not in the file is
"not found" (exit 1). Each run appends its arguments and ``@<monotonic time>``
to ``FILE.calls``, a query that answered ``end <arguments> @<time>``, and a
hanging run ``hang <pid> <helper pid>``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

STATE_ENV = "FAKE_STC_SMI_STATE"
HANG_SECONDS = 300
BEHAVIOURS = ("normal", "hang", "crash", "abort", "garbage", "partial", "wrong-npu")


def default_npu(index: int) -> dict[str, Any]:
    return {
        "status": "on",
        "clusters": ["WORK"] * 4,
        "temperature": 45,
        "alert": 85,
        "shutdown": 95,
        "behaviour": "normal",
        "name": "STCP920",
        "serial": f"01PSF6000017{index:04d}",
        "bus": f"0:{3 + index:02x}:00.0",
    }


def query(index: int, npu: dict[str, Any]) -> str:
    """``stc-smi -q -i N``: the layout the agent's parser documents."""
    lines = [
        f"NPU {index}",
        f"    Product Name        : {npu['name']}",
        f"    Serial Number       : {npu['serial']}",
        f"    BUS-ID              : {npu['bus']}",
        f"    Status              : {npu['status']}",
    ]
    if npu["status"] == "off":
        return "\n".join(lines) + "\n"
    lines += [
        "    Temperature",
        f"        Temperature         : {npu['temperature']} C",
        f"        AlertTemperature    : {npu['alert']} C",
        f"        ShutdownTemperature : {npu['shutdown']} C",
    ]
    for cluster, status in enumerate(npu["clusters"]):
        lines += [f"    Cluster {cluster}", f"        Status          : {status}"]
    return "\n".join(lines) + "\n"


def listing(npus: dict[str, dict[str, Any]]) -> str:
    """``stc-smi -l``: ``NPU: N`` then model, BUS-ID and serial."""
    out = []
    for key in sorted(npus, key=int):
        npu = npus[key]
        out += [f"NPU: {key}", f"{npu['name']}   BUS-ID: {npu['bus']} ({npu['serial']})"]
    return "\n".join(out) + "\n"


CSV_FIELDS: dict[str, Callable[[int, dict[str, Any]], str]] = {
    "index": lambda index, npu: str(index),
    "name": lambda index, npu: npu["name"],
    "serial": lambda index, npu: npu["serial"],
    "power.draw": lambda index, npu: "35.00 W",
    "temperature.npu": lambda index, npu: str(npu["temperature"]),
    "utilization.npu": lambda index, npu: "0 %",
    "memory.total": lambda index, npu: "16384 MiB",
    "memory.used": lambda index, npu: "0 MiB",
}


def csv(npus: dict[str, dict[str, Any]], fields: list[str]) -> str:
    """``--query-npu=a,b --format=csv``: a header line, one line per NPU."""
    unknown = [name for name in fields if name not in CSV_FIELDS]
    if unknown:
        raise SystemExit(f"stc-smi: unknown field {unknown[0]}")
    rows = [", ".join(fields)]
    for key in sorted(npus, key=int):
        rows.append(", ".join(CSV_FIELDS[name](int(key), npus[key]) for name in fields))
    return "\n".join(rows) + "\n"


_calls_path = ""


def record(line: str) -> None:
    """One line to the calls file (appends are atomic for short lines). Left
    out where it cannot be written: the fake may sit on a read-only mount
    (e.g. the agent's view of the host's HPE dir)."""
    try:
        with open(_calls_path, "a", encoding="utf-8") as calls:
            calls.write(line + "\n")
    except OSError:
        pass


def misbehave(behaviour: str, index: int, text: str) -> str:
    """The output (or the end) a behaviour asks for."""
    if behaviour == "hang":
        # With a helper process, as a real tool may have: both must be killed.
        # Both end on their own after HANG_SECONDS, so a test that fails
        # before the kill leaves nothing running for long.
        helper = subprocess.Popen(["sleep", str(HANG_SECONDS)])
        record(f"hang {os.getpid()} {helper.pid}")
        time.sleep(HANG_SECONDS)
        raise SystemExit(3)
    if behaviour == "crash":
        sys.stderr.write(f"stc-smi: failed to open /dev/stc{index}ctrl: Input/output error\n")
        raise SystemExit(1)
    if behaviour == "abort":
        os.kill(os.getpid(), signal.SIGABRT)
    if behaviour == "garbage":
        return "\x1b[31m??? STCML_ERROR_UNKNOWN 0xdeadbeef\n%%%%%%\n"
    if behaviour == "partial":
        return text[: text.index("Status") + len("Status              : on")] + "\n"
    if behaviour == "wrong-npu":
        return text.replace(f"NPU {index}", f"NPU {index + 1}", 1)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    state_path = os.environ.get(STATE_ENV)
    if args[:1] == ["--state"] and len(args) > 1:
        state_path, args = args[1], args[2:]
    if not state_path:
        sys.stderr.write(f"fake stc-smi: give --state FILE or {STATE_ENV}\n")
        return 2
    global _calls_path  # noqa: PLW0603 (one run, one file)
    _calls_path = f"{state_path}.calls"
    # When it read the state (CLOCK_MONOTONIC is one clock for every process
    # on the machine: the bench times from this reading to the kubelet).
    record(f"{' '.join(args)} @{time.monotonic():.6f}")
    npus = {key: {**default_npu(int(key)), **npu} for key, npu in load(Path(state_path)).items()}
    if args[:1] == ["-l"]:
        sys.stdout.write(listing(npus))
        return 0
    if len(args) == 2 and args[0].startswith("--query-npu=") and args[1] == "--format=csv":
        sys.stdout.write(csv(npus, args[0].split("=", 1)[1].split(",")))
        return 0
    if len(args) == 3 and args[:2] == ["-q", "-i"] and args[2].isdigit():
        npu = npus.get(args[2])
        if npu is None:
            sys.stderr.write(f"stc-smi: NPU {args[2]} not found\n")
            return 1
        index = int(args[2])
        sys.stdout.write(misbehave(npu["behaviour"], index, query(index, npu)))
        sys.stdout.flush()
        record(f"end {' '.join(args)} @{time.monotonic():.6f}")
        return 0
    sys.stderr.write(f"stc-smi: unsupported arguments: {' '.join(args)}\n")
    return 2


def load(path: Path) -> dict[str, dict[str, Any]]:
    document = json.loads(path.read_text(encoding="utf-8"))
    npus: dict[str, dict[str, Any]] = document["npus"]
    return npus


class FakeStcSmi:
    """An executable fake ``stc-smi`` in ``directory`` with its state file."""

    def __init__(self, directory: str | Path, npus: int = 4, python: str = sys.executable) -> None:
        """``python`` runs the fake (one with stc_npu_agent importable, e.g.
        the agent image's own, when the script is used inside it)."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "stc-smi"
        self.state_path = self.directory / "stc-smi.json"
        self._npus: dict[str, dict[str, Any]] = {str(index): {} for index in range(npus)}
        self._save()
        self.path.write_text(
            "#!/bin/sh\n"
            f"exec {python} -m stc_npu_agent.testing.fake_stc_smi "
            f"--state '{self.state_path}' \"$@\"\n",
            encoding="utf-8",
        )
        self.path.chmod(0o755)

    def set(self, index: int, **fields: Any) -> None:
        """Change NPU ``index`` (e.g. status="off", behaviour="hang"); the next
        run sees it."""
        behaviour = fields.get("behaviour", "normal")
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r} (known: {', '.join(BEHAVIOURS)})")
        self._npus.setdefault(str(index), {}).update(fields)
        self._save()

    def reset(self, index: int) -> None:
        """NPU ``index`` back to a healthy card."""
        self._npus[str(index)] = {}
        self._save()

    def remove(self, index: int) -> None:
        """The tool no longer knows NPU ``index``."""
        self._npus.pop(str(index), None)
        self._save()

    def calls(self) -> list[str]:
        try:
            text = Path(f"{self.state_path}.calls").read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return text.splitlines()

    def _save(self) -> None:
        # Atomic: a run reading the file mid-write would see half a state.
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"npus": self._npus}, indent=1), encoding="utf-8")
        temporary.replace(self.state_path)


if __name__ == "__main__":
    sys.exit(main())
