"""Device storms, SIGKILL and SIGTERM at bad moments, inotify taken away, and
what the agent exposes (socket mode, network ports): the real agent process."""

from __future__ import annotations

import contextlib
import random
import signal
import stat
import subprocess
import threading
from pathlib import Path

import grpc
import pytest

from stc_npu_agent.testing.kubelet import KubeletEmulator
from stc_npu_agent.testing.simnode import SimNode
from tests.agent.conftest import RESOURCE, AgentFactory

from .kit import DEVICE_PATH, inet_inodes, own_sockets, socket_inodes

WAIT = 30.0
NPUS = 16


def kubelet_view(kubelet: KubeletEmulator) -> dict[str, bool]:
    return {device.id: device.healthy for device in kubelet.devices(RESOURCE).values()}


def test_device_storm_ends_with_healthy_equal_to_present(  # noqa: PLR0912
    kubelet: KubeletEmulator, node: SimNode, start_agent: AgentFactory
) -> None:
    for index in range(4, NPUS):
        node.add_npu(index, numa_node=index % 2)
    agent = start_agent()
    kubelet.wait_registered(RESOURCE)
    rng = random.Random(1000)  # noqa: S311  (a replayable storm)
    # Model: "ok", "unplugged", or the name of one broken node.
    state = dict.fromkeys(range(NPUS), "ok")
    for _ in range(1000):
        index = rng.randrange(NPUS)
        current = state[index]
        if current == "unplugged":
            node.replug(index)
            state[index] = "ok"
        elif current != "ok":  # broken: fix it, or pull the whole NPU
            if rng.random() < 0.5:
                node.restore_node(current)
                state[index] = "ok"
            else:
                node.unplug(index)
                state[index] = "unplugged"
        else:
            action = rng.choice(["unplug", "unplug", "remove", "file", "symlink"])
            name = rng.choice(node.node_names(index))
            if action == "unplug":
                node.unplug(index)
                state[index] = "unplugged"
            elif action == "remove":
                node.remove_node(name)
                state[index] = name
            elif action == "file":
                node.replace_with_regular_file(name)
                state[index] = name
            else:
                node.replace_with_symlink(name, "/dev/null")
                state[index] = name
    # Make sure the end state has each kind of fault at least once.
    oks = [index for index, value in state.items() if value == "ok"]
    for index, fault in zip(oks[:2], ["file", "symlink"], strict=False):
        name = f"stc{index}"
        if fault == "file":
            node.replace_with_regular_file(name)
        else:
            node.replace_with_symlink(name, "/dev/null")
        state[index] = name
    expected = {f"stc{index}": value == "ok" for index, value in state.items()}
    assert set(expected.values()) == {True, False}
    kubelet.wait_until(
        lambda: kubelet_view(kubelet) == expected,
        timeout=WAIT,
        what=f"the kubelet's view to match the node: {expected}",
    )
    # Every unplugged or broken NPU is still listed (Unhealthy), none extra.
    assert sorted(kubelet.devices(RESOURCE)) == sorted(expected)
    for device_id, healthy in expected.items():
        if healthy:
            specs = kubelet.allocate(RESOURCE, [device_id]).devices
            assert all(DEVICE_PATH.fullmatch(spec.host_path) for spec in specs)
        else:
            with pytest.raises(grpc.RpcError) as refused:
                kubelet.allocate(RESOURCE, [device_id])
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert agent.process.poll() is None


def test_sigkill_mid_allocate_then_restart_keeps_allocations_valid(
    kubelet: KubeletEmulator, kubelet_dir: Path, start_agent: AgentFactory
) -> None:
    first = start_agent()
    registration = kubelet.wait_registered(RESOURCE)
    running = {ids: kubelet.allocate(RESOURCE, list(ids)) for ids in [("stc0", "stc1"), ("stc3",)]}
    outcomes: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                kubelet.allocate(RESOURCE, ["stc2"], timeout=5)
                outcomes.append("ok")
            except (grpc.RpcError, RuntimeError) as error:
                outcomes.append(type(error).__name__)

    thread = threading.Thread(target=hammer)
    thread.start()
    kubelet.wait_until(lambda: len(outcomes) >= 5, timeout=WAIT, what="Allocates in flight")
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    kubelet.wait_until(lambda: outcomes[-1] != "ok", timeout=WAIT, what="Allocate failing")
    stop.set()
    thread.join(10)

    second = start_agent()
    kubelet.wait_registered(RESOURCE, after=registration.index + 1, timeout=WAIT)
    kubelet.wait_until(lambda: kubelet.allocatable(RESOURCE) == 4, timeout=WAIT, what="4 NPUs")
    assert own_sockets(kubelet_dir) == [kubelet.registrations[-1].endpoint]
    # The IDs the kubelet holds for running pods (its checkpoint) still
    # allocate, to the same device nodes, after the restart race.
    held = kubelet.assignments(RESOURCE)
    assert ("stc0", "stc1") in held
    assert ("stc3",) in held
    for ids, before in running.items():
        after = kubelet.allocate(RESOURCE, list(ids))
        assert list(after.devices) == list(before.devices)
        assert dict(after.envs) == dict(before.envs)
    assert second.terminate() == 0


def test_sigterm_while_streaming_and_allocating_exits_0_and_removes_socket(
    kubelet: KubeletEmulator, kubelet_dir: Path, node: SimNode, start_agent: AgentFactory
) -> None:
    agent = start_agent()
    kubelet.wait_registered(RESOURCE)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            node.unplug(1)
            node.replug(1)
            # The agent is going away: refused or cut off, both fine.
            with contextlib.suppress(grpc.RpcError, RuntimeError):
                kubelet.allocate(RESOURCE, ["stc0"], timeout=5)

    thread = threading.Thread(target=churn)
    thread.start()
    kubelet.wait_until(lambda: len(kubelet.updates(RESOURCE)) >= 6, timeout=WAIT, what="churn")
    assert kubelet.stream_open(RESOURCE)
    agent.process.send_signal(signal.SIGTERM)
    try:
        assert agent.process.wait(WAIT) == 0
    finally:
        stop.set()
        thread.join(10)
    assert own_sockets(kubelet_dir) == []
    assert "stopped" in agent.log()


def userns_works() -> bool:
    try:
        probe = subprocess.run(
            ["unshare", "--user", "--map-root-user", "true"], check=False, capture_output=True
        )
    except FileNotFoundError:
        return False
    return probe.returncode == 0


@pytest.mark.skipif(not userns_works(), reason="needs unshare --user (user namespaces)")
@pytest.mark.parametrize(
    ("limit", "error"),
    [
        ("max_inotify_instances", "instance limit reached"),
        ("max_inotify_watches", "watch limit reached"),
    ],
)
def test_without_inotify_falls_back_to_periodic_checks(
    limit: str,
    error: str,
    kubelet: KubeletEmulator,
    node: SimNode,
    start_agent: AgentFactory,
) -> None:
    """Real inotify exhaustion, contained: the agent runs in a private user
    namespace whose own inotify limit is 0 (the machine's limit is untouched)."""
    set_limit = f'echo 0 > /proc/sys/user/{limit} && exec "$@"'
    wrapper = ["unshare", "--user", "--map-root-user", "sh", "-c", set_limit, "sh"]
    agent = start_agent(prefix=wrapper)
    first = kubelet.wait_registered(RESOURCE, timeout=WAIT)
    agent.wait_log("inotify unavailable", timeout=WAIT)
    assert error in agent.log()
    # Device changes and kubelet restarts are still seen, by the 1 s check.
    node.unplug(2)
    kubelet.wait_until(lambda: not kubelet_view(kubelet)["stc2"], timeout=WAIT, what="stc2 down")
    node.replug(2)
    kubelet.wait_until(lambda: kubelet_view(kubelet)["stc2"], timeout=WAIT, what="stc2 back")
    kubelet.restart(crash=True)
    kubelet.wait_registered(RESOURCE, after=first.index + 1, timeout=WAIT)
    kubelet.wait_until(lambda: kubelet.allocatable(RESOURCE) == 4, timeout=WAIT, what="4 NPUs")
    assert agent.log().count("inotify unavailable") == 1  # said once
    assert agent.terminate() == 0


def test_socket_is_owner_only_and_no_network_port_without_probes(
    kubelet: KubeletEmulator, kubelet_dir: Path, start_agent: AgentFactory, unused_tcp_port: int
) -> None:
    agent = start_agent()
    registration = kubelet.wait_registered(RESOURCE)
    mode = (kubelet_dir / registration.endpoint).stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    pid = agent.process.pid
    # No TCP or UDP socket at all: every socket the agent holds is a unix one.
    assert socket_inodes(pid)
    assert not socket_inodes(pid) & inet_inodes(pid, listening_only=False)
    assert agent.terminate() == 0

    # The same check sees the probe port when one is configured.
    probed = start_agent(extra_args=["--probe-address", f"127.0.0.1:{unused_tcp_port}"])
    probed.wait_log("probes on http://127.0.0.1", timeout=WAIT)
    assert socket_inodes(probed.process.pid) & inet_inodes(probed.process.pid, listening_only=True)
    assert probed.terminate() == 0


# --- what is an NPU (issue 10, items 3-5) ----------------------------------------


def refusal(kubelet: KubeletEmulator, device_id: str) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        kubelet.allocate(RESOURCE, [device_id], timeout=WAIT)
    return refused.value.code()


def test_impostor_nodes_are_never_healthy_nor_allocated(
    kubelet: KubeletEmulator, node: SimNode, start_agent: AgentFactory
) -> None:
    node.add_foreign_node("stc7")  # mknod dev/stc7 c 1 3: /dev/null's numbers
    node.add_npu(4, vendor="0x1234")  # another vendor's card
    node.bind_driver(1, None)  # static nodes left, no driver bound
    node.bind_driver(2, "vfio-pci")  # handed to a VM
    node.replace_with_device("stc3c1", node.devnum("stc0c1"))  # another NPU's cluster
    agent = start_agent()
    kubelet.wait_registered(RESOURCE, timeout=WAIT)
    kubelet.wait_until(lambda: "stc7" in kubelet_view(kubelet), timeout=WAIT, what="stc7 listed")
    assert kubelet_view(kubelet) == {
        "stc0": True,
        "stc1": False,
        "stc2": False,
        "stc3": False,
        "stc4": False,
        "stc7": False,
    }
    for impostor in ("stc1", "stc2", "stc3", "stc4", "stc7"):
        assert refusal(kubelet, impostor) == grpc.StatusCode.FAILED_PRECONDITION
    assert kubelet.allocate(RESOURCE, ["stc0"]).devices
    log = agent.log()
    assert "stc7: 1:3 is not a PCI device" in log
    assert "stc4: PCI 0000:07:00.0 vendor 0x1234 is not allowed (0x23e2)" in log
    assert "stc1: PCI 0000:04:00.0 has no driver bound" in log
    assert "stc2: PCI 0000:05:00.0 is bound to vfio-pci, not stc" in log
    assert "stc3c1: 240:2 is stc0c1 by the kernel" in log
    # Named once per change, not once per scan: rescans for another NPU's
    # nodes add nothing about stc3.
    said = log.count("stc3c1: 240:2 is")
    node.remove_node("stc0ctrl")
    kubelet.wait_until(lambda: not kubelet_view(kubelet)["stc0"], timeout=WAIT, what="stc0 down")
    node.restore_node("stc0ctrl")
    kubelet.wait_until(lambda: kubelet_view(kubelet)["stc0"], timeout=WAIT, what="stc0 back")
    assert agent.log().count("stc3c1: 240:2 is") == said
    assert agent.terminate() == 0


def test_node_replaced_by_another_device_turns_npu_unhealthy_and_back(
    kubelet: KubeletEmulator, node: SimNode, start_agent: AgentFactory
) -> None:
    agent = start_agent()
    kubelet.wait_registered(RESOURCE, timeout=WAIT)
    kubelet.wait_until(lambda: kubelet.allocatable(RESOURCE) == 4, timeout=WAIT, what="4 NPUs")
    node.replace_with_device("stc2ctrl", (1, 3))
    kubelet.wait_until(lambda: not kubelet_view(kubelet)["stc2"], timeout=WAIT, what="stc2 down")
    assert refusal(kubelet, "stc2") == grpc.StatusCode.FAILED_PRECONDITION
    node.restore_node("stc2ctrl")
    kubelet.wait_until(lambda: kubelet_view(kubelet)["stc2"], timeout=WAIT, what="stc2 back")
    assert agent.terminate() == 0


def test_partial_npu_is_unhealthy_from_the_first_scan(
    kubelet: KubeletEmulator, node: SimNode, start_agent: AgentFactory
) -> None:
    node.add_npu(4, with_ctrl=False)
    node.add_npu(5, clusters=3)
    agent = start_agent()
    kubelet.wait_registered(RESOURCE, timeout=WAIT)
    kubelet.wait_until(lambda: len(kubelet_view(kubelet)) == 6, timeout=WAIT, what="6 NPUs")
    view = kubelet_view(kubelet)
    assert not view["stc4"]
    assert not view["stc5"]
    assert view["stc0"]
    assert refusal(kubelet, "stc4") == grpc.StatusCode.FAILED_PRECONDITION
    log = agent.log()
    assert "missing stc4ctrl" in log
    assert "missing stc5c3" in log
    assert agent.terminate() == 0


def test_leading_zero_names_are_not_ours(
    kubelet: KubeletEmulator, node: SimNode, start_agent: AgentFactory
) -> None:
    # stc01 would map to index 1 and mix its nodes into stc1's.
    node.add_foreign_node("stc01", node.devnum("stc1"))
    node.add_foreign_node("stc01c0", node.devnum("stc1c0"))
    node.add_foreign_node("stc001ctrl", node.devnum("stc1ctrl"))
    agent = start_agent()
    kubelet.wait_registered(RESOURCE, timeout=WAIT)
    kubelet.wait_until(lambda: kubelet.allocatable(RESOURCE) == 4, timeout=WAIT, what="4 NPUs")
    assert sorted(kubelet_view(kubelet)) == ["stc0", "stc1", "stc2", "stc3"]
    paths = sorted(spec.host_path for spec in kubelet.allocate(RESOURCE, ["stc1"]).devices)
    assert paths == [f"/dev/{name}" for name in sorted(node.node_names(1))]
    assert agent.terminate() == 0
