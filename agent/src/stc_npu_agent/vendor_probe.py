"""The vendor probe: a health source that runs ``stc-smi -q -i N`` per NPU.

Off the event loop's critical path: each run is an asyncio subprocess (no
thread blocks, no Allocate, ListAndWatch or Register waits for it), at most
``concurrency`` at once, each with a timeout after which its whole process
group is killed (stc-smi may start helpers). A run that times out, exits
non-zero, cannot be started or prints what the parser refuses is a bad
``probeFailed`` reading of that NPU, never an exception out of the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

from stc_npu_agent.core.config import HealthConfig, VendorProbeConfig
from stc_npu_agent.core.health import PROBE_FAILED, Reading
from stc_npu_agent.core.stc_smi import ProbeOutputError, parse_query
from stc_npu_agent.state import DeviceState, ProbeRun

log = logging.getLogger(__name__)

# More output than any real answer: a tool that floods is cut off.
MAX_OUTPUT = 1 << 20
# How long a killed process group gets to be reaped.
REAP_SECONDS = 5.0


class VendorProbe:
    def __init__(self, state: DeviceState, config: VendorProbeConfig) -> None:
        self.state = state
        self.config = config
        self._slots = asyncio.Semaphore(config.concurrency)
        # The last problem logged per NPU: a failing tool says so once, not
        # every interval (the probeFailed transition has its own line).
        self._last_problem: dict[str, str] = {}
        self._environment = dict(os.environ)
        if config.library_path:
            self._environment["LD_LIBRARY_PATH"] = config.library_path

    async def run(self) -> None:
        """Probe every NPU each interval until cancelled."""
        log.info(
            "vendor probe: %s every %g s (timeout %g s)",
            self.config.tool,
            self.config.interval_seconds,
            self.config.timeout_seconds,
        )
        while True:
            started = time.monotonic()
            try:
                await self.probe_all()
            except Exception:  # a bug here must not end the probing for good
                log.exception("vendor probe run failed")
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, self.config.interval_seconds - elapsed))

    async def probe_all(self) -> ProbeRun:
        """One run over every NPU the inventory lists; each NPU's readings go
        to the state as soon as its stc-smi is done."""
        npus = [(npu.id, npu.index) for npu in self.state.inventory.ordered()]
        started = time.monotonic()
        problems = await asyncio.gather(*(self._probe_one(npu_id, index) for npu_id, index in npus))
        run = ProbeRun(
            finished_at=time.time(),
            duration=time.monotonic() - started,
            npus=len(npus),
            failed=tuple(
                npu_id for (npu_id, _), problem in zip(npus, problems, strict=True) if problem
            ),
        )
        self.state.probe_finished(run)
        return run

    async def _probe_one(self, npu_id: str, index: int) -> str:
        """Probe one NPU and hand its readings over; the problem ("" if none)."""
        readings, problem = await self._probe(index)
        if problem and self._last_problem.get(npu_id) != problem:
            log.warning("vendor probe of %s failed: %s", npu_id, problem)
        elif not problem and npu_id in self._last_problem:
            log.info("vendor probe of %s answers again", npu_id)
        if problem:
            self._last_problem[npu_id] = problem
        else:
            self._last_problem.pop(npu_id, None)
        self.state.probe_readings(npu_id, readings)
        return problem

    async def _probe(self, index: int) -> tuple[list[Reading], str]:
        """The readings of one NPU, and the problem ("" when it answered)."""
        async with self._slots:
            try:
                output = await self._stc_smi("-q", "-i", str(index))
                return parse_query(output, index, self.config.clusters), ""
            except ProbeError as error:
                problem = str(error)
            except ProbeOutputError as error:
                problem = f"{self.config.tool} -q -i {index}: unusable output: {error}"
        return [Reading(PROBE_FAILED, True, problem)], problem

    async def _stc_smi(self, *args: str) -> str:
        """stdout of one stc-smi run; ProbeError for anything but a clean exit."""
        command = f"{self.config.tool} {' '.join(args)}"
        try:
            process = await asyncio.create_subprocess_exec(
                self.config.tool,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group, to kill it whole
                env=self._environment,
            )
        except OSError as error:
            raise ProbeError(f"{command}: cannot run: {error.strerror or error}") from None
        try:
            stdout, stderr = await asyncio.wait_for(
                _read_all(process), timeout=self.config.timeout_seconds
            )
        except TimeoutError:
            await _kill(process)
            raise ProbeError(
                f"{command}: no answer within {self.config.timeout_seconds:g} s (killed)"
            ) from None
        except BaseException:  # cancelled (the agent stops): leave no process behind
            await _kill(process)
            raise
        if len(stdout) > MAX_OUTPUT or len(stderr) > MAX_OUTPUT:
            raise ProbeError(f"{command}: more than {MAX_OUTPUT} bytes of output (killed)")
        if process.returncode != 0:
            last = _last_line(stderr) or _last_line(stdout)
            code = process.returncode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
            raise ProbeError(f"{command}: {how}" + (f": {last}" if last else ""))
        return stdout.decode("utf-8", errors="replace")


def health_sources(state: DeviceState, health: HealthConfig) -> list[VendorProbe]:
    """The health sources the config asks for, beyond the device scan."""
    return [VendorProbe(state, health.vendor_probe)] if health.vendor_probe.enabled else []


class ProbeError(RuntimeError):
    """stc-smi did not answer (not started, timed out, failed); one line."""


async def _read_all(process: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    """Both outputs to their end (at most MAX_OUTPUT + 1 bytes each), then the exit."""
    if process.stdout is None or process.stderr is None:
        raise ProbeError("stc-smi started without pipes")
    stdout, stderr = await asyncio.gather(_capped(process.stdout), _capped(process.stderr))
    if len(stdout) > MAX_OUTPUT or len(stderr) > MAX_OUTPUT:
        await _kill(process)
    else:
        await process.wait()
    return stdout, stderr


async def _capped(stream: asyncio.StreamReader) -> bytes:
    data = bytearray()
    while len(data) <= MAX_OUTPUT:
        chunk = await stream.read(MAX_OUTPUT + 1 - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def _kill(process: asyncio.subprocess.Process) -> None:
    """Kill the run's whole process group and reap it."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), timeout=REAP_SECONDS)


def _last_line(data: bytes) -> str:
    lines = data.decode("utf-8", errors="replace").strip().splitlines()
    return lines[-1].strip()[:200] if lines else ""
