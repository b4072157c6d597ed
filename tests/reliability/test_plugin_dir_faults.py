"""Faults around the kubelet's plugin dir, on the real agent process: the
dir deleted and made again (also behind a bind mount, as in the container),
made unwritable, a wedged ``kubelet.sock``, and Register answering errors.
Each: a clear log line, retries with bounded backoff, recovery when the
fault clears (or, where only a restart helps, a clear exit)."""

from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path

from stc_npu_agent.testing.kubelet import KubeletEmulator
from tests.agent.conftest import RESOURCE, AgentFactory

from .kit import own_sockets

WAIT = 40.0


def registered_fully(kubelet: KubeletEmulator, after: int) -> None:
    kubelet.wait_registered(RESOURCE, after=after, timeout=WAIT)
    kubelet.wait_until(
        lambda: kubelet.stream_open(RESOURCE) and kubelet.allocatable(RESOURCE) == 4,
        timeout=WAIT,
        what="registered and streaming 4 healthy NPUs",
    )


def test_plugin_dir_deleted_and_made_again(
    kubelet: KubeletEmulator, kubelet_dir: Path, start_agent: AgentFactory
) -> None:
    agent = start_agent()
    registered_fully(kubelet, 0)
    # While the kubelet runs (its socket goes with the dir), then a restart.
    shutil.rmtree(kubelet_dir)
    # rmtree deletes our socket and kubelet.sock in directory order, and the
    # agent may see either loss first: both mean "register again".
    agent.wait_log("re-registering: ", timeout=WAIT)
    after = len(kubelet.registrations)
    kubelet.restart()
    registered_fully(kubelet, after)

    # While the kubelet is away: the agent waits for the dir and the socket.
    kubelet.stop()
    shutil.rmtree(kubelet_dir)
    time.sleep(2.5)  # let the agent notice and wait (more than 2 ticks)
    assert agent.process.poll() is None
    after = len(kubelet.registrations)
    kubelet.start()  # makes the dir again
    registered_fully(kubelet, after)
    assert own_sockets(kubelet_dir) == [kubelet.registrations[-1].endpoint]
    # The dir's watch was re-armed on the new dir: a deletion of our socket
    # is noticed again.
    first = kubelet.registrations[-1]
    (kubelet_dir / first.endpoint).unlink()
    registered_fully(kubelet, first.index + 1)
    assert agent.terminate() == 0


def test_plugin_dir_made_anew_behind_a_bind_mount_exits(
    kubelet: KubeletEmulator, kubelet_dir: Path, start_agent: AgentFactory
) -> None:
    """In the pod the plugin dir is a hostPath bind mount. When the host's
    dir is deleted and made anew (a node reset), the mount keeps showing the
    deleted directory: the new kubelet.sock never appears in it. Only a
    container restart helps, so the agent exits non-zero and says why."""
    in_container = kubelet_dir.parent / "mnt"  # short: unix socket paths
    in_container.mkdir()
    # A private mount namespace of the agent's own, like a container's.
    bind = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", bind, "sh"]
    agent = start_agent(
        prefix=[*prefix, str(kubelet_dir), str(in_container)], kubelet_dir_override=in_container
    )
    registered_fully(kubelet, 0)
    kubelet.stop()
    shutil.rmtree(kubelet_dir)
    kubelet.start()  # makes the dir anew on the "host"
    assert agent.process.wait(WAIT) == 1
    assert f"the plugin dir {in_container} was deleted" in agent.log()
    assert "exiting so that a restart mounts the new one" in agent.log()


def test_plugin_dir_unwritable(
    kubelet: KubeletEmulator, kubelet_dir: Path, start_agent: AgentFactory
) -> None:
    # As root the agent would write anyway: run it without the capabilities
    # that bypass file permissions (what a non-root agent would meet).
    drop = "-dac_override,-dac_read_search,-fowner"
    kubelet_dir.chmod(0o555)
    agent = start_agent(prefix=["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}"])
    agent.wait_log("registration failed:", timeout=WAIT)
    agent.wait_log("is not writable (permission denied)", timeout=WAIT)
    time.sleep(2.0)  # the fault persists a while: still running, still retrying
    assert agent.process.poll() is None
    assert kubelet.registrations == []
    failures = agent.log().count("registration failed:")
    assert 2 <= failures <= 30, failures  # retries, but no hot loop
    kubelet_dir.chmod(0o755)
    registered_fully(kubelet, 0)
    assert agent.terminate() == 0


def test_kubelet_socket_that_never_answers(
    kubelet: KubeletEmulator, kubelet_dir: Path, start_agent: AgentFactory
) -> None:
    agent = start_agent()
    registered_fully(kubelet, 0)
    kubelet.stop(hang=True)  # a wedged kubelet: connects, never answers
    agent.wait_log("registration failed: DEADLINE_EXCEEDED", timeout=WAIT)
    assert agent.process.poll() is None
    after = len(kubelet.registrations)
    kubelet.start()  # the fault clears (likely while a Register hangs)
    registered_fully(kubelet, after)
    assert own_sockets(kubelet_dir) == [kubelet.registrations[-1].endpoint]
    assert agent.terminate() == 0


def test_register_answering_errors_backs_off_and_recovers(
    kubelet: KubeletEmulator, start_agent: AgentFactory
) -> None:
    kubelet.fail_register("injected: device manager is not ready")
    agent = start_agent()
    attempts = 8
    kubelet.wait_until(
        lambda: len(kubelet.registrations) >= attempts, timeout=WAIT, what=f"{attempts} attempts"
    )
    agent.wait_log("registration failed: UNKNOWN: injected: device manager is not ready")
    times = [r.received_at for r in kubelet.registrations]
    assert not any(r.accepted for r in kubelet.registrations)
    # Backoff doubles from 50 ms to 5 s: attempt 8 comes >= 3.2 s after 7.
    # (A lower bound only: a slow machine makes gaps longer, never shorter.)
    assert times[attempts - 1] - times[attempts - 2] >= 2.0, [
        round(b - a, 2) for a, b in itertools.pairwise(times)
    ]
    kubelet.fail_register(None)
    registered_fully(kubelet, attempts)
    assert agent.process.poll() is None
    assert agent.terminate() == 0
