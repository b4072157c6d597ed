"""The agent's lifecycle in this process (its loop in the main thread, the
test in another), against the kubelet emulator: what a separate process
cannot show deterministically (a backoff made endless, a failing tick, which
thread runs what).

A backoff made endless (``BACKOFF_FIRST``) turns "retried at once" into a
condition a test can wait for: code that waits out its backoff never
registers within the generous deadline.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

import stc_npu_agent.agent as agent_module
import stc_npu_agent.probes as probes_module
from stc_npu_agent.agent import Agent
from stc_npu_agent.core.config import Config
from stc_npu_agent.probes import ProbeServer
from stc_npu_agent.testing.kubelet import KubeletEmulator
from stc_npu_agent.testing.simnode import SimNode

from .conftest import RESOURCE

WAIT = 20.0  # deadlines only, never asserted on
ENDLESS = 1000.0  # a backoff no test outlives


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def drive(agent: Agent, body: Callable[[], object]) -> None:
    """Run ``agent`` on an asyncio loop in this thread and ``body`` in another;
    stop the agent when ``body`` returns, then re-raise what it raised."""
    failure: list[BaseException] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def test_thread() -> None:
            try:
                body()
            except BaseException as error:  # re-raised below
                failure.append(error)
            finally:
                loop.call_soon_threadsafe(agent.stop)

        thread = threading.Thread(target=test_thread, name="test-body")
        thread.start()
        try:
            await agent.run()
        finally:
            agent.stop()
            await asyncio.to_thread(thread.join)

    asyncio.run(main())
    if failure:
        raise failure[0]


@pytest.fixture
def make_agent(kubelet_dir: Path, node: SimNode) -> Callable[[], Agent]:
    def make() -> Agent:
        return Agent(kubelet_dir, node.dev_dir, node.sys_dir, Config())

    return make


@pytest.fixture
def endless_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "BACKOFF_FIRST", ENDLESS)
    monkeypatch.setattr(agent_module, "BACKOFF_MAX", ENDLESS)


@pytest.fixture
def agent_log(caplog: pytest.LogCaptureFixture) -> Callable[[], list[logging.LogRecord]]:
    caplog.set_level(logging.INFO, logger="stc_npu_agent")
    return lambda: [r for r in caplog.records if r.name.startswith("stc_npu_agent")]


def failures(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.getMessage().startswith("registration failed")]


def logged_failures(records: Callable[[], list[logging.LogRecord]], count: int) -> bool:
    return len(failures(records())) >= count


@pytest.mark.usefixtures("endless_backoff")
def test_new_kubelet_socket_after_refused_attempts_registers_at_once(
    kubelet: KubeletEmulator,
    make_agent: Callable[[], Agent],
    agent_log: Callable[[], list[logging.LogRecord]],
) -> None:
    """A real kubelet leaves a stale kubelet.sock when it stops: attempts
    against it are refused. The attempt right after the new socket appears
    must reach the new kubelet: with every channel to the same address
    sharing one gRPC subchannel (and its reconnect backoff), it failed
    "connection refused" without even trying, and the agent slept its
    backoff (endless here)."""
    agent = make_agent()

    def body() -> None:
        registration = kubelet.wait_registered(RESOURCE)
        for _ in range(3):
            refused = len(failures(agent_log())) + 1
            kubelet.stop(crash=True)  # the stale socket a real kubelet leaves
            wait_for(partial(logged_failures, agent_log, refused), "a refused attempt")
            kubelet.start()
            after = registration.index + 1
            registration = kubelet.wait_registered(RESOURCE, after=after, timeout=WAIT)
        wait_for(lambda: agent.registrations == 4, "the agent to count 4 registrations")

    drive(agent, body)


@pytest.mark.usefixtures("endless_backoff")
def test_new_kubelet_socket_during_a_failing_attempt_is_not_forgotten(
    kubelet: KubeletEmulator,
    make_agent: Callable[[], Agent],
    agent_log: Callable[[], list[logging.LogRecord]],
) -> None:
    """The attempt hangs on a wedged kubelet.sock; a new kubelet replaces it
    meanwhile and the attempt is given up. The new socket was seen during
    the failed attempt: it must trigger the retry, not be cleared away
    before a backoff (endless here)."""
    agent = make_agent()

    def body() -> None:
        first = kubelet.wait_registered(RESOURCE)
        kubelet.stop(hang=True)
        # The agent's Register is in flight once its connect waits in the
        # wedged socket's backlog.
        wait_for(kubelet.hung_connections_pending, "a Register hanging on the wedged socket")
        kubelet.start()
        kubelet.wait_registered(RESOURCE, after=first.index + 1, timeout=WAIT)
        assert failures(agent_log())  # the attempt on the wedged socket failed

    drive(agent, body)


def test_stale_socket_probes_run_off_the_event_loop(
    kubelet: KubeletEmulator,
    kubelet_dir: Path,
    make_agent: Callable[[], Agent],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each probe of a leftover socket is a blocking connect() (up to 0.5 s):
    on the event loop it would stall every stream and the heartbeat."""
    with socket.socket(socket.AF_UNIX) as leftover:
        leftover.bind(str(kubelet_dir / "stc-npu.dead.sock"))  # bound, closed: refuses
    on_loop: list[bool] = []
    probe = agent_module.unix_socket_state

    def recording_probe(path: Path) -> str:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return probe(path)

    monkeypatch.setattr(agent_module, "unix_socket_state", recording_probe)
    agent = make_agent()
    drive(agent, lambda: kubelet.wait_registered(RESOURCE))
    assert not (kubelet_dir / "stc-npu.dead.sock").exists()
    assert on_loop
    assert not any(on_loop)


@pytest.fixture
def quick_resync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "RESYNC_TICKS", 1)  # every tick rescans


@pytest.mark.usefixtures("quick_resync")
def test_a_failing_tick_is_logged_with_its_traceback_and_goes_on(
    kubelet: KubeletEmulator,
    make_agent: Callable[[], Agent],
    node: SimNode,
    agent_log: Callable[[], list[logging.LogRecord]],
) -> None:
    agent = make_agent()
    rescan = agent.state.rescan
    failing = {"left": 2}

    def flaky_rescan() -> bool:
        if failing["left"] > 0:
            failing["left"] -= 1
            raise RuntimeError("injected rescan failure")
        return rescan()

    def body() -> None:
        kubelet.wait_registered(RESOURCE)
        agent.state.rescan = flaky_rescan  # type: ignore[method-assign]
        wait_for(lambda: failing["left"] == 0, "two failing ticks")
        failed_at = time.monotonic()
        # The tick goes on: it beats again and still rescans.
        wait_for(lambda: agent.heartbeat > failed_at, "a heartbeat after the failures")
        wait_for(lambda: agent.state.rescans > 3, "rescans after the failures")

    drive(agent, body)
    logged = [str(r.exc_info[1]) for r in agent_log() if r.exc_info is not None]
    assert "injected rescan failure" in logged


def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.usefixtures("quick_resync")
def test_healthz_fails_while_the_tick_cannot_do_its_work(
    kubelet: KubeletEmulator,
    make_agent: Callable[[], Agent],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(probes_module, "STALE_AFTER", 1.5)
    agent = make_agent()
    rescan = agent.state.rescan
    broken = threading.Event()

    def broken_rescan() -> bool:
        if broken.is_set():
            raise RuntimeError("injected: the scan fails every time")
        return rescan()

    agent.state.rescan = broken_rescan  # type: ignore[method-assign]
    server = ProbeServer("127.0.0.1:0", agent)
    server.start()

    def body() -> None:
        kubelet.wait_registered(RESOURCE)
        wait_for(lambda: healthz(server.port) == 200, "healthy")
        broken.set()
        wait_for(lambda: healthz(server.port) == 503, "/healthz failing")
        broken.clear()
        wait_for(lambda: healthz(server.port) == 200, "/healthz back once the tick works")

    try:
        drive(agent, body)
    finally:
        server.stop()


def test_a_failing_event_driven_rescan_is_logged_and_the_next_one_works(
    kubelet: KubeletEmulator,
    make_agent: Callable[[], Agent],
    node: SimNode,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = make_agent()
    rescan = agent.state.rescan
    failing = {"left": 1}

    def flaky_rescan() -> bool:
        if failing["left"] > 0:
            failing["left"] -= 1
            raise RuntimeError("injected event rescan failure")
        return rescan()

    def body() -> None:
        kubelet.wait_registered(RESOURCE)
        agent.state.rescan = flaky_rescan  # type: ignore[method-assign]
        node.unplug(1)  # its rescan fails ...
        wait_for(lambda: failing["left"] == 0, "the failing rescan")
        node.replug(1)
        node.unplug(2)  # ... the next event's works
        kubelet.wait_until(
            lambda: not kubelet.devices(RESOURCE)["stc2"].healthy, timeout=WAIT, what="stc2 down"
        )

    drive(agent, body)
    logged = [str(r.exc_info[1]) for r in caplog.records if r.exc_info is not None]
    assert "injected event rescan failure" in logged
