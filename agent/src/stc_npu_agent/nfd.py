"""The NFD sink: node labels through node-feature-discovery's local feature
file, so the agent labels its node without any access to the API server.

nfd-worker reads every file in its ``features.d`` directory, skipping
dot-files: the agent writes ``.<name>.tmp`` and renames it over the file, so
NFD never reads half a file. The file carries an expiry time (see
``core.nfd``) that the agent moves forward at half its life; if the agent
dies, NFD drops the labels once it passes. On a clean stop the file is
removed, unless another agent of ours serves the node (a rolling update).

What the node shows, read at each write:
- the driver version: ``<sys>/module/<driver>/version``, the kernel's file
  for a module that declares MODULE_VERSION (the driver the NPUs are bound
  to, ``stc`` by default); no label when the module has none.
- the HPE version: ``<HPE dir>/<nfd.hpeVersionFile>`` (default ``version``),
  in mapped mode only (where the agent sees the host's HPE). The vendor
  documents no such file: an assumption, hence configurable; no label when
  it is missing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from stc_npu_agent.core import nfd
from stc_npu_agent.core.config import Config
from stc_npu_agent.core.devices import Inventory
from stc_npu_agent.discovery import driver_version
from stc_npu_agent.files import atomic_write

log = logging.getLogger(__name__)

# A version file holds one short line; more is not a version.
MAX_VERSION_BYTES = 256


def read_version(path: Path) -> str | None:
    """The first line of ``path``, stripped; None when missing or unreadable."""
    try:
        with path.open("rb") as file:
            head = file.read(MAX_VERSION_BYTES)
    except OSError:
        return None
    text = head.decode("utf-8", "replace").strip().splitlines()
    return text[0].strip() if text else None


class NfdFeatureFile:
    name = "nfd"

    def __init__(
        self,
        config: Config,
        other_agent_serving: Callable[[], bool],
        *,
        sys_dir: Path,
        hpe_dir: Path | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(config.nfd.feature_file)
        self._temp = self.path.with_name(f".{self.path.name}.tmp")
        self._resource_name = config.resource_name
        self._models = dict(config.nfd.models)
        self._expiry = config.nfd.expiry_seconds
        self._sys_dir = sys_dir
        self._hpe_version_file = (
            hpe_dir / config.nfd.hpe_version_file
            if hpe_dir is not None and config.hpe.mode == "mapped"
            else None
        )
        self._other_agent_serving = other_agent_serving
        self._clock = clock
        # What was last written, and when it must be written again.
        self._inventory: Inventory | None = None
        self._labels: dict[str, str] = {}
        self._refresh_at = 0.0
        self._problem = ""

    def update(self, inventory: Inventory) -> None:
        """Rewrite the file when the inventory changed, its refresh is due, or
        it is gone (someone deleted it); otherwise a stat and no more."""
        now = self._clock()
        if inventory is self._inventory and now < self._refresh_at and self.path.exists():
            return
        labels = nfd.feature_labels(
            inventory, self._resource_name, self._models, self._versions(inventory)
        )
        content = nfd.feature_file(labels, datetime.fromtimestamp(now + self._expiry, UTC))
        try:
            self._write(content.encode())
        except OSError as error:
            self._report(f"cannot write the NFD feature file {self.path}: {_reason(error)}")
            return
        if labels != self._labels:
            log.info(
                "NFD labels in %s: %s",
                self.path,
                ", ".join(f"{key}={value}" for key, value in labels.items()),
            )
        if self._problem:
            log.info("NFD feature file %s written again", self.path)
            self._problem = ""
        self._inventory, self._labels = inventory, labels
        self._refresh_at = now + self._expiry / 2

    def stop(self) -> None:
        if self._other_agent_serving():
            log.info("NFD feature file %s left to the other agent serving this node", self.path)
            return
        for path in (self.path, self._temp):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        log.info("removed the NFD feature file %s", self.path)

    def _versions(self, inventory: Inventory) -> dict[str, str | None]:
        drivers = sorted({npu.pci.driver for npu in inventory.npus.values() if npu.pci.driver})
        module_version = next(
            (version for driver in drivers if (version := driver_version(self._sys_dir, driver))),
            None,
        )
        hpe_version = read_version(self._hpe_version_file) if self._hpe_version_file else None
        for what, version in (("driver", module_version), ("HPE", hpe_version)):
            if version is not None and not nfd.is_label_value(version):
                log.debug("%s version %r is no label value: not labelled", what, version)
        return {nfd.DRIVER_VERSION: module_version, nfd.HPE_VERSION: hpe_version}

    def _write(self, content: bytes) -> None:
        # NFD owns the features.d dir: a missing one is reported, not made.
        atomic_write(self.path, content, 0o644, self._temp, make_dir=False)

    def _report(self, problem: str) -> None:
        # Once per distinct problem: the tick retries every second.
        if problem != self._problem:
            log.warning("%s (retrying every second)", problem)
            self._problem = problem


def _reason(error: OSError) -> str:
    return error.strerror or str(error)
