"""The real agent process against the kubelet emulator on a simulated node."""

from __future__ import annotations

import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from stc_npu_agent.testing.kubelet import KubeletEmulator
from stc_npu_agent.testing.simnode import SimNode

from .conftest import NUMA_OF, RESOURCE, AgentFactory

SOCKET_NAME = re.compile(r"stc-npu\.[0-9a-f]+\.sock")
NPU_NODES = ["", "c0", "c1", "c2", "c3", "ctrl"]


def own_sockets(kubelet_dir: Path) -> list[str]:
    return sorted(p.name for p in kubelet_dir.iterdir() if SOCKET_NAME.fullmatch(p.name))


@pytest.mark.parametrize("version", ["1.18", "1.25", "1.26", "1.32"])
def test_registers_with_both_kubelet_generations(
    version: str, kubelet_dir: Path, start_agent: AgentFactory
) -> None:
    with KubeletEmulator(kubelet_dir, version=version) as kubelet:
        start_agent()
        registration = kubelet.wait_registered(RESOURCE)
        assert registration.accepted
        assert registration.error is None
        assert registration.version == "v1beta1"
        assert registration.resource_name == RESOURCE
        assert SOCKET_NAME.fullmatch(registration.endpoint)
        assert (kubelet_dir / registration.endpoint).is_socket()
        # Both ways of giving options agree (1.18-1.25 read the request,
        # 1.26+ call GetDevicePluginOptions).
        assert registration.requested_options == registration.options
        assert registration.options.get_preferred_allocation_available
        assert not registration.options.pre_start_required
        old_generation = version in ("1.18", "1.25")
        assert (kubelet_dir / "DEPRECATION").exists() == old_generation
        assert kubelet.allocatable(RESOURCE) == 4


def test_lists_every_npu_with_its_numa_node(
    kubelet: KubeletEmulator, start_agent: AgentFactory
) -> None:
    agent = start_agent()
    kubelet.wait_registered(RESOURCE)
    devices = kubelet.devices(RESOURCE)
    assert sorted(devices) == ["stc0", "stc1", "stc2", "stc3"]
    for index, numa in NUMA_OF.items():
        assert devices[f"stc{index}"].health == "Healthy"
        assert devices[f"stc{index}"].numa_nodes == (numa,)
    log = agent.log()
    assert "found stc0: Healthy, NUMA 0, PCI 0000:" in log
    assert "vendor 0x23e2" in log
    assert '"resourceName": "streamcomputing.com/npu"' in log  # effective config, once
    assert log.count("effective config") == 1


def test_no_numa_information_means_no_topology(
    tmp_path: Path, kubelet: KubeletEmulator, start_agent: AgentFactory, node: SimNode
) -> None:
    node.add_npu(4, numa_node=None)
    start_agent()
    kubelet.wait_registered(RESOURCE)
    assert kubelet.devices(RESOURCE)["stc4"].numa_nodes == ()


@pytest.mark.parametrize("mode", ["mapped", "unmapped"])
@pytest.mark.parametrize("ids", [["stc1"], ["stc3", "stc0"]])
def test_allocate(
    mode: str, ids: list[str], kubelet: KubeletEmulator, start_agent: AgentFactory
) -> None:
    start_agent(config={"hpe": {"mode": mode, "hostPath": "/opt/hpe"}})
    kubelet.wait_registered(RESOURCE)
    response = kubelet.allocate(RESOURCE, ids)
    ordered = sorted(ids, key=lambda device_id: int(device_id[3:]))
    expected = [f"/dev/{npu}{suffix}" for npu in ordered for suffix in NPU_NODES]
    assert [spec.host_path for spec in response.devices] == expected
    assert [spec.container_path for spec in response.devices] == expected
    assert {spec.permissions for spec in response.devices} == {"rw"}
    mounts = [(m.host_path, m.container_path, m.read_only) for m in response.mounts]
    assert not response.cdi_devices  # device-specs, the default, alone
    if mode == "mapped":
        assert mounts == [("/opt/hpe", "/usr/local/hpe", True)]
        assert dict(response.envs) == {
            "STC_NPU_DEVICES": ",".join(ordered),
            "LD_LIBRARY_PATH": "/usr/local/hpe/lib",
            "RISCV": "/usr/local/hpe",
        }
    else:
        assert mounts == []
        assert dict(response.envs) == {"STC_NPU_DEVICES": ",".join(ordered)}


def test_refused_ids_keep_the_agent_serving(
    kubelet: KubeletEmulator, start_agent: AgentFactory, node: SimNode
) -> None:
    agent = start_agent()
    kubelet.wait_registered(RESOURCE)
    with pytest.raises(grpc.RpcError) as unknown:
        kubelet.allocate(RESOURCE, ["stc0", "stc9"])
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown device IDs: 'stc9'" in (unknown.value.details() or "")

    node.unplug(2)
    kubelet.wait_until(lambda: not kubelet.devices(RESOURCE)["stc2"].healthy, what="stc2 down")
    with pytest.raises(grpc.RpcError) as unhealthy:
        kubelet.allocate(RESOURCE, ["stc2"])
    assert unhealthy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "stc2" in (unhealthy.value.details() or "")

    response = kubelet.allocate(RESOURCE, ["stc1"])
    assert response.devices[0].host_path == "/dev/stc1"
    assert agent.process.poll() is None
    assert kubelet.stream_open(RESOURCE)


def test_preferred_allocation_keeps_to_one_numa_node(
    kubelet: KubeletEmulator, start_agent: AgentFactory
) -> None:
    start_agent()
    kubelet.wait_registered(RESOURCE)
    ids = ["stc3", "stc0", "stc2", "stc1"]
    assert kubelet.get_preferred_allocation(RESOURCE, ids, [], 2) == ["stc0", "stc1"]
    assert kubelet.get_preferred_allocation(RESOURCE, ids, ["stc2"], 2) == ["stc2", "stc3"]
    assert kubelet.get_preferred_allocation(RESOURCE, ["stc0", "stc2", "stc3"], [], 2) == [
        "stc2",
        "stc3",
    ]
    with pytest.raises(grpc.RpcError) as too_many:
        kubelet.get_preferred_allocation(RESOURCE, ids, [], 5)
    assert too_many.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_unplug_replug_and_new_npu(
    kubelet: KubeletEmulator, start_agent: AgentFactory, node: SimNode
) -> None:
    start_agent()
    kubelet.wait_registered(RESOURCE)

    node.unplug(1)
    kubelet.wait_until(lambda: kubelet.devices(RESOURCE)["stc1"].health == "Unhealthy", what="down")
    assert kubelet.allocatable(RESOURCE) == 3
    assert kubelet.capacity(RESOURCE) == 4

    node.replug(1)
    kubelet.wait_until(lambda: kubelet.devices(RESOURCE)["stc1"].healthy, what="stc1 back")
    assert kubelet.allocatable(RESOURCE) == 4

    node.add_npu(7, numa_node=1)
    kubelet.wait_until(lambda: "stc7" in kubelet.devices(RESOURCE), what="stc7 advertised")
    kubelet.wait_until(lambda: kubelet.devices(RESOURCE)["stc7"].healthy, what="stc7 healthy")
    assert kubelet.devices(RESOURCE)["stc7"].numa_nodes == (1,)
    assert [s.host_path for s in kubelet.allocate(RESOURCE, ["stc7"]).devices][
        -1
    ] == "/dev/stc7ctrl"


def test_partial_failure_and_fake_nodes_are_unhealthy(
    kubelet: KubeletEmulator, start_agent: AgentFactory, node: SimNode
) -> None:
    start_agent()
    kubelet.wait_registered(RESOURCE)
    node.remove_node("stc0c2")
    kubelet.wait_until(lambda: not kubelet.devices(RESOURCE)["stc0"].healthy, what="stc0 down")
    node.restore_node("stc0c2")
    kubelet.wait_until(lambda: kubelet.devices(RESOURCE)["stc0"].healthy, what="stc0 back")
    node.replace_with_regular_file("stc3")
    kubelet.wait_until(lambda: not kubelet.devices(RESOURCE)["stc3"].healthy, what="file")
    node.replace_with_symlink("stc1ctrl", "/dev/null")
    kubelet.wait_until(lambda: not kubelet.devices(RESOURCE)["stc1"].healthy, what="symlink")


def test_kubelet_restart_re_registers_on_a_new_socket(
    kubelet: KubeletEmulator, kubelet_dir: Path, start_agent: AgentFactory
) -> None:
    start_agent()
    first = kubelet.wait_registered(RESOURCE)
    # Down for a while, its stale kubelet.sock refusing the agent's attempts.
    kubelet.restart(down_for=0.3)
    second = kubelet.wait_registered(RESOURCE, after=first.index + 1)
    assert second.endpoint != first.endpoint
    assert own_sockets(kubelet_dir) == [second.endpoint]
    assert kubelet.allocatable(RESOURCE) == 4
    assert kubelet.allocate(RESOURCE, ["stc0"]).devices


def test_own_socket_deleted_re_registers(
    kubelet: KubeletEmulator, kubelet_dir: Path, start_agent: AgentFactory
) -> None:
    agent = start_agent()
    first = kubelet.wait_registered(RESOURCE)
    (kubelet_dir / first.endpoint).unlink()
    second = kubelet.wait_registered(RESOURCE, after=first.index + 1)
    assert second.endpoint != first.endpoint
    agent.wait_log(f"own socket {first.endpoint} was deleted")
    assert kubelet.stream_open(RESOURCE)
    # The kubelet keeps a superseded stream open (its updates would still
    # count): the agent must have ended its old one itself.
    kubelet.wait_until(lambda: kubelet.open_streams(RESOURCE) == 1, what="one open stream")


def test_kubelet_absent_at_start(kubelet_dir: Path, start_agent: AgentFactory) -> None:
    agent = start_agent()  # the plugin dir does not even exist yet
    agent.wait_log("waiting for the kubelet")
    time.sleep(0.5)
    assert agent.process.poll() is None
    with KubeletEmulator(kubelet_dir, version="1.32") as kubelet:
        registration = kubelet.wait_registered(RESOURCE)
        assert registration.accepted
        assert kubelet.allocatable(RESOURCE) == 4


def test_sigterm_stops_cleanly_and_removes_the_socket(
    kubelet: KubeletEmulator, kubelet_dir: Path, start_agent: AgentFactory
) -> None:
    agent = start_agent()
    kubelet.wait_registered(RESOURCE)
    assert len(own_sockets(kubelet_dir)) == 1
    started = time.monotonic()
    agent.process.send_signal(signal.SIGTERM)
    assert agent.process.wait(10) == 0
    assert time.monotonic() - started < 10
    assert own_sockets(kubelet_dir) == []
    kubelet.wait_until(lambda: kubelet.allocatable(RESOURCE) == 0, what="stream ended")
    # Our own shutdown removed our socket and ended our stream: no trigger.
    assert "re-registering" not in agent.log()


def test_sigint_also_stops_cleanly(kubelet: KubeletEmulator, start_agent: AgentFactory) -> None:
    agent = start_agent()
    kubelet.wait_registered(RESOURCE)
    agent.process.send_signal(signal.SIGINT)
    assert agent.process.wait(10) == 0


def test_stale_socket_of_a_killed_agent_is_removed(
    kubelet: KubeletEmulator, kubelet_dir: Path, start_agent: AgentFactory
) -> None:
    first = start_agent()
    registration = kubelet.wait_registered(RESOURCE)
    first.process.kill()
    first.process.wait(10)
    assert (kubelet_dir / registration.endpoint).exists()
    start_agent()
    second = kubelet.wait_registered(RESOURCE, after=registration.index + 1)
    assert own_sockets(kubelet_dir) == [second.endpoint]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("hpe:\n  mod: mapped\n", "hpe.mod: unknown key"),
        ("hpe:\n  mode: bogus\n", "hpe.mode: expected one of mapped, unmapped, got 'bogus'"),
        ("resourceName: npu\n", "resourceName: invalid resource name 'npu'"),
        ("hpe: [\n", "invalid YAML"),
    ],
)
def test_bad_config_exits_2_with_one_line(
    config: str, message: str, kubelet: KubeletEmulator, start_agent: AgentFactory
) -> None:
    agent = start_agent(config=config)
    assert agent.process.wait(10) == 2
    lines = agent.log().strip().splitlines()
    assert len(lines) == 1
    assert message in lines[0]
    assert lines[0].startswith("stc-npu-agent: config ")
    assert kubelet.registrations == []


def test_bad_flag_value_from_env_is_refused(start_agent: AgentFactory) -> None:
    agent = start_agent(env={"STC_NPU_LOG_FORMAT": "xml"})
    assert agent.process.wait(10) == 2
    assert "STC_NPU_LOG_FORMAT" in agent.log()


def test_json_logs(kubelet: KubeletEmulator, start_agent: AgentFactory) -> None:
    agent = start_agent(extra_args=["--log-format", "json"])
    kubelet.wait_registered(RESOURCE)
    agent.wait_log('"msg": "registered streamcomputing.com/npu')
    assert agent.log().lstrip().startswith("{")


def probe(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_probes_tell_registration_state(
    kubelet_dir: Path, start_agent: AgentFactory, unused_tcp_port: int
) -> None:
    agent = start_agent(extra_args=["--probe-address", f"127.0.0.1:{unused_tcp_port}"])
    agent.wait_log("probes on http://127.0.0.1")
    assert probe(unused_tcp_port, "/healthz") == 200
    assert probe(unused_tcp_port, "/readyz") == 503  # no kubelet yet
    with KubeletEmulator(kubelet_dir, version="1.32") as kubelet:
        kubelet.wait_registered(RESOURCE)
        deadline = time.monotonic() + 10
        while probe(unused_tcp_port, "/readyz") != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert probe(unused_tcp_port, "/readyz") == 200
    deadline = time.monotonic() + 10
    while probe(unused_tcp_port, "/readyz") != 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert probe(unused_tcp_port, "/readyz") == 503  # the kubelet went away
    assert probe(unused_tcp_port, "/nope") == 404


def test_too_long_kubelet_dir_is_a_clear_error(
    kubelet_dir: Path, start_agent: AgentFactory
) -> None:
    # Long enough that our socket's path passes 107 bytes, short enough that
    # the kubelet's own kubelet.sock still fits.
    padding = 88 - len(str(kubelet_dir))
    long_dir = kubelet_dir / ("d" * padding)
    with KubeletEmulator(long_dir, version="1.32"):
        agent = start_agent(kubelet_dir_override=long_dir)
        agent.wait_log("longer than 107 bytes, the limit for unix sockets: use a shorter")
        assert agent.process.poll() is None


def test_bad_probe_address_is_refused(start_agent: AgentFactory) -> None:
    agent = start_agent(extra_args=["--probe-address", "localhost"])
    assert agent.process.wait(10) == 2
    assert "--probe-address / STC_NPU_PROBE_ADDRESS: probe address must be HOST:PORT" in agent.log()


def test_stream_ended_by_the_kubelet_re_registers(
    kubelet: KubeletEmulator, start_agent: AgentFactory
) -> None:
    agent = start_agent()
    first = kubelet.wait_registered(RESOURCE)
    # Register is recorded before the agent has its answer: a stream ended
    # before then is still re-registered, but logged as the reason of the
    # next registration instead of a "re-registering:" line.
    agent.wait_log("registered streamcomputing.com/npu")
    kubelet.end_stream(RESOURCE)
    second = kubelet.wait_registered(RESOURCE, after=first.index + 1)
    assert second.endpoint != first.endpoint
    agent.wait_log("re-registering: the kubelet ended the ListAndWatch stream")
    kubelet.wait_until(lambda: kubelet.allocatable(RESOURCE) == 4, what="all back")


def test_kubelet_socket_metadata_change_is_not_a_restart(
    kubelet: KubeletEmulator, kubelet_dir: Path, start_agent: AgentFactory
) -> None:
    agent = start_agent()
    kubelet.wait_registered(RESOURCE)
    (kubelet_dir / "kubelet.sock").chmod(0o600)  # e.g. a node hardening job
    time.sleep(2.5)  # more than two ticks of the agent's periodic check
    assert len(kubelet.registrations) == 1
    assert "re-registering" not in agent.log()
