"""Kubelet restarts in a row against the real agent process: every restart
ends with the agent registered with the full, correct list; nothing leaks.

Every stop leaves the stopped kubelet's ``kubelet.sock`` behind, stale
(refusing connections), as a real kubelet does. Kinds of restart, mixed at
random (seeded, so a failure replays):
- down 0-50 ms, started again right after the previous registration
  (back-to-back);
- down 0-300 ms (the agent's attempts are refused meanwhile);
- a burst of 3 restarts within a few ms (the agent may register with an
  intermediate kubelet or only with the last: the last must end registered);
- away for 2-4 s (the agent's attempts back off, then it registers);
- 1.26+ kubelet with the re-registration bug: own socket deleted while the
  kubelet stays up (the agent must end its old stream before registering).

The fast suite does 40 restarts (3 of them multi-second absences); the soak
(``make soak``) does 200 on 1.32 and 60 on 1.25, with 10 absences.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from stc_npu_agent.testing.kubelet import KubeletEmulator
from tests.agent.conftest import NUMA_OF, RESOURCE, AgentFactory

from .kit import Held, held, own_sockets, poll

EXPECTED = {f"stc{index}": (numa,) for index, numa in NUMA_OF.items()}
# fds/sockets/threads a settled agent may hold beyond its baseline: grpc's
# pollers and a channel being torn down; a leak per restart is far more.
SLACK = 3
WAIT = 30.0


@dataclass
class Figures:
    restarts: int = 0
    registrations: int = 0
    absences: int = 0
    bursts: int = 0
    longer_downs: int = 0
    baseline: Held | None = None
    final: Held | None = None
    seconds: float = 0.0


def assert_registered_fully(kubelet: KubeletEmulator, kubelet_dir: Path, after: int) -> int:
    """The current kubelet has our registration with the full list; returns
    how many registrations it saw."""
    registration = kubelet.wait_registered(RESOURCE, after=after, timeout=WAIT)
    kubelet.wait_until(
        lambda: kubelet.stream_open(RESOURCE) and kubelet.allocatable(RESOURCE) == len(EXPECTED),
        timeout=WAIT,
        what="registered with every NPU healthy",
    )
    devices = kubelet.devices(RESOURCE)
    assert {d.id: d.numa_nodes for d in devices.values()} == EXPECTED
    assert all(d.healthy for d in devices.values())
    # Old sockets are gone (ours, and the kubelet cleaned its dir on start).
    current = kubelet.registrations[-1].endpoint
    poll(lambda: own_sockets(kubelet_dir) == [current], timeout=WAIT, what="one own socket")
    assert registration.accepted
    return len(kubelet.registrations) - after


def restart_storm(
    kubelet: KubeletEmulator,
    kubelet_dir: Path,
    pid: int,
    *,
    restarts: int,
    absences: int,
    seed: int,
) -> Figures:
    rng = random.Random(seed)  # noqa: S311  (a replayable test schedule)
    figures = Figures()
    started = time.monotonic()
    assert_registered_fully(kubelet, kubelet_dir, 0)
    # Warm up (grpc makes some threads and fds lazily), then take the baseline.
    for _ in range(3):
        after = len(kubelet.registrations)
        kubelet.restart()
        assert_registered_fully(kubelet, kubelet_dir, after)
    poll(lambda: held(pid).threads > 0, what="agent alive")
    time.sleep(1.0)  # let the last teardown finish; not a timing assertion
    figures.baseline = held(pid)
    away_at = set(rng.sample(range(restarts), absences))
    done = 0
    while done < restarts:
        if done in away_at:
            kubelet.restart(down_for=rng.uniform(2.0, 4.0))
            figures.absences += 1
            done += 1
        else:
            kind = rng.choice(["quick", "quick", "longer", "burst"])
            # A burst must not jump over a planned absence.
            burst_fits = done + 3 <= restarts and not away_at & {done + 1, done + 2}
            if kind == "burst" and burst_fits:
                for _ in range(3):  # back-to-back, within milliseconds
                    kubelet.restart()
                figures.bursts += 1
                done += 3
            elif kind == "longer":
                kubelet.restart(down_for=rng.uniform(0, 0.3))
                figures.longer_downs += 1
                done += 1
            else:
                kubelet.restart(down_for=rng.uniform(0, 0.05))
                done += 1
        after = len(kubelet.registrations)
        # Registrations recorded before this point went to earlier kubelets;
        # the current one must get (at least) one that streams.
        figures.registrations += assert_registered_fully(kubelet, kubelet_dir, after)
        figures.restarts = done
    # Nothing leaked: the agent holds what it held before the storm.
    baseline = figures.baseline

    def settled() -> bool:
        figures.final = held(pid)
        return figures.final.within(baseline, SLACK)

    try:
        poll(settled, timeout=WAIT, what="fds, sockets and threads back to the baseline")
    except AssertionError:
        raise AssertionError(f"leak: baseline {baseline}, now {figures.final}") from None
    figures.seconds = time.monotonic() - started
    return figures


def report(name: str, figures: Figures) -> None:
    # Shown with -s / in the soak's output (make soak passes -s).
    print(
        f"\n{name}: {figures.restarts} restarts ({figures.absences} multi-second absences, "
        f"{figures.bursts} bursts of 3, {figures.longer_downs} down up to 300 ms), "
        f"{figures.registrations} registrations seen by the final kubelets, "
        f"held before {figures.baseline} after {figures.final}, {figures.seconds:.1f} s"
    )


def test_forty_kubelet_restarts(
    kubelet: KubeletEmulator, kubelet_dir: Path, start_agent: AgentFactory
) -> None:
    agent = start_agent()
    figures = restart_storm(
        kubelet, kubelet_dir, agent.process.pid, restarts=40, absences=3, seed=40
    )
    report("fast", figures)
    assert agent.process.poll() is None
    assert agent.terminate() == 0
    assert own_sockets(kubelet_dir) == []


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("version", "restarts"), [("1.32", 200), ("1.25", 60)])
def test_soak_kubelet_restarts(
    version: str, restarts: int, kubelet_dir: Path, start_agent: AgentFactory
) -> None:
    with KubeletEmulator(kubelet_dir, version=version) as kubelet:
        agent = start_agent()
        figures = restart_storm(
            kubelet, kubelet_dir, agent.process.pid, restarts=restarts, absences=10, seed=200
        )
        report(f"soak {version}", figures)
        assert agent.terminate() == 0
    assert own_sockets(kubelet_dir) == []


@pytest.mark.parametrize("deletions", [12])
def test_reregistration_bug_never_cuts_the_agent_off(
    deletions: int, kubelet_dir: Path, start_agent: AgentFactory
) -> None:
    """1.26+ with the late-close bug: the agent re-registers (own socket
    deleted, kubelet restarts) and is never cut off, because it ends its old
    stream before it registers anew."""
    with KubeletEmulator(kubelet_dir, version="1.32", reregistration_bug=True) as kubelet:
        agent = start_agent()
        assert_registered_fully(kubelet, kubelet_dir, 0)
        for round_ in range(deletions):
            after = len(kubelet.registrations)
            if round_ % 4 == 3:
                kubelet.restart()
            else:
                (kubelet_dir / kubelet.registrations[-1].endpoint).unlink()
            assert_registered_fully(kubelet, kubelet_dir, after)
        time.sleep(1.0)  # room for a late cut-off to show; not a timing assertion
        assert kubelet.cut_offs() == 0, kubelet.events()[-20:]
        assert kubelet.stream_open(RESOURCE)
        assert kubelet.allocatable(RESOURCE) == len(EXPECTED)
        assert kubelet.allocate(RESOURCE, ["stc0"]).devices
        assert "own socket" in agent.log()
        assert agent.terminate() == 0
