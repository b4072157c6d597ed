"""`make bench`: speed and footprint of the real agent process.

Runs ``python -m stc_npu_agent`` against the repo's kubelet emulator on a
simulated node, measures what operators care about (see bench/README.md),
prints a table (median, p90, max) and writes ``bench/results.json``.

``--quick`` runs every benchmark with a few repetitions (the smoke test in
``make test`` uses it); figures from it mean nothing. Timing never fails the
run: only a benchmark that cannot complete (the agent never registers, ...)
exits non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import resource
import select
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc

from stc_npu_agent.testing.dra import DraKubeletEmulator
from stc_npu_agent.testing.fake_stc_smi import FakeStcSmi
from stc_npu_agent.testing.fakeapi import FakeApiServer
from stc_npu_agent.testing.kubelet import Device, KubeletEmulator
from stc_npu_agent.testing.simnode import SimNode
from stc_npu_agent.v1beta1 import api_pb2, api_pb2_grpc

RESOURCE = "streamcomputing.com/npu"
Empty = api_pb2.Empty()
T = TypeVar("T")
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results.json"
MAIN_NPUS = 8  # two NUMA nodes of four: an 8-NPU Allocate takes them all
SCALE_NPUS = 64  # 384 device nodes
WAIT = 30.0  # generous: a noisy machine must not fail the run
PLUGIN_DOCKERFILE = BENCH_DIR.parent / "images" / "plugin" / "Dockerfile"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
DRA_DRIVER = "npu.streamcomputing.com"


def image_env() -> dict[str, str]:
    """Runtime tuning the plugin image sets (MALLOC_ARENA_MAX), read from its Dockerfile."""
    text = PLUGIN_DOCKERFILE.read_text()
    return dict(re.findall(r"\b(MALLOC_ARENA_MAX)=([0-9]+)", text))


# --- repetitions --------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    quick: bool
    restarts: int
    socket_deletes: int
    unplugs: int
    partial: int
    plugs: int
    allocates: int
    concurrent_per_caller: int
    preferred: int
    cold_starts: int
    scale_cold_starts: int
    churn_restarts: int
    churn_allocates: int
    idle_seconds: float
    storms: int
    storm_ops: int
    burst_adds: int
    import_runs: int
    probe_seconds: float
    probe_flips: int
    stale_restarts: int
    burst_trials: int
    burst_restarts: int
    reregistrations: int


FULL = Plan(
    quick=False,
    restarts=100,
    socket_deletes=50,
    unplugs=50,
    partial=50,
    plugs=SCALE_NPUS,
    allocates=2000,
    concurrent_per_caller=200,
    preferred=500,
    cold_starts=20,
    scale_cold_starts=5,
    churn_restarts=1000,
    churn_allocates=10_000,
    idle_seconds=60.0,
    storms=5,
    storm_ops=1000,
    burst_adds=3,
    import_runs=10,
    probe_seconds=30.0,
    probe_flips=20,
    stale_restarts=30,
    burst_trials=10,
    burst_restarts=30,
    reregistrations=50,
)
QUICK = Plan(
    quick=True,
    restarts=5,
    socket_deletes=3,
    unplugs=3,
    partial=3,
    plugs=4,
    allocates=50,
    concurrent_per_caller=5,
    preferred=20,
    cold_starts=2,
    scale_cold_starts=1,
    churn_restarts=10,
    churn_allocates=100,
    idle_seconds=2.0,
    storms=1,
    storm_ops=100,
    burst_adds=1,
    import_runs=2,
    probe_seconds=2.0,
    probe_flips=2,
    stale_restarts=2,
    burst_trials=1,
    burst_restarts=5,
    reregistrations=3,
)


# --- statistics and results ---------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Result:
    key: str
    title: str
    unit: str
    samples: list[float]
    target: str = ""
    # Which statistic the target is about, and its bound (None: no target).
    target_stat: str = "median"
    target_max: float | None = None
    target_min: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        values = self.samples
        stats: dict[str, Any] = {
            "title": self.title,
            "unit": self.unit,
            "n": len(values),
            "median": statistics.median(values) if values else None,
            "p90": percentile(values, 90) if values else None,
            "max": max(values) if values else None,
            "min": min(values) if values else None,
            "mean": statistics.fmean(values) if values else None,
            "target": self.target or None,
            "met": None,
            "extra": self.extra,
        }
        if self.target_max is not None and values:
            stats["met"] = bool(stats[self.target_stat] <= self.target_max)
        if self.target_min is not None and values:
            stats["met"] = bool(stats[self.target_stat] >= self.target_min)
        return stats


class Results:
    def __init__(self) -> None:
        self.items: list[Result] = []

    def add(self, result: Result) -> Result:
        self.items.append(result)
        print(f"  {_row(result.key, result.summary())}", flush=True)
        return result


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def _row(key: str, stats: Mapping[str, Any]) -> str:
    met = {True: "met", False: "MISSED", None: ""}[stats["met"]]
    return (
        f"{key:<34} {stats['n']:>6} {_fmt(stats['median']):>9} {_fmt(stats['p90']):>9} "
        f"{_fmt(stats['max']):>9} {stats['unit']:<6} {stats['target'] or '':<22} {met}"
    )


def print_table(results: Results) -> None:
    header = (
        f"{'benchmark':<34} {'n':>6} {'median':>9} {'p90':>9} {'max':>9} {'unit':<6} "
        f"{'target':<22} result"
    )
    print("\n" + header)
    print("-" * len(header))
    for result in results.items:
        print(_row(result.key, result.summary()))


# --- the machine -------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "kernel": platform.release(),
        "loadavg_start": list(os.getloadavg()),
    }


# --- the agent process -------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/status we report (VmRSS, RssAnon, ...)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "Threads"):
            fields[name] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    rest = text[text.rindex(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches summed over every thread."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


@dataclass
class AgentProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    started: float  # monotonic, right before Popen

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mb(self) -> float:
        return proc_status(self.pid)["VmRSS"] / 1024

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_agent(
    kubelet_dir: Path,
    node: SimNode,
    log_path: Path,
    log_level: str = "info",
    env: Mapping[str, str] | None = None,
    *,
    extra_args: Sequence[str] = (),
) -> AgentProcess:
    args = [
        sys.executable, "-m", "stc_npu_agent",
        "--kubelet-dir", str(kubelet_dir),
        "--dev-dir", str(node.dev_dir),
        "--sys-dir", str(node.sys_dir),
        "--log-level", log_level,
        *extra_args,
    ]  # fmt: skip
    with log_path.open("ab") as log_file:
        started = time.monotonic()
        process = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    return AgentProcess(process, log_path, started)


# --- observing the kubelet's side --------------------------------------------


def healthy(devices: Mapping[str, Device], ids: Sequence[str]) -> bool:
    return all(i in devices and devices[i].health == HEALTHY for i in ids)


def first_update(
    kubelet: KubeletEmulator, since: float, predicate: Callable[[Mapping[str, Device]], bool]
) -> float:
    """Receive time of the first ListAndWatch message at/after ``since`` that
    satisfies ``predicate`` (the caller waited for it to exist)."""
    for received, devices in kubelet.updates(RESOURCE):
        if received >= since and predicate(devices):
            return received
    raise RuntimeError("no ListAndWatch message matched (waited for one first)")


def wait_devices(
    kubelet: KubeletEmulator,
    predicate: Callable[[Mapping[str, Device]], bool],
    what: str,
    timeout: float = WAIT,
) -> None:
    kubelet.wait_until(lambda: predicate(kubelet.devices(RESOURCE)), timeout=timeout, what=what)


def endpoint_path(kubelet: KubeletEmulator) -> Path:
    registration = kubelet.wait_registered(RESOURCE, timeout=WAIT)
    return kubelet.plugin_dir / registration.endpoint


# --- gRPC client straight to the agent's socket ------------------------------


def allocate_request(ids: Sequence[str]) -> api_pb2.AllocateRequest:
    return api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=list(ids))]
    )


@contextlib.contextmanager
def plugin_stub(path: Path) -> Iterator[api_pb2_grpc.DevicePluginStub]:
    channel = grpc.insecure_channel(f"unix://{path}")
    try:
        yield api_pb2_grpc.DevicePluginStub(channel)
    finally:
        channel.close()


def time_calls(
    call: Callable[[], object], count: int, warmup: int = 20
) -> tuple[list[float], float]:
    """Latencies (ms) of ``count`` sequential calls, and calls per second."""
    for _ in range(warmup):
        call()
    latencies = []
    began = time.perf_counter()
    for _ in range(count):
        t = time.perf_counter()
        call()
        latencies.append((time.perf_counter() - t) * 1000)
    return latencies, count / (time.perf_counter() - began)


def cpu_per_call(
    agent: AgentProcess, calls: int, run: Callable[[], T]
) -> tuple[T, dict[str, float]]:
    """Run ``run`` (which makes ``calls`` calls); also return the CPU ms per
    call the agent and this client process spent meanwhile."""
    agent0, client0 = cpu_seconds(agent.pid), time.process_time()
    result = run()
    agent_cpu, client_cpu = cpu_seconds(agent.pid) - agent0, time.process_time() - client0
    return result, {
        "agent_cpu_ms_per_call": agent_cpu / calls * 1000,
        "client_cpu_ms_per_call": client_cpu / calls * 1000,
    }


async def _concurrent_allocates(
    path: Path, requests: Sequence[api_pb2.AllocateRequest], callers: int, per_caller: int
) -> tuple[list[float], float]:
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"unix://{path}") as channel:
        stub = api_pb2_grpc.DevicePluginStub(channel)
        for request in requests[:20]:
            await stub.Allocate(request)

        async def caller(k: int) -> None:
            for j in range(per_caller):
                request = requests[(k + j) % len(requests)]
                t = time.perf_counter()
                await stub.Allocate(request)
                latencies.append((time.perf_counter() - t) * 1000)

        began = time.perf_counter()
        await asyncio.gather(*(caller(k) for k in range(callers)))
        elapsed = time.perf_counter() - began
    return latencies, len(latencies) / elapsed


def _run_concurrent(
    path: Path, requests: Sequence[api_pb2.AllocateRequest], callers: int, per_caller: int
) -> tuple[list[float], float]:
    return asyncio.run(_concurrent_allocates(path, requests, callers, per_caller))


# --- the benchmarks -----------------------------------------------------------


class Bench:
    def __init__(
        self, plan: Plan, root: Path, results: Results, env: Mapping[str, str] | None = None
    ) -> None:
        self.plan = plan
        self.env = dict(env or {})
        self.root = root
        self.results = results
        self.agents: list[AgentProcess] = []
        self.kubelets: list[KubeletEmulator] = []

    def kubelet(self, name: str, registry: Path | None = None) -> KubeletEmulator:
        emulator = KubeletEmulator(self.root / name, version="1.32", plugin_registry_dir=registry)
        emulator.start()
        self.kubelets.append(emulator)
        return emulator

    def agent(
        self,
        kubelet: KubeletEmulator,
        node: SimNode,
        log_level: str = "info",
        extra_args: Sequence[str] = (),
    ) -> AgentProcess:
        name = f"agent-{len(self.agents)}.log"
        agent = start_agent(
            kubelet.plugin_dir, node, self.root / name, log_level, self.env, extra_args=extra_args
        )
        self.agents.append(agent)
        return agent

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        for kubelet in self.kubelets:
            kubelet.close()

    def add(self, result: Result) -> Result:
        return self.results.add(result)

    # -- main node: 8 NPUs -----------------------------------------------------

    def main_node(self) -> None:
        node = SimNode(self.root / "node-main")
        for index in range(MAIN_NPUS):
            node.add_npu(index, numa_node=index // 4)
        ids = [f"stc{i}" for i in range(MAIN_NPUS)]
        kubelet = self.kubelet("kubelet-main")
        agent = self.agent(kubelet, node)
        kubelet.wait_registered(RESOURCE, timeout=WAIT)
        wait_devices(kubelet, lambda d: healthy(d, ids), "8 NPUs healthy")
        time.sleep(1.0)  # let start-up work (first tick, imports of lazy paths) settle
        rss_start = proc_status(agent.pid)
        # RSS after each phase: tells a leak (steady slope) from warm-up (a step).
        marks = [("start", rss_start["VmRSS"] / 1024)]
        self.idle_cpu(agent)
        marks.append(("idle", agent.rss_mb()))
        self.restarts(kubelet)
        marks.append((f"{self.plan.restarts} restarts", agent.rss_mb()))
        self.socket_deleted(kubelet)
        marks.append(("socket deletes", agent.rss_mb()))
        self.unplug_replug(kubelet, node)
        self.partial_failure(kubelet, node)
        marks.append(("unplugs", agent.rss_mb()))
        self.allocate(kubelet, agent, ids, "info", marks)
        self.churn(kubelet, agent, ids, rss_start, marks)

    def idle_cpu(self, agent: AgentProcess) -> None:
        seconds = self.plan.idle_seconds
        cpu0, ctx0, rss0 = cpu_seconds(agent.pid), context_switches(agent.pid), agent.rss_mb()
        began = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - began
        cpu = cpu_seconds(agent.pid) - cpu0
        switches = context_switches(agent.pid) - ctx0
        self.add(
            Result(
                "idle_cpu_percent",
                f"CPU over {seconds:.0f} s idle, % of one core",
                "%",
                [cpu / elapsed * 100],
                target="<= 0.5 %",
                target_max=0.5,
                extra={
                    "seconds": elapsed,
                    "cpu_seconds": cpu,
                    "clock_tick_s": 1 / CLK_TCK,
                    "wakeups_per_s": switches / elapsed,
                    "threads": proc_status(agent.pid)["Threads"],
                    "rss_mb_before": rss0,
                    "rss_mb_after": agent.rss_mb(),
                },
            )
        )

    def _restart_once(self, kubelet: KubeletEmulator) -> tuple[float, float, float, float, float]:
        """One stop()+start(); (Register after start() began, start() cost,
        Register after start() returned, first list after start() began), ms."""
        count = len(kubelet.registrations)
        stopping = time.monotonic()
        kubelet.stop()
        before = time.monotonic()
        kubelet.start()
        after = time.monotonic()
        registration = kubelet.wait_registered(RESOURCE, after=count, timeout=WAIT)
        listed = first_update(kubelet, registration.received_at, lambda _: True)
        return (
            (registration.received_at - before) * 1000,
            (after - before) * 1000,
            (registration.received_at - after) * 1000,
            (listed - before) * 1000,
            (before - stopping) * 1000,
        )

    def restarts(self, kubelet: KubeletEmulator) -> None:
        register, start_cost, agent_share, listed, stop_cost = [], [], [], [], []
        threads_before = threading.active_count()
        for _ in range(self.plan.restarts):
            time.sleep(0.05)  # the agent's post-registration work settles
            a, b, c, d, e = self._restart_once(kubelet)
            stop_cost.append(e)
            register.append(a)
            start_cost.append(b)
            agent_share.append(c)
            listed.append(d)
        self.add(
            Result(
                "restart_to_register_ms",
                "kubelet restart -> Register received (from start() call)",
                "ms",
                register,
                target="median <= 50, p90 <= 150",
                target_max=50,
                extra={
                    "p90_target_ms": 150,
                    "p90_met": percentile(register, 90) <= 150,
                    "bench_threads_before": threads_before,
                    "bench_threads_after": threading.active_count(),
                },
            )
        )
        self.add(
            Result(
                "restart_p90_check_ms",
                "same samples, the p90 target",
                "ms",
                register,
                target="p90 <= 150",
                target_stat="p90",
                target_max=150,
            )
        )
        self.add(
            Result(
                "restart_emulator_start_ms",
                "emulator start() cost (kubelet side)",
                "ms",
                start_cost,
                extra={"stop_ms_median": statistics.median(stop_cost)},
            )
        )
        self.add(
            Result(
                "restart_agent_share_ms",
                "Register after start() returned (agent)",
                "ms",
                agent_share,
            )
        )
        self.add(Result("restart_to_list_ms", "kubelet restart -> first device list", "ms", listed))

    def registration_modes(self) -> None:
        """kubelet restart -> first device list of the new registration, with
        each registration strategy, on the same kind of 8-NPU node."""
        for mode in ("kubelet-socket", "plugin-watcher"):
            key = mode.replace("-", "_")
            node = SimNode(self.root / f"node-{key}")
            for index in range(MAIN_NPUS):
                node.add_npu(index, numa_node=index // 4)
            registry = self.root / f"registry-{key}"
            kubelet = self.kubelet(f"kubelet-{key}", registry)
            config = self.root / f"config-{key}.yaml"
            config.write_text(f"registration: {mode}\npluginRegistryDir: {registry}\n")
            self.agent(kubelet, node, extra_args=["--config", str(config)])
            kubelet.wait_registered(RESOURCE, timeout=WAIT)
            samples, new_sockets = [], 0
            for _ in range(self.plan.reregistrations):
                time.sleep(0.05)  # the agent's post-registration work settles
                count = len(kubelet.registrations)
                endpoint = kubelet.registrations[-1].endpoint
                kubelet.stop()
                before = time.monotonic()
                kubelet.start()
                registration = kubelet.wait_registered(RESOURCE, after=count, timeout=WAIT)
                listed = first_update(kubelet, registration.received_at, lambda _: True)
                samples.append((listed - before) * 1000)
                new_sockets += registration.endpoint != endpoint
            self.add(
                Result(
                    f"reregister_{key}_ms",
                    f"kubelet restart -> first device list, registration {mode}",
                    "ms",
                    samples,
                    extra={"new_plugin_sockets": new_sockets},
                )
            )

    def dra_mode(self) -> None:
        """The agent process in DRA mode: RSS once registered, the health
        stream's reaction to an unplug, and the NodePrepareResources round trip
        of a claim the stand-in API server does not have (refused after its
        read: the path without preparing devices)."""
        node = SimNode(self.root / "node-dra")
        for index in range(MAIN_NPUS):
            node.add_npu(index, numa_node=index // 4)
        registry = self.root / "dra-registry"
        config = self.root / "config-dra.yaml"
        config.write_text(
            f"mode: dra\npluginRegistryDir: {registry}\n"
            f"dra:\n  stateDir: {self.root / 'dra-state'}\n"
            f"cdi:\n  specDir: {self.root / 'dra-cdi'}\n"
        )
        api = FakeApiServer().start()
        api.add_node("node-a")
        kubelet = DraKubeletEmulator(registry)
        kubelet.start()
        try:
            name = f"agent-{len(self.agents)}.log"
            agent = start_agent(
                self.root / "dra-device-plugins",
                node,
                self.root / name,
                env=self.env,
                extra_args=[
                    "--config",
                    str(config),
                    "--node-name",
                    "node-a",
                    "--kube-api-server",
                    api.url,
                ],
            )
            self.agents.append(agent)
            kubelet.wait_registered(DRA_DRIVER, timeout=WAIT)
            time.sleep(1.0)  # start-up work settles, as for the device plugin's figure
            self.add(
                Result(
                    "dra_rss_after_start_mb",
                    "RSS in DRA mode after start (8 NPUs)",
                    "MB",
                    [agent.rss_mb()],
                )
            )

            def health_is(device: str, health: str) -> Callable[[], bool]:
                return lambda: kubelet.health(DRA_DRIVER).get(device, ("", ""))[0] == health

            unhealthy = []
            for round_ in range(self.plan.unplugs):
                index = round_ % MAIN_NPUS
                device = f"stc{index}"
                began = time.monotonic()
                node.unplug(index)
                kubelet.wait_until(
                    health_is(device, "UNHEALTHY"), timeout=WAIT, what=f"{device} unhealthy"
                )
                # When the message arrived (the emulator stamps it), as for ListAndWatch.
                received = next(
                    stamp
                    for stamp, devices in kubelet.health_updates
                    if stamp >= began and devices.get(("node-a", device), ("",))[0] == "UNHEALTHY"
                )
                unhealthy.append((received - began) * 1000)
                node.replug(index)
                kubelet.wait_until(
                    health_is(device, "HEALTHY"), timeout=WAIT, what=f"{device} healthy"
                )
            self.add(
                Result(
                    "dra_unplug_to_unhealthy_ms",
                    "DRA: unplug -> UNHEALTHY in the health stream",
                    "ms",
                    unhealthy,
                )
            )
            prepare = []
            for call in range(self.plan.allocates // 10 + 5):
                began = time.monotonic()
                answer = kubelet.prepare(DRA_DRIVER, [("bench", "c", f"uid-{call}")])
                prepare.append((time.monotonic() - began) * 1000)
                if not answer.claims[f"uid-{call}"].error:
                    raise RuntimeError("a claim the API server does not have was prepared")
            self.add(
                Result(
                    "dra_prepare_refused_ms",
                    "NodePrepareResources round trip, 1 claim (refused: not in the API)",
                    "ms",
                    prepare[5:],  # after 5 warm-up calls
                )
            )
            self.add(
                Result(
                    "dra_rss_end_mb",
                    "RSS in DRA mode at the end of the phase",
                    "MB",
                    [agent.rss_mb()],
                )
            )
        finally:
            kubelet.stop()
            api.close()

    def socket_deleted(self, kubelet: KubeletEmulator) -> None:
        samples = []
        for _ in range(self.plan.socket_deletes):
            time.sleep(0.05)
            registration = kubelet.wait_registered(RESOURCE, timeout=WAIT)
            count = len(kubelet.registrations)
            began = time.monotonic()
            (kubelet.plugin_dir / registration.endpoint).unlink()
            again = kubelet.wait_registered(RESOURCE, after=count, timeout=WAIT)
            samples.append((again.received_at - began) * 1000)
        self.add(
            Result(
                "socket_deleted_to_register_ms",
                "own socket deleted -> Register received",
                "ms",
                samples,
            )
        )

    def _health_change(
        self,
        kubelet: KubeletEmulator,
        act: Callable[[], None],
        npu: str,
        health: str,
    ) -> tuple[float, float]:
        """(ms until the kubelet saw ``npu`` as ``health``, ms the action took)."""
        began = time.monotonic()
        act()
        acted = time.monotonic()
        wait_devices(kubelet, lambda d: npu in d and d[npu].health == health, f"{npu} {health}")
        seen = first_update(kubelet, began, lambda d: npu in d and d[npu].health == health)
        return (seen - began) * 1000, (acted - began) * 1000

    def unplug_replug(self, kubelet: KubeletEmulator, node: SimNode) -> None:
        down, up, unplug_cost, replug_cost = [], [], [], []
        for k in range(self.plan.unplugs):
            index = k % MAX_ROTATE
            npu = f"stc{index}"
            time.sleep(0.02)
            latency, cost = self._health_change(
                kubelet, partial(node.unplug, index), npu, UNHEALTHY
            )
            down.append(latency)
            unplug_cost.append(cost)
            time.sleep(0.02)
            latency, cost = self._health_change(kubelet, partial(node.replug, index), npu, HEALTHY)
            up.append(latency)
            replug_cost.append(cost)
        self.add(
            Result(
                "unplug_to_unhealthy_ms",
                "NPU unplugged (6 nodes) -> Unhealthy listed",
                "ms",
                down,
                target="median <= 50",
                target_max=50,
                extra={"unplug_op_ms_median": statistics.median(unplug_cost)},
            )
        )
        self.add(
            Result(
                "replug_to_healthy_ms",
                "NPU replugged -> Healthy listed",
                "ms",
                up,
                target="<= 100 (max)",
                target_stat="max",
                target_max=100,
                extra={
                    "replug_op_ms_median": statistics.median(replug_cost),
                    "median_met": statistics.median(up) <= 100,
                },
            )
        )

    def partial_failure(self, kubelet: KubeletEmulator, node: SimNode) -> None:
        down, up = [], []
        for k in range(self.plan.partial):
            index = k % MAX_ROTATE
            name, npu = f"stc{index}c{k % 4}", f"stc{index}"
            time.sleep(0.02)
            down.append(
                self._health_change(kubelet, partial(node.remove_node, name), npu, UNHEALTHY)[0]
            )
            time.sleep(0.02)
            up.append(
                self._health_change(kubelet, partial(node.restore_node, name), npu, HEALTHY)[0]
            )
        self.add(
            Result(
                "node_removed_to_unhealthy_ms", "one device node removed -> Unhealthy", "ms", down
            )
        )
        self.add(Result("node_restored_to_healthy_ms", "device node restored -> Healthy", "ms", up))

    def allocate(
        self,
        kubelet: KubeletEmulator,
        agent: AgentProcess,
        ids: Sequence[str],
        log_level: str,
        marks: list[tuple[str, float]] | None = None,
    ) -> None:
        """Allocate latency from our own gRPC client on the agent's socket.

        Each series also records the CPU the agent and this client spent per
        call (/proc utime+stime; process_time), to show whose cost it is.
        """
        path = endpoint_path(kubelet)
        suffix = "" if log_level == "info" else f"_{log_level}"
        label = "" if log_level == "info" else f" (agent --log-level {log_level})"
        one = [allocate_request([i]) for i in ids]
        eight = [allocate_request(ids)]
        n = self.plan.allocates
        with plugin_stub(path) as stub:
            counter = iter(range(10**9))
            (floor, _), cpu_floor = cpu_per_call(
                agent, n, lambda: time_calls(lambda: stub.GetDevicePluginOptions(Empty), n)
            )
            (lat1, rate1), cpu1 = cpu_per_call(
                agent,
                n,
                lambda: time_calls(lambda: stub.Allocate(one[next(counter) % len(one)]), n),
            )
            (lat8, rate8), cpu8 = cpu_per_call(
                agent, n, lambda: time_calls(lambda: stub.Allocate(eight[0]), n)
            )
        if marks is not None:
            marks.append(("sequential Allocates", agent.rss_mb()))
        self.add(
            Result(
                f"rpc_floor_ms{suffix}",
                f"GetDevicePluginOptions (gRPC floor){label}",
                "ms",
                floor,
                extra={"calls_per_s": n / sum(floor) * 1000, **cpu_floor},
            )
        )
        self.add(
            Result(
                f"allocate_1_seq_ms{suffix}",
                f"Allocate 1 NPU, sequential{label}",
                "ms",
                lat1,
                target="median <= 1, p90 <= 3",
                target_max=1.0,
                extra={"calls_per_s": rate1, "p90_met": percentile(lat1, 90) <= 3, **cpu1},
            )
        )
        self.add(
            Result(
                f"allocate_8_seq_ms{suffix}",
                f"Allocate 8 NPUs, sequential{label}",
                "ms",
                lat8,
                extra={"calls_per_s": rate8, **cpu8},
            )
        )
        calls = 16 * self.plan.concurrent_per_caller
        for size, requests in (("1", one), ("8", eight)):
            concurrent = partial(
                _run_concurrent, path, requests, 16, self.plan.concurrent_per_caller
            )
            (latencies, rate), cpu = cpu_per_call(agent, calls, concurrent)
            if marks is not None:
                marks.append((f"16 callers x {size} NPU", agent.rss_mb()))
            self.add(
                Result(
                    f"allocate_{size}_c16_ms{suffix}",
                    f"Allocate {size} NPU(s), 16 concurrent callers{label}",
                    "ms",
                    latencies,
                    extra={"calls_per_s": rate, **cpu},
                )
            )
            if size == "1":
                self.add(
                    Result(
                        f"allocate_1_c16_throughput{suffix}",
                        f"Allocate 1 NPU throughput, 16 callers{label}",
                        "calls/s",
                        [rate],
                        target=">= 1000 calls/s",
                        target_min=1000,
                    )
                )

    def allocate_quiet(self, node_root: Path) -> None:
        """The same Allocate figures with --log-level warning (no line per call)."""
        node = SimNode(node_root)
        for index in range(MAIN_NPUS):
            node.add_npu(index, numa_node=index // 4)
        kubelet = self.kubelet("kubelet-quiet")
        agent = self.agent(kubelet, node, "warning")
        kubelet.wait_registered(RESOURCE, timeout=WAIT)
        self.allocate(kubelet, agent, [f"stc{i}" for i in range(MAIN_NPUS)], "warning")
        agent.stop()

    def churn(
        self,
        kubelet: KubeletEmulator,
        agent: AgentProcess,
        ids: Sequence[str],
        rss_start: Mapping[str, int],
        marks: list[tuple[str, float]],
    ) -> None:
        """RSS after 1000 restarts + 10 000 Allocates in all (earlier ones count)."""
        restarts_done = self.plan.restarts
        allocates_per_restart = max(1, self.plan.churn_allocates // self.plan.churn_restarts)
        timeline: list[tuple[int, float]] = [(0, rss_start["VmRSS"] / 1024)]
        allocated = 0
        step = max(1, self.plan.churn_restarts // 10)
        while restarts_done < self.plan.churn_restarts:
            self._restart_once(kubelet)
            restarts_done += 1
            with plugin_stub(endpoint_path(kubelet)) as stub:
                for k in range(allocates_per_restart):
                    stub.Allocate(allocate_request([ids[(allocated + k) % len(ids)]]))
            allocated += allocates_per_restart
            if restarts_done % step == 0:
                timeline.append((restarts_done, agent.rss_mb()))
        # Allocates from the latency benchmarks count toward the 10 000.
        earlier = 3 * (self.plan.allocates + 20) + 2 * 16 * self.plan.concurrent_per_caller
        remaining = max(0, self.plan.churn_allocates - allocated - earlier)
        with plugin_stub(endpoint_path(kubelet)) as stub:
            for k in range(remaining):
                stub.Allocate(allocate_request([ids[k % len(ids)]]))
        time.sleep(1.0)
        after = proc_status(agent.pid)
        timeline.append((restarts_done, after["VmRSS"] / 1024))
        self.add(
            Result(
                "rss_after_start_mb",
                "RSS after start (8 NPUs, registered)",
                "MB",
                [rss_start["VmRSS"] / 1024],
                target="<= 45 MB",
                target_max=45,
                extra={k: v / 1024 for k, v in rss_start.items() if k != "Threads"},
            )
        )
        growth = (after["VmRSS"] - rss_start["VmRSS"]) / 1024
        mid = timeline[len(timeline) // 2][1] if len(timeline) > 2 else timeline[0][1]
        self.add(
            Result(
                "rss_growth_mb",
                f"RSS growth after {restarts_done} restarts + "
                f"{allocated + remaining + earlier} Allocates",
                "MB",
                [growth],
                target="<= 2 MB",
                target_max=2,
                extra={
                    "rss_after_mb": after["VmRSS"] / 1024,
                    "rss_anon_after_mb": after["RssAnon"] / 1024,
                    "second_half_growth_mb": after["VmRSS"] / 1024 - mid,
                    "threads_after": after["Threads"],
                    "restarts": restarts_done,
                    "allocates": allocated + remaining + earlier,
                    "timeline_restarts_rss_mb": timeline,
                    "rss_mb_after_phase": marks,
                    "growth_after_warmup_mb": after["VmRSS"] / 1024 - marks[-1][1],
                },
            )
        )

    # -- cold start ---------------------------------------------------------------

    def cold_start(self) -> None:
        node = SimNode(self.root / "node-cold")
        for index in range(MAIN_NPUS):
            node.add_npu(index, numa_node=index // 4)
        kubelet = self.kubelet("kubelet-cold")
        register, listed, rss = [], [], []
        for _ in range(self.plan.cold_starts):
            count = len(kubelet.registrations)
            agent = self.agent(kubelet, node)
            registration = kubelet.wait_registered(RESOURCE, after=count, timeout=WAIT)
            seen = first_update(kubelet, registration.received_at, lambda _: True)
            register.append((registration.received_at - agent.started) * 1000)
            listed.append((seen - agent.started) * 1000)
            time.sleep(0.5)
            rss.append(agent.rss_mb())
            agent.stop()
        self.add(
            Result(
                "cold_start_to_register_ms",
                "process start -> first Register",
                "ms",
                register,
                target="<= 1500 (max)",
                target_stat="max",
                target_max=1500,
            )
        )
        self.add(
            Result("cold_start_to_list_ms", "process start -> first device list", "ms", listed)
        )
        self.add(
            Result(
                "rss_after_cold_start_mb",
                "RSS 0.5 s after registering (each start)",
                "MB",
                rss,
                target="<= 45 MB (max)",
                target_stat="max",
                target_max=45,
            )
        )
        self.interpreter_costs()

    def interpreter_costs(self) -> None:
        """What bounds the cold start: the bare interpreter, and the imports."""

        def run(code: str) -> float:
            began = time.monotonic()
            subprocess.run([sys.executable, "-c", code], check=True)
            return (time.monotonic() - began) * 1000

        bare = [run("pass") for _ in range(self.plan.import_runs)]
        imports = [
            run("import stc_npu_agent.cli, stc_npu_agent.agent")
            for _ in range(self.plan.import_runs)
        ]
        grpc_only = [run("import grpc, grpc.aio") for _ in range(self.plan.import_runs)]
        self.add(Result("python_bare_start_ms", "python -c pass", "ms", bare))
        self.add(
            Result("python_grpc_import_ms", "python -c 'import grpc, grpc.aio'", "ms", grpc_only)
        )
        self.add(
            Result(
                "python_agent_import_ms", "python -c 'import stc_npu_agent.agent'", "ms", imports
            )
        )

    # -- scale: 64 NPUs -------------------------------------------------------------

    def plug_new(self) -> None:
        """New NPUs plugged one at a time into a running agent's node."""
        node = SimNode(self.root / "node-plug")
        kubelet = self.kubelet("kubelet-plug")
        self.agent(kubelet, node)
        kubelet.wait_registered(RESOURCE, timeout=WAIT)
        samples, costs = [], []
        for index in range(self.plan.plugs):
            npu = f"stc{index}"
            time.sleep(0.02)
            latency, cost = self._health_change(
                kubelet, partial(node.add_npu, index, numa_node=index % 2), npu, HEALTHY
            )
            samples.append(latency)
            costs.append(cost)
        self.add(
            Result(
                "new_npu_to_advertised_ms",
                "new NPU plugged -> advertised Healthy",
                "ms",
                samples,
                extra={
                    "plug_op_ms_median": statistics.median(costs),
                    "list_size_at_end": self.plan.plugs,
                },
            )
        )

    def scale(self) -> None:
        all_ids = [f"stc{i}" for i in range(SCALE_NPUS)]
        advertise, after_last, messages, plug_ops = [], [], [], []
        kubelet: KubeletEmulator | None = None
        node: SimNode | None = None
        agent: AgentProcess | None = None
        for rep in range(self.plan.burst_adds):
            if agent is not None:
                agent.stop()
            node = SimNode(self.root / f"node-scale-{rep}")
            kubelet = self.kubelet(f"kubelet-scale-{rep}")
            agent = self.agent(kubelet, node)
            kubelet.wait_registered(RESOURCE, timeout=WAIT)
            time.sleep(0.2)
            before = len(kubelet.updates(RESOURCE))
            began = time.monotonic()
            last = began
            for index in range(SCALE_NPUS):
                last = time.monotonic()
                node.add_npu(index, numa_node=index // 16)
            plug_ops.append((time.monotonic() - began) * 1000)
            wait_devices(kubelet, lambda d: healthy(d, all_ids), "64 NPUs healthy")
            seen = first_update(kubelet, began, lambda d: healthy(d, all_ids))
            advertise.append((seen - began) * 1000)
            after_last.append((seen - last) * 1000)
            messages.append(float(len(kubelet.updates(RESOURCE)) - before))
        assert kubelet is not None
        assert node is not None
        assert agent is not None
        devices = kubelet.devices(RESOURCE)
        size = list_size(devices)
        self.add(
            Result(
                "scale_add_64_to_advertised_ms",
                "64 NPUs plugged (384 nodes) -> all advertised, from first plug",
                "ms",
                advertise,
                extra={
                    "list_bytes": size,
                    "devices": len(devices),
                    "device_nodes": 6 * SCALE_NPUS,
                    "plug_ops_ms": plug_ops,
                },
            )
        )
        self.add(
            Result("scale_after_last_plug_ms", "same, from the last plug's start", "ms", after_last)
        )
        self.add(
            Result(
                "scale_list_messages", "ListAndWatch messages for the 64 plugs", "msgs", messages
            )
        )
        self.add(
            Result(
                "scale_list_bytes",
                "ListAndWatch message, 64 NPUs with NUMA",
                "bytes",
                [float(size)],
                extra={
                    "bytes_8_npus": list_size(
                        {k: v for k, v in devices.items() if k in all_ids[:8]}
                    )
                },
            )
        )
        self.add(
            Result("scale_rss_mb", "RSS with 64 NPUs (after the plugs)", "MB", [agent.rss_mb()])
        )
        self.storm(kubelet, node, agent)
        self.preferred(kubelet, all_ids)
        agent.stop()
        self.scale_cold_start(node)

    def storm(self, kubelet: KubeletEmulator, node: SimNode, agent: AgentProcess) -> None:
        rng = random.Random(5)  # noqa: S311  (a reproducible storm, not a secret)
        all_ids = [f"stc{i}" for i in range(SCALE_NPUS)]
        names = [name for index in range(SCALE_NPUS) for name in node.node_names(index)]
        converge, ops_ms, messages, cpu = [], [], [], []
        for _ in range(self.plan.storms):
            removed: set[str] = set()
            before = len(kubelet.updates(RESOURCE))
            cpu0 = cpu_seconds(agent.pid)
            began = time.monotonic()
            for _ in range(self.plan.storm_ops):
                name = rng.choice(names)
                if name in removed:
                    node.restore_node(name)
                    removed.discard(name)
                else:
                    node.remove_node(name)
                    removed.add(name)
            done = time.monotonic()
            truth = {
                f"stc{index}": HEALTHY
                if not removed.intersection(node.node_names(index))
                else UNHEALTHY
                for index in range(SCALE_NPUS)
            }

            def matches(devices: Mapping[str, Device], want: Mapping[str, str] = truth) -> bool:
                return all(k in devices and devices[k].health == v for k, v in want.items())

            wait_devices(kubelet, matches, "storm converged")
            # The first message that matches the truth and is not contradicted
            # by a later one (the list is final from then on).
            history = [(t, d) for t, d in kubelet.updates(RESOURCE) if t >= began]
            final_from = history[-1][0]
            for received, devices in reversed(history):
                if not matches(devices):
                    break
                final_from = received
            converge.append(max(0.0, (final_from - done) * 1000))
            ops_ms.append((done - began) * 1000)
            messages.append(float(len(kubelet.updates(RESOURCE)) - before))
            cpu.append(cpu_seconds(agent.pid) - cpu0)
            for name in sorted(removed):
                node.restore_node(name)
            wait_devices(kubelet, partial(healthy, ids=all_ids), "storm undone")
        self.add(
            Result(
                "storm_converged_after_last_op_ms",
                f"{self.plan.storm_ops} node add/removes on 64 NPUs -> true list, from the last op",
                "ms",
                converge,
                extra={
                    "storm_duration_ms_median": statistics.median(ops_ms),
                    "list_messages_median": statistics.median(messages),
                    "agent_cpu_s_median": statistics.median(cpu),
                },
            )
        )

    def preferred(self, kubelet: KubeletEmulator, ids: Sequence[str]) -> None:
        path = endpoint_path(kubelet)
        shuffled = list(ids)
        random.Random(7).shuffle(shuffled)  # noqa: S311
        with plugin_stub(path) as stub:
            for size in (1, 8, 32):
                request = api_pb2.PreferredAllocationRequest(
                    container_requests=[
                        api_pb2.ContainerPreferredAllocationRequest(
                            available_deviceIDs=shuffled, allocation_size=size
                        )
                    ]
                )
                latencies, rate = time_calls(
                    partial(stub.GetPreferredAllocation, request), self.plan.preferred
                )
                self.add(
                    Result(
                        f"preferred_64_size{size}_ms",
                        f"GetPreferredAllocation {size} of 64",
                        "ms",
                        latencies,
                        extra={"calls_per_s": rate},
                    )
                )
            eight = allocate_request(ids[:8])
            latencies, rate = time_calls(lambda: stub.Allocate(eight), self.plan.preferred)
            self.add(
                Result(
                    "allocate_8_of_64_seq_ms",
                    "Allocate 8 NPUs on a 64-NPU node",
                    "ms",
                    latencies,
                    extra={"calls_per_s": rate},
                )
            )

    def scale_cold_start(self, node: SimNode) -> None:
        kubelet = self.kubelet("kubelet-scale-cold")
        all_ids = [f"stc{i}" for i in range(SCALE_NPUS)]
        listed, rss = [], []
        for _ in range(self.plan.scale_cold_starts):
            count = len(kubelet.registrations)
            agent = self.agent(kubelet, node)
            registration = kubelet.wait_registered(RESOURCE, after=count, timeout=WAIT)
            seen = first_update(kubelet, registration.received_at, lambda d: healthy(d, all_ids))
            listed.append((seen - agent.started) * 1000)
            time.sleep(0.5)
            rss.append(agent.rss_mb())
            agent.stop()
        self.add(
            Result(
                "scale_cold_start_to_list_ms", "64 NPUs: process start -> full list", "ms", listed
            )
        )
        self.add(Result("scale_rss_after_start_mb", "64 NPUs: RSS after start", "MB", rss))

    # -- re-registration after kubelet restarts (stale kubelet.sock) ----------

    def reregister(self) -> None:
        """Kubelet restarts as a real kubelet does them: the stopped kubelet's
        kubelet.sock stays behind (stale, refusing connections) while it is
        down, so the agent's attempts are refused and back off meanwhile."""
        node = SimNode(self.root / "node-reregister")
        for index in range(MAIN_NPUS):
            node.add_npu(index, numa_node=index // 4)
        kubelet = self.kubelet("kubelet-reregister")
        agent = self.agent(kubelet, node)
        kubelet.wait_registered(RESOURCE, timeout=WAIT)
        rng = random.Random(11)  # noqa: S311  (a reproducible schedule)
        self.stale_socket_restarts(kubelet, agent, rng)
        self.restart_bursts(kubelet, rng)
        agent.stop()

    def stale_socket_restarts(
        self, kubelet: KubeletEmulator, agent: AgentProcess, rng: random.Random
    ) -> None:
        latencies, refused = [], []
        for _ in range(self.plan.stale_restarts):
            time.sleep(0.05)
            count = len(kubelet.registrations)
            failed_before = agent.log_path.read_text().count("registration failed")
            kubelet.stop()
            time.sleep(rng.uniform(0.2, 1.5))  # down: attempts refused, backoff grows
            began = time.monotonic()
            kubelet.start()
            registration = kubelet.wait_registered(RESOURCE, after=count, timeout=WAIT)
            latencies.append((registration.received_at - began) * 1000)
            refused.append(agent.log_path.read_text().count("registration failed") - failed_before)
        self.add(
            Result(
                "stale_restart_to_register_ms",
                "kubelet restart, stale kubelet.sock while down (0.2-1.5 s) -> Register",
                "ms",
                latencies,
                target="<= 100 (max)",
                target_stat="max",
                target_max=100,
                extra={"refused_attempts_per_restart_median": statistics.median(refused)},
            )
        )

    def restart_bursts(self, kubelet: KubeletEmulator, rng: random.Random) -> None:
        latencies = []
        for _ in range(self.plan.burst_trials):
            time.sleep(0.2)
            began = 0.0
            count = 0
            for _ in range(self.plan.burst_restarts):
                kubelet.stop()
                time.sleep(rng.uniform(0, 0.01))
                count = len(kubelet.registrations)
                began = time.monotonic()
                kubelet.start()
                time.sleep(rng.uniform(0, 0.01))
            registration = kubelet.wait_registered(RESOURCE, after=count, timeout=WAIT)
            latencies.append((registration.received_at - began) * 1000)
        self.add(
            Result(
                "burst_last_restart_to_register_ms",
                f"{self.plan.burst_restarts} back-to-back restarts (gaps 0-10 ms) -> Register "
                "with the last kubelet",
                "ms",
                latencies,
                target="<= 150 (max)",
                target_stat="max",
                target_max=150,
            )
        )


# --- cost and exposure: a busy /dev, a flood of idle probe connections -------


@dataclass(frozen=True)
class ExposurePlan:
    noise_seconds: float  # agent CPU measured this long, without and with the noise
    noise_rate: int  # open+close per second of a node that is not an NPU
    noise_unplugs: int  # unplug -> Unhealthy samples while the noise goes on
    idle_connections: int  # held open to the probe port, never sending a byte
    healthz_calls: int  # /healthz answers timed, before and during the flood


EXPOSURE_FULL = ExposurePlan(
    noise_seconds=20.0, noise_rate=1000, noise_unplugs=20, idle_connections=1000, healthz_calls=50
)
EXPOSURE_QUICK = ExposurePlan(
    noise_seconds=1.0, noise_rate=1000, noise_unplugs=2, idle_connections=100, healthz_calls=5
)


def open_close_noise(path: Path, rate: int, stop: threading.Event, counter: list[int]) -> None:
    """Open and close ``path`` ``rate`` times a second (paced, catching up
    after a late wake-up) until ``stop``; the count goes to ``counter[0]``."""
    interval = 1 / rate
    next_at = time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if now < next_at:
            time.sleep(next_at - now)
        os.close(os.open(path, os.O_RDONLY))
        counter[0] += 1
        next_at += interval


def cpu_percent_over(agent: AgentProcess, seconds: float) -> tuple[float, float]:
    """(agent CPU % of one core, its context switches per second) over ``seconds``."""
    cpu0, ctx0, began = cpu_seconds(agent.pid), context_switches(agent.pid), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - began
    cpu, switches = cpu_seconds(agent.pid) - cpu0, context_switches(agent.pid) - ctx0
    return cpu / elapsed * 100, switches / elapsed


def dev_noise(bench: Bench, plan: ExposurePlan) -> None:
    """Agent CPU while a node in its /dev that is not an NPU (a /dev/null) is
    opened and closed ~1000 times a second, and unplug -> Unhealthy meanwhile."""
    node = SimNode(bench.root / "node-noise")
    for index in range(MAIN_NPUS):
        node.add_npu(index, numa_node=index // 4)
    null = node.dev_dir / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    kubelet = bench.kubelet("kubelet-noise")
    agent = bench.agent(kubelet, node)
    ids = [f"stc{i}" for i in range(MAIN_NPUS)]
    kubelet.wait_registered(RESOURCE, timeout=WAIT)
    wait_devices(kubelet, lambda d: healthy(d, ids), "8 NPUs healthy")
    time.sleep(1.0)
    quiet_cpu, quiet_wakeups = cpu_percent_over(agent, plan.noise_seconds)
    stop, counter = threading.Event(), [0]
    noise = threading.Thread(
        target=open_close_noise, args=(null, plan.noise_rate, stop, counter), daemon=True
    )
    began = time.monotonic()
    noise.start()
    try:
        noisy_cpu, noisy_wakeups = cpu_percent_over(agent, plan.noise_seconds)
        rate = counter[0] / (time.monotonic() - began)
        down = []
        for k in range(plan.noise_unplugs):
            index = k % MAIN_NPUS
            time.sleep(0.02)
            latency, _ = bench._health_change(
                kubelet, partial(node.unplug, index), f"stc{index}", UNHEALTHY
            )
            down.append(latency)
            node.replug(index)
            wait_devices(kubelet, lambda d: healthy(d, ids), "8 NPUs healthy again")
    finally:
        stop.set()
        noise.join(10)
    bench.add(
        Result(
            "dev_noise_cpu_percent",
            f"agent CPU, /dev/null opened+closed {plan.noise_rate}/s, % of a core",
            "%",
            [noisy_cpu],
            target="<= 1 %",
            target_max=1.0,
            extra={
                "seconds": plan.noise_seconds,
                "open_close_per_s": rate,
                "quiet_cpu_percent": quiet_cpu,
                "wakeups_per_s": noisy_wakeups,
                "quiet_wakeups_per_s": quiet_wakeups,
            },
        )
    )
    bench.add(
        Result(
            "dev_noise_unplug_to_unhealthy_ms",
            "unplug -> Unhealthy while /dev/null is opened+closed",
            "ms",
            down,
        )
    )


IDLE_BATCH = 4  # within any listen backlog (socketserver's is 5)


def healthz_ms(port: int) -> float:
    """One GET /healthz on a new connection, as the kubelet makes it; ms to the answer."""
    began = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as connection:
        connection.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := connection.recv(4096):
            answer += chunk
    elapsed = (time.perf_counter() - began) * 1000
    if not answer.startswith(b"HTTP/1.0 200"):
        raise RuntimeError(f"/healthz did not answer 200: {answer[:80]!r}")
    return elapsed


def open_idle_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` connections to the port that never send a byte. Made a few
    at a time, each few once the last are up: a burst beyond the server's
    listen backlog would leave most of them established on this side only
    (SYN cookies), never reaching the server at all."""
    held: list[socket.socket] = []
    while len(held) < count:
        deadline = time.monotonic() + WAIT
        batch = []
        for _ in range(min(IDLE_BATCH, count - len(held))):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            batch.append(sock)
        held += batch
        poller = select.poll()
        for sock in batch:
            poller.register(sock, select.POLLOUT)
        waiting = {sock.fileno() for sock in batch}
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"connection {len(held)} of {count} never connected")
            for fd, _ in poller.poll(1000):
                poller.unregister(fd)
                waiting.discard(fd)
        time.sleep(0.002)  # the server takes them in
    return held


def settled_status(pid: int) -> dict[str, int]:
    """``proc_status`` once the thread count held still for a second: the
    agent took in (or dropped) every connection it is going to."""
    status, since = proc_status(pid), time.monotonic()
    deadline = since + WAIT
    while time.monotonic() - since < 1.0 and time.monotonic() < deadline:
        time.sleep(0.1)
        now = proc_status(pid)
        if now["Threads"] != status["Threads"]:
            since = time.monotonic()
        status = now
    return status


def probe_flood(bench: Bench, plan: ExposurePlan) -> None:
    """Threads, RSS and /healthz latency of the agent while ``idle_connections``
    connections to its probe port sit idle (any pod on the node can do that)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Room for the flood in this process (the agent inherits it, so its own
    # fd limit is not what is measured).
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    node = SimNode(bench.root / "node-flood")
    for index in range(MAIN_NPUS):
        node.add_npu(index, numa_node=index // 4)
    kubelet = bench.kubelet("kubelet-flood")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    agent = bench.agent(kubelet, node, extra_args=["--probe-address", f"127.0.0.1:{port}"])
    kubelet.wait_registered(RESOURCE, timeout=WAIT)
    time.sleep(1.0)
    quiet = [healthz_ms(port) for _ in range(plan.healthz_calls)]
    before = proc_status(agent.pid)
    idle = open_idle_connections(port, plan.idle_connections)
    try:
        during = settled_status(agent.pid)
        flooded = [healthz_ms(port) for _ in range(plan.healthz_calls)]
        held_fds = len(os.listdir(f"/proc/{agent.pid}/fd"))
    finally:
        for sock in idle:
            sock.close()
    extra = {
        "idle_connections": plan.idle_connections,
        "threads_before": before["Threads"],
        "threads_during": during["Threads"],
        "rss_mb_before": before["VmRSS"] / 1024,
        "rss_mb_during": during["VmRSS"] / 1024,
        "agent_fds_during": held_fds,
        "healthz_ms_without_flood_median": statistics.median(quiet),
    }
    bench.add(
        Result(
            "probe_flood_threads",
            f"agent threads added by {plan.idle_connections} idle probe connections",
            "threads",
            [float(during["Threads"] - before["Threads"])],
            target="<= 10",
            target_max=10,
            extra=extra,
        )
    )
    bench.add(
        Result(
            "probe_flood_rss_mb",
            f"agent RSS added by {plan.idle_connections} idle probe connections",
            "MB",
            [(during["VmRSS"] - before["VmRSS"]) / 1024],
            target="<= 5 MB",
            target_max=5,
        )
    )
    bench.add(
        Result(
            "probe_flood_healthz_ms",
            f"/healthz on a new connection, {plan.idle_connections} idle ones held",
            "ms",
            flooded,
            target="< 100 (max)",
            target_stat="max",
            target_max=100,
        )
    )


# GET /metrics per scrape benchmark, full and quick.
SCRAPES_FULL = 500
SCRAPES_QUICK = 10
# Allocates before the scrapes, so the histograms hold what a busy node's do.
SCRAPE_ALLOCATES = 200


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get_metrics(port: int) -> bytes:
    """One GET /metrics on a new connection, as a scraper makes it; the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as connection:
        connection.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200"):
        raise RuntimeError(f"/metrics did not answer 200: {answer[:80]!r}")
    return body


def settled_rss_mb(kubelet: KubeletEmulator, agent: AgentProcess) -> float:
    """The agent's RSS 1 s after its first registration (as rss_after_start_mb)."""
    kubelet.wait_registered(RESOURCE, timeout=WAIT)
    time.sleep(1.0)
    return agent.rss_mb()


def scrape_cost(bench: Bench) -> None:
    """Latency and agent CPU of a /metrics scrape, and the RSS metrics add."""
    scrapes = SCRAPES_QUICK if bench.plan.quick else SCRAPES_FULL
    node = SimNode(bench.root / "node-scrape")
    for index in range(MAIN_NPUS):
        node.add_npu(index, numa_node=index // 4)
    config = bench.root / "metrics-config.yaml"
    config.write_text("metrics:\n  enabled: true\n")
    # The same node without metrics first, for the RSS they add.
    port = free_port()
    kubelet = bench.kubelet("kubelet-scrape-off")
    agent = bench.agent(kubelet, node, extra_args=["--probe-address", f"127.0.0.1:{port}"])
    rss_off = settled_rss_mb(kubelet, agent)
    agent.stop()
    kubelet.stop()
    port = free_port()
    kubelet = bench.kubelet("kubelet-scrape-on")
    agent = bench.agent(
        kubelet, node, extra_args=["--probe-address", f"127.0.0.1:{port}", "--config", str(config)]
    )
    rss_on = settled_rss_mb(kubelet, agent)
    with plugin_stub(endpoint_path(kubelet)) as stub:
        for call in range(SCRAPE_ALLOCATES):
            stub.Allocate(allocate_request([f"stc{call % MAIN_NPUS}"]), timeout=WAIT)
    body = get_metrics(port)
    cpu0 = cpu_seconds(agent.pid)
    latencies = []
    for _ in range(scrapes):
        began = time.perf_counter()
        get_metrics(port)
        latencies.append((time.perf_counter() - began) * 1000)
    cpu_ms = (cpu_seconds(agent.pid) - cpu0) * 1000 / scrapes
    samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    bench.add(
        Result(
            "scrape_ms",
            f"GET /metrics on a new connection (8 NPUs, after {SCRAPE_ALLOCATES} Allocates)",
            "ms",
            latencies,
            target="median <= 10",
            target_max=10,
            extra={"bytes": len(body), "samples": samples},
        )
    )
    bench.add(
        Result(
            "scrape_agent_cpu_ms",
            "agent CPU per scrape (/proc utime+stime over all scrapes)",
            "ms",
            [cpu_ms],
            target="<= 5",
            target_max=5,
        )
    )
    bench.add(
        Result(
            "metrics_rss_added_mb",
            "agent RSS with metrics.enabled, minus without (1 s after Register)",
            "MB",
            [rss_on - rss_off],
            target="<= 5 MB",
            target_max=5,
            extra={"rss_mb_metrics_off": rss_off, "rss_mb_metrics_on": rss_on},
        )
    )


def has_health(devices: Mapping[str, Device], *, npu: str, health: str) -> bool:
    return npu in devices and devices[npu].health == health


def query_runs(tool: FakeStcSmi, index: int | None = None) -> list[float]:
    """Start times (monotonic) of the fake stc-smi's -q runs (of NPU ``index``)."""
    runs = []
    for line in tool.calls():
        args, _, at = line.rpartition(" @")
        if args.startswith("-q -i ") and (index is None or args == f"-q -i {index}"):
            runs.append(float(at))
    return runs


def vendor_probe(bench: Bench) -> None:
    """The vendor probe with the fake stc-smi on an 8-NPU node, every second:
    the agent's own CPU per NPU probed, and the time from the run that reads
    a card off to the kubelet's Unhealthy listing (cardStatus thresholds 1,
    so the figure is the pipeline; each extra failThreshold reading adds one
    intervalSeconds)."""
    plan = bench.plan
    node = SimNode(bench.root / "node-probe")
    for index in range(MAIN_NPUS):
        node.add_npu(index, numa_node=index // 4)
    tool = FakeStcSmi(bench.root / "hpe-probe", npus=MAIN_NPUS)
    config = bench.root / "probe-config.yaml"
    probe = {"enabled": True, "tool": str(tool.path), "intervalSeconds": 1, "timeoutSeconds": 1}
    once = {"failThreshold": 1, "recoverThreshold": 1}
    config.write_text(
        json.dumps({"health": {"vendorProbe": probe, "signals": {"cardStatus": once}}})
    )
    kubelet = bench.kubelet("kubelet-probe")
    agent = bench.agent(kubelet, node, extra_args=["--config", str(config)])
    kubelet.wait_registered(RESOURCE, timeout=WAIT)
    time.sleep(2.0)  # past the first runs
    runs0, cpu0 = len(query_runs(tool)), cpu_seconds(agent.pid)
    time.sleep(plan.probe_seconds)
    runs, cpu = len(query_runs(tool)) - runs0, cpu_seconds(agent.pid) - cpu0
    bench.add(
        Result(
            "vendor_probe_agent_cpu_ms_per_npu",
            "agent CPU per NPU probed (its own process, not stc-smi's)",
            "ms",
            [cpu / max(runs, 1) * 1000],
            extra={"runs": runs, "seconds": plan.probe_seconds, "npus": MAIN_NPUS},
        )
    )
    from_reading, from_change = [], []
    for k in range(plan.probe_flips):
        index = k % MAIN_NPUS
        npu = f"stc{index}"
        began = time.monotonic()
        tool.set(index, status="off")
        off = partial(has_health, npu=npu, health=UNHEALTHY)
        wait_devices(kubelet, off, f"{npu} off")
        seen = first_update(kubelet, began, off)
        reading = min(t for t in query_runs(tool, index) if t >= began)
        from_reading.append((seen - reading) * 1000)
        from_change.append((seen - began) * 1000)
        tool.reset(index)
        wait_devices(kubelet, partial(has_health, npu=npu, health=HEALTHY), f"{npu} back")
    bench.add(
        Result(
            "vendor_probe_reading_to_unhealthy_ms",
            "stc-smi run that reads a card off -> Unhealthy listed",
            "ms",
            from_reading,
        )
    )
    bench.add(
        Result(
            "vendor_probe_card_off_to_unhealthy_ms",
            "card turns off -> Unhealthy listed (waits for the next run; interval 1 s)",
            "ms",
            from_change,
        )
    )


MAX_ROTATE = MAIN_NPUS
PHASES = (
    "main",
    "quiet",
    "cold",
    "plug",
    "scale",
    "reregister",
    "devnoise",
    "probeflood",
    "scrape",
    "vendorprobe",
    "registration",
    "dra",
)


def list_size(devices: Mapping[str, Device]) -> int:
    """Bytes of the ListAndWatchResponse carrying ``devices`` (what the agent sends)."""
    message = api_pb2.ListAndWatchResponse()
    for device in devices.values():
        pb = message.devices.add(ID=device.id, health=device.health)
        for numa in device.numa_nodes:
            pb.topology.nodes.add(ID=numa)
    return message.ByteSize()


# --- entry point ---------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke test)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON path")
    parser.add_argument(
        "--only",
        action="append",
        choices=PHASES,
        help="run only these phases (repeatable; default: all)",
    )
    parser.add_argument(
        "--agent-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the agent processes (e.g. MALLOC_ARENA_MAX=2)",
    )
    args = parser.parse_args(argv)
    # Measure the agent as the image runs it, then apply the extra settings.
    env = {**image_env(), **dict(item.split("=", 1) for item in args.agent_env)}
    phases = args.only or list(PHASES)
    plan = QUICK if args.quick else FULL
    exposure = EXPOSURE_QUICK if args.quick else EXPOSURE_FULL
    if os.geteuid() != 0:
        print("bench: needs root (the simulated node makes device nodes with mknod)")
        return 1
    info = machine()
    print(
        f"stc-npu bench ({'quick' if plan.quick else 'full'}): {info['nproc']} cores, "
        f"{info['cpu_model']}, Python {info['python']}, grpcio {info['grpcio']}",
        flush=True,
    )
    results = Results()
    root = Path(tempfile.mkdtemp(prefix="stc-npu-bench-"))
    bench = Bench(plan, root, results, env)
    began = time.monotonic()
    try:
        steps: dict[str, Callable[[], None]] = {
            "main": bench.main_node,
            "quiet": lambda: bench.allocate_quiet(root / "node-quiet"),
            "cold": bench.cold_start,
            "plug": bench.plug_new,
            "scale": bench.scale,
            "reregister": bench.reregister,
            "devnoise": lambda: dev_noise(bench, exposure),
            "probeflood": lambda: probe_flood(bench, exposure),
            "scrape": lambda: scrape_cost(bench),
            "vendorprobe": lambda: vendor_probe(bench),
            "registration": bench.registration_modes,
            "dra": bench.dra_mode,
        }
        for phase in phases:
            print(f"[{phase}]", flush=True)
            steps[phase]()
    finally:
        bench.close()
        shutil.rmtree(root, ignore_errors=True)
    info["loadavg_end"] = list(os.getloadavg())
    info["duration_s"] = time.monotonic() - began
    print_table(results)
    document = {
        "machine": info,
        "plan": plan.__dict__,
        "exposure_plan": exposure.__dict__,
        "phases": phases,
        "agent_env": env,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "benchmarks": {r.key: r.summary() for r in results.items},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"\nwrote {args.out} in {info['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
