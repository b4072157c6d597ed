"""The vendor probe with the fake stc-smi: in process over a simulated node
(each run driven by hand), and through the real agent process and the
kubelet emulator."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from stc_npu_agent.core.config import SignalPolicy, VendorProbeConfig, parse_config
from stc_npu_agent.core.devices import DeviceRules
from stc_npu_agent.core.health import Transition
from stc_npu_agent.discovery import DeviceScanner
from stc_npu_agent.state import DeviceState, ProbeRun
from stc_npu_agent.testing.fake_stc_smi import FakeStcSmi
from stc_npu_agent.testing.kubelet import KubeletEmulator
from stc_npu_agent.testing.simnode import SimNode
from stc_npu_agent.vendor_probe import VendorProbe

from .conftest import RESOURCE, AgentFactory

WAIT = 60.0


@pytest.fixture
def tool(tmp_path: Path) -> FakeStcSmi:
    return FakeStcSmi(tmp_path / "hpe" / "bin", npus=4)


class Recorder:
    def __init__(self) -> None:
        self.transitions: list[Transition] = []
        self.runs: list[ProbeRun] = []

    def transition(self, change: Transition) -> None:
        self.transitions.append(change)

    def probe_run(self, run: ProbeRun) -> None:
        self.runs.append(run)


def probe_setup(node: SimNode, tool: FakeStcSmi, **probe: Any) -> tuple[DeviceState, VendorProbe]:
    config = parse_config({"health": {"vendorProbe": {"enabled": True, "tool": str(tool.path)}}})
    state = DeviceState(DeviceScanner(node.dev_dir, node.sys_dir, DeviceRules()), config.health)
    settings = {"enabled": True, "tool": str(tool.path), "timeout_seconds": 30.0, **probe}
    return state, VendorProbe(state, VendorProbeConfig(**settings))


def run(scenario: Callable[[], Any]) -> Any:
    async def main() -> Any:
        return await scenario()

    return asyncio.run(main())


def reason(state: DeviceState, npu_id: str) -> str:
    npu = state.inventory.get(npu_id)
    assert npu is not None
    return npu.reason


def test_card_off_turns_unhealthy_after_the_threshold_and_recovers(
    node: SimNode, tool: FakeStcSmi
) -> None:
    async def scenario() -> None:
        state, probe = probe_setup(node, tool)
        recorder = Recorder()
        state.observers.append(recorder)
        state.rescan()
        await probe.probe_all()
        assert state.inventory.healthy_ids() == {"stc0", "stc1", "stc2", "stc3"}
        tool.set(1, status="off")
        tool.set(2, clusters=["WORK", "WORK", "DEAD", "WORK"])
        await probe.probe_all()  # failThreshold 2: one bad reading is not enough
        assert state.inventory.healthy_ids() == {"stc0", "stc1", "stc2", "stc3"}
        assert reason(state, "stc1") == ""
        await probe.probe_all()
        assert state.inventory.healthy_ids() == {"stc0", "stc3"}
        assert reason(state, "stc1") == "cardStatus off"
        assert reason(state, "stc2") == "clusterStatus DEAD cluster 2"
        tool.reset(1)
        tool.reset(2)
        await probe.probe_all()  # recoverThreshold 2
        assert reason(state, "stc1") == "cardStatus on (1 of 2 good readings)"
        await probe.probe_all()
        assert state.inventory.healthy_ids() == {"stc0", "stc1", "stc2", "stc3"}
        # Each NPU's readings count when its own run ends, in whatever order.
        changes = [(t.npu, t.signal, t.old, t.new, t.value) for t in recorder.transitions]
        assert sorted(changes[:2]) == [
            ("stc1", "cardStatus", "ok", "bad", "off"),
            ("stc2", "clusterStatus", "ok", "bad", "DEAD cluster 2"),
        ]
        assert sorted(changes[2:]) == [
            ("stc1", "cardStatus", "bad", "ok", "on"),
            ("stc2", "clusterStatus", "bad", "ok", "4 WORK"),
        ]
        assert [(r.npus, r.ok) for r in recorder.runs] == [(4, True)] * 5
        assert all(r.duration > 0 for r in recorder.runs)

    run(scenario)


@pytest.mark.parametrize(
    ("behaviour", "said"),
    [
        ("crash", "exit 1: stc-smi: failed to open /dev/stc1ctrl: Input/output error"),
        ("abort", "killed by signal 6"),
        ("garbage", "unusable output: line 1: not printable text"),
        ("partial", "unusable output: missing cluster 0"),
        ("wrong-npu", "unusable output: answered for NPU 2, asked for NPU 1"),
    ],
)
def test_a_failing_tool_is_probe_failed_never_healthy_and_recovers(
    node: SimNode, tool: FakeStcSmi, behaviour: str, said: str
) -> None:
    async def scenario() -> None:
        state, probe = probe_setup(node, tool)
        state.rescan()
        tool.set(1, behaviour=behaviour)
        for _ in range(3):  # probeFailed: failThreshold 3
            run = await probe.probe_all()
            assert run.failed == ("stc1",)
        assert "stc1" not in state.inventory.healthy_ids()
        assert said in reason(state, "stc1")
        assert reason(state, "stc1").startswith("probeFailed ")
        tool.reset(1)
        await probe.probe_all()  # recoverThreshold 1
        assert state.inventory.healthy_ids() == {"stc0", "stc1", "stc2", "stc3"}
        assert state.last_good_probe is state.last_probe

    run(scenario)


def process_gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # killed, not yet reaped by its new parent


def test_a_hanging_tool_is_killed_with_its_helpers(node: SimNode, tool: FakeStcSmi) -> None:
    async def scenario() -> None:
        state, probe = probe_setup(node, tool, timeout_seconds=1.0)
        state.rescan()
        tool.set(3, behaviour="hang")
        result = await probe.probe_all()
        assert result.failed == ("stc3",)
        hung = [line.split() for line in tool.calls() if line.startswith("hang ")]
        assert len(hung) == 1
        _, leader, helper = hung[0]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while not (process_gone(int(leader)) and process_gone(int(helper))):
            assert loop.time() < deadline, "the hung stc-smi or its helper is still running"
            await asyncio.sleep(0.05)
        npu = state.inventory.get("stc3")
        assert npu is not None
        assert npu.signals["probeFailed"].value.endswith("no answer within 1 s (killed)")

    run(scenario)


def test_a_hung_npu_does_not_hold_back_the_others_readings(node: SimNode, tool: FakeStcSmi) -> None:
    """Each NPU's readings count as soon as its own stc-smi is done: a card
    that is off turns Unhealthy while another NPU's run still hangs (it used
    to wait for the whole run, i.e. for the hung run's timeout)."""

    async def scenario() -> None:
        state, probe = probe_setup(node, tool, timeout_seconds=300.0)
        state.policies = {**state.policies, "cardStatus": SignalPolicy(fail_threshold=1)}
        state.rescan()
        tool.set(0, behaviour="hang")
        tool.set(1, status="off")
        run = asyncio.create_task(probe.probe_all())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while "stc1" in state.inventory.healthy_ids():
            assert loop.time() < deadline, "stc1 waited for stc0's hung run"
            await asyncio.sleep(0.05)
        assert reason(state, "stc1") == "cardStatus off"
        assert not run.done()  # stc0's run still hangs
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run

    run(scenario)


def test_no_more_runs_at_once_than_the_concurrency(node: SimNode, tool: FakeStcSmi) -> None:
    async def scenario() -> None:
        state, probe = probe_setup(node, tool, concurrency=1)
        state.rescan()
        await probe.probe_all()

    run(scenario)
    starts: dict[str, float] = {}
    spans = []
    for line in tool.calls():
        args, _, at = line.rpartition(" @")
        if args.startswith("-q -i "):
            starts[args] = float(at)
        elif args.startswith("end -q -i "):
            spans.append((starts[args.removeprefix("end ")], float(at)))
    assert len(spans) == 4
    spans.sort()
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, "two stc-smi runs overlapped with concurrency 1"


def test_a_missing_tool_is_a_clear_probe_failure(node: SimNode, tool: FakeStcSmi) -> None:
    async def scenario() -> None:
        state, probe = probe_setup(node, tool)
        probe.config = VendorProbeConfig(enabled=True, tool="/nonexistent/stc-smi")
        state.rescan()
        await probe.probe_all()
        npu = state.inventory.get("stc0")
        assert npu is not None
        value = npu.signals["probeFailed"].value
        assert value == "/nonexistent/stc-smi -q -i 0: cannot run: No such file or directory"

    run(scenario)


def test_a_broken_observer_does_not_stop_health(node: SimNode, tool: FakeStcSmi) -> None:
    class Broken(Recorder):
        def probe_run(self, run: ProbeRun) -> None:
            raise RuntimeError("observer bug")

    async def scenario() -> None:
        state, probe = probe_setup(node, tool)
        after = Recorder()
        state.observers += [Broken(), after]
        state.rescan()
        await probe.probe_all()
        assert len(after.runs) == 1

    run(scenario)


# --- the real agent process ---


def agent_config(tool: FakeStcSmi, **probe: object) -> dict[str, object]:
    return {
        "health": {
            "vendorProbe": {
                "enabled": True,
                "tool": str(tool.path),
                "intervalSeconds": 1,
                "timeoutSeconds": 1,
                **probe,
            },
            "signals": {"cardStatus": {"failThreshold": 1, "recoverThreshold": 1}},
        }
    }


def test_agent_card_off_turns_allocatable_down_and_back_up(
    kubelet: KubeletEmulator,
    start_agent: AgentFactory,
    tool: FakeStcSmi,
    unused_tcp_port: int,
) -> None:
    agent = start_agent(
        agent_config(tool), extra_args=["--probe-address", f"127.0.0.1:{unused_tcp_port}"]
    )
    kubelet.wait_registered(RESOURCE)
    kubelet.wait_until(lambda: kubelet.allocatable(RESOURCE) == 4, timeout=WAIT)
    tool.set(1, status="off")
    kubelet.wait_until(
        lambda: kubelet.devices(RESOURCE)["stc1"].health == "Unhealthy",
        timeout=WAIT,
        what="stc1 Unhealthy",
    )
    assert kubelet.allocatable(RESOURCE) == 3
    agent.wait_log("health stc1 cardStatus ok -> bad: off")

    def read_status() -> dict[str, Any]:
        url = f"http://127.0.0.1:{unused_tcp_port}/status"
        with urllib.request.urlopen(url, timeout=10) as reply:
            document: dict[str, Any] = json.load(reply)
            return document

    # A run's readings count as they come; the run itself is reported at its end.
    kubelet.wait_until(lambda: read_status()["vendorProbe"] is not None, timeout=WAIT, what="a run")
    status = read_status()
    stc1 = next(npu for npu in status["npus"] if npu["id"] == "stc1")
    assert stc1["reason"] == "cardStatus off"
    assert stc1["signals"]["cardStatus"]["state"] == "bad"
    assert status["vendorProbe"]["lastSuccessAt"] > 0
    tool.reset(1)
    kubelet.wait_until(
        lambda: kubelet.allocatable(RESOURCE) == 4, timeout=WAIT, what="stc1 Healthy again"
    )
    agent.wait_log("health stc1 cardStatus bad -> ok: on")


def test_agent_allocates_while_the_tool_hangs_and_stops_cleanly(
    kubelet: KubeletEmulator, start_agent: AgentFactory, tool: FakeStcSmi
) -> None:
    # A long timeout: the hung run is still running while Allocate is called.
    agent = start_agent(agent_config(tool, intervalSeconds=60, timeoutSeconds=60))
    tool.set(0, behaviour="hang")
    kubelet.wait_registered(RESOURCE)
    kubelet.wait_until(
        lambda: any(line.startswith("hang ") for line in tool.calls()),
        timeout=WAIT,
        what="the tool to hang",
    )
    response = kubelet.allocate(RESOURCE, ["stc0"], timeout=WAIT)
    assert len(response.devices) == 6
    hung = next(line.split() for line in tool.calls() if line.startswith("hang "))
    assert not process_gone(int(hung[1]))  # the Allocate did not wait for it
    assert agent.terminate() == 0
    # Stopping ends the run: the hung tool and its helper are killed.
    for pid in hung[1:]:
        kubelet.wait_until(partial(process_gone, int(pid)), timeout=WAIT, what=f"{pid} gone")


def test_diagnose_shows_each_npus_signals_and_the_probe(  # noqa: PLR0917  (fixtures)
    tmp_path: Path,
    node: SimNode,
    kubelet: KubeletEmulator,
    kubelet_dir: Path,
    start_agent: AgentFactory,
    tool: FakeStcSmi,
    unused_tcp_port: int,
) -> None:
    """A node with one card off and one DEAD cluster, as diagnose tells it."""
    address = f"127.0.0.1:{unused_tcp_port}"
    tool.set(1, status="off")
    tool.set(2, clusters=["WORK", "DEAD", "WORK", "WORK"])
    tool.set(3, temperature=90)
    config = agent_config(tool)
    config["health"]["signals"]["temperature"] = {"policy": "ignore", "failThreshold": 1}  # type: ignore[index]
    start_agent(config, extra_args=["--probe-address", address])
    kubelet.wait_registered(RESOURCE)
    kubelet.wait_until(
        lambda: kubelet.allocatable(RESOURCE) == 2, timeout=WAIT, what="stc1 and stc2 Unhealthy"
    )
    result = subprocess.run(
        [
            sys.executable, "-m", "stc_npu_agent", "diagnose",
            "--kubelet-dir", str(kubelet_dir),
            "--dev-dir", str(node.dev_dir),
            "--sys-dir", str(node.sys_dir),
            "--hpe-dir", str(tmp_path),
            "--probe-address", address,
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    print(result.stdout)  # shown when the test fails
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "  - stc1 is Unhealthy: cardStatus off" in lines
    assert "  - stc2 is Unhealthy: clusterStatus DEAD cluster 1" in lines
    assert not any(line.startswith("  - stc3") for line in lines)  # ignored
    assert any("temperature bad, ignored (90 C (alert 85 C))" in line for line in lines)
    assert any("cardStatus BAD (off)" in line for line in lines)
    assert any(line.startswith("vendor probe: last run ") for line in lines)
