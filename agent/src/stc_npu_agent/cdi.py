"""The CDI spec sink: keeps the node's CDI spec file true to the inventory.

The spec itself is built in ``core/cdi.py``; this module only writes it.
- Atomically: a temp file in the same directory (a name the runtimes skip:
  they read only ``*.json`` and ``*.yaml``), fsync, rename, fsync of the
  directory. A runtime reading the dir sees the old spec or the new one,
  never half a file.
- At start (``/var/run`` is emptied on reboot), on every inventory change,
  and again whenever the file is gone or is not the one written last (the
  lifecycle's tick), so a removal by another agent's stop or by hand heals
  within a tick.
- An unwritable dir is one warning line (again only when the reason
  changes); the agent keeps serving, and while the file is missing Allocate
  answers DeviceSpecs alone when they are configured too (plugin.py).
- Removed on a clean stop, unless another agent of ours serves the node
  (during a rolling update the new agent's spec must stay) or, in mode dra,
  claims are still prepared: a container of their pods that restarts while
  the agent is away (an upgrade, a crash) has its CDI IDs resolved from the
  spec by the runtime then. (Device-plugin mode has no such record of what
  its answers handed out; the issue's rule stands there.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from stc_npu_agent.core.allocation import spec_file_name
from stc_npu_agent.core.cdi import build_spec
from stc_npu_agent.core.config import HpeConfig
from stc_npu_agent.core.devices import Inventory
from stc_npu_agent.files import atomic_write

log = logging.getLogger(__name__)

SPEC_MODE = 0o644  # the runtime reads it; nothing in it is secret

FileIdentity = tuple[int, int, int]  # inode, mtime, size


def _identity(path: Path) -> FileIdentity | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)


class CdiSpecSink:
    name = "cdi-spec"

    def __init__(
        self,
        spec_dir: Path,
        kind: str,
        hpe: HpeConfig,
        other_agent_serving: Callable[[], bool],
        prepared_claims: Callable[[], int],
    ) -> None:
        self.spec_dir = spec_dir
        self.kind = kind
        self.hpe = hpe
        self.path = spec_dir / spec_file_name(kind)
        self._temp = spec_dir / f".{self.path.name}.tmp"
        self._other_agent_serving = other_agent_serving
        self._prepared_claims = prepared_claims
        self._written: bytes | None = None
        self._written_identity: FileIdentity | None = None
        self._problem = ""
        self._skipped: tuple[str, ...] = ()
        self.writes = 0

    def update(self, inventory: Inventory) -> None:
        spec = build_spec(inventory, self.kind, self.hpe)
        if spec.skipped != self._skipped:
            self._skipped = spec.skipped
            for line in spec.skipped:
                log.warning("CDI spec leaves out %s", line)
        if not spec.device_names:
            # CDI refuses a spec without devices: no NPU with nodes, no file.
            self._remove("no NPU has device nodes")
            return
        content = (json.dumps(spec.document, indent=2) + "\n").encode()
        if content == self._written and _identity(self.path) == self._written_identity:
            return
        restored = content == self._written
        try:
            self._write(content)
        except OSError as error:
            self._report(f"cannot write the CDI spec {self.path}: {_reason(error)}")
            return
        self._report("")
        log.info(
            "%s CDI spec %s: cdiVersion %s, devices %s",
            "restored" if restored else "wrote",
            self.path,
            spec.document["cdiVersion"],
            ",".join(spec.device_names),
        )

    def stop(self) -> None:
        if not self.path.exists():
            return
        if self._other_agent_serving():
            log.info("left the CDI spec %s in place: another stc-npu agent serves", self.path)
            return
        claims = self._prepared_claims()
        if claims:
            log.info(
                "left the CDI spec %s in place: %d prepared DRA claim(s) name its devices",
                self.path,
                claims,
            )
            return
        self._remove("the agent stopped")

    def _write(self, content: bytes) -> None:
        atomic_write(self.path, content, SPEC_MODE, self._temp)
        self._written = content
        self._written_identity = _identity(self.path)
        self.writes += 1

    def _remove(self, why: str) -> None:
        self._written = None
        self._written_identity = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        except OSError as error:
            self._report(f"cannot remove the CDI spec {self.path}: {_reason(error)}")
            return
        log.info("removed the CDI spec %s: %s", self.path, why)

    def _report(self, problem: str) -> None:
        """Warn once per distinct problem (the tick retries every second)."""
        if problem and problem != self._problem:
            log.warning(
                "%s; until it is written no runtime can resolve our CDI names "
                "(Allocate answers DeviceSpecs alone if device-specs is configured too)",
                problem,
            )
        elif not problem and self._problem:
            log.info("the CDI spec %s is writable again", self.path)
        self._problem = problem


def _reason(error: OSError) -> str:
    return error.strerror or str(error)
