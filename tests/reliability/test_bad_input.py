"""Bad input through the real agent process: config files, and Allocate /
GetPreferredAllocation called with anything, by the emulator and by a raw
gRPC client on the agent's socket. Always a clear error; the agent serves on;
nothing outside /dev/stc* ever appears in a DeviceSpec."""

from __future__ import annotations

import string
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stc_npu_agent.core.config import extended_resource_name_problem
from stc_npu_agent.testing.kubelet import KubeletEmulator, resource_name_error
from stc_npu_agent.testing.simnode import SimNode
from stc_npu_agent.v1beta1 import api_pb2, api_pb2_grpc
from tests.agent.conftest import RESOURCE, AgentFactory

from .kit import DEVICE_PATH, own_sockets

WAIT = 20.0

# --- config -------------------------------------------------------------------

BAD_CONFIGS = [
    ("resourceName: 7\n", "resourceName: expected a string"),
    ("resourceName: [a]\n", "resourceName: expected a string"),
    ("hpe: {mode: 5}\n", "hpe.mode: expected one of mapped, unmapped"),
    ("hpe: {hostPath: 5}\n", "hpe.hostPath: expected a string"),
    ("hpe: {containerPath: [a]}\n", "hpe.containerPath: expected a string"),
    ("discovery: {npuPattern: 5}\n", "discovery.npuPattern: expected a string"),
    ("discovery: {memberPattern: true}\n", "discovery.memberPattern: expected a string"),
    ("discovery: {npuPattern: 'stc[0-9]+'}\n", "discovery.npuPattern: must capture"),
    (
        "discovery: {npuPattern: 'stc(?P<index>[0-9]*)'}\n",
        "discovery.npuPattern: the group 'index' can match an empty string",
    ),
    ("discovery: 5\n", "discovery: expected a mapping"),
    ("hpe: mapped\n", "hpe: expected a mapping"),
    ("[1, 2]\n", "top level: expected a mapping"),
    ("bogus: 1\n", "bogus: unknown key"),
    ("hpe: {hostPath: usr/local/hpe}\n", "hpe.hostPath: must be an absolute path"),
    ("hpe: {containerPath: rel}\n", "hpe.containerPath: must be an absolute path"),
    ("hpe: [\n", "invalid YAML"),
    ("resourceName: npu\n", "resourceName: invalid resource name 'npu'"),
    ("resourceName: kubernetes.io/npu\n", "resourceName: invalid resource name"),
    ("resourceName: requests.example.com/npu\n", "resourceName: invalid resource name"),
    ("resourceName: example.com/a/b\n", "resourceName: invalid resource name"),
    ("resourceName: Example.com/npu\n", "resourceName: invalid resource name"),
    (f"resourceName: example.com/{'n' * 64}\n", "resourceName: invalid resource name"),
]


def assert_refused_before_start(agent_log: str, exit_code: int, message: str) -> None:
    lines = agent_log.strip().splitlines()
    assert exit_code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("stc-npu-agent: config ")
    assert message in lines[0]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_bad_config_exits_2_and_starts_nothing(  # noqa: PLR0917  (fixtures)
    text: str,
    message: str,
    tmp_path: Path,
    kubelet: KubeletEmulator,
    kubelet_dir: Path,
    start_agent: AgentFactory,
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    agent = start_agent(config_path=config)
    assert_refused_before_start(agent.log() if agent.process.wait(WAIT) else "", 2, message)
    assert agent.process.returncode == 2
    assert kubelet.registrations == []  # no Register seen
    assert own_sockets(kubelet_dir) == []  # no socket made


def test_config_that_is_a_directory(
    tmp_path: Path, kubelet: KubeletEmulator, kubelet_dir: Path, start_agent: AgentFactory
) -> None:
    agent = start_agent(config_path=tmp_path)
    code = agent.process.wait(WAIT)
    assert_refused_before_start(agent.log(), code, "is a directory, expected a YAML file")
    assert kubelet.registrations == []
    assert own_sockets(kubelet_dir) == []


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_empty_config_file_means_defaults(
    text: str, kubelet: KubeletEmulator, start_agent: AgentFactory
) -> None:
    agent = start_agent(config=text)
    registration = kubelet.wait_registered(RESOURCE, timeout=WAIT)
    assert registration.resource_name == "streamcomputing.com/npu"
    response = kubelet.allocate(RESOURCE, ["stc0"])
    assert [(m.host_path, m.read_only) for m in response.mounts] == [("/usr/local/hpe", True)]
    assert agent.terminate() == 0


def test_mapped_mode_without_hpe_on_the_host_warns_and_serves(
    tmp_path: Path, kubelet: KubeletEmulator, start_agent: AgentFactory
) -> None:
    missing = tmp_path / "no-hpe-here"
    agent = start_agent(
        config={"hpe": {"mode": "mapped", "hostPath": "/opt/hpe"}},
        extra_args=["--hpe-dir", str(missing)],
    )
    kubelet.wait_registered(RESOURCE, timeout=WAIT)
    agent.wait_log("hpe.mode is mapped but hpe.hostPath /opt/hpe is missing or empty")
    assert "set hpe.mode=unmapped" in agent.log()
    assert kubelet.allocate(RESOURCE, ["stc1"]).mounts[0].host_path == "/opt/hpe"
    assert agent.process.poll() is None
    assert agent.terminate() == 0


NAME_CHARS = string.ascii_letters + string.digits + "-._/"


@settings(max_examples=2000, deadline=None)
@given(
    st.one_of(
        st.text(alphabet=NAME_CHARS, max_size=80),
        st.builds(
            "{}/{}".format,
            st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,20}[a-z0-9])?", fullmatch=True),
            st.text(alphabet=NAME_CHARS, max_size=70),
        ),
        st.sampled_from(
            [
                "kubernetes.io/x",
                "a.kubernetes.io/x",
                "requests.a/b",
                "a/" + "b" * 63,
                "a/" + "b" * 64,
            ]
        ),
    )
)
def test_config_accepts_exactly_the_kubelets_extended_resource_names(name: str) -> None:
    # The emulator's check mirrors the kubelet's (IsExtendedResourceName).
    assert (extended_resource_name_problem(name) is None) == (resource_name_error(name) is None)


# --- Allocate and GetPreferredAllocation --------------------------------------


@pytest.fixture
def stub(
    kubelet: KubeletEmulator, kubelet_dir: Path, node: SimNode, start_agent: AgentFactory
) -> Iterator[api_pb2_grpc.DevicePluginStub]:
    agent = start_agent()
    registration = kubelet.wait_registered(RESOURCE, timeout=WAIT)
    node.unplug(3)
    kubelet.wait_until(lambda: not kubelet.devices(RESOURCE)["stc3"].healthy, what="stc3 down")
    with grpc.insecure_channel(f"unix://{kubelet_dir / registration.endpoint}") as channel:
        yield api_pb2_grpc.DevicePluginStub(channel)
    # Whatever was thrown at it: still serving, still streaming.
    assert agent.process.poll() is None
    assert kubelet.stream_open(RESOURCE)
    assert kubelet.allocate(RESOURCE, ["stc0"]).devices[0].host_path == "/dev/stc0"
    assert kubelet.registrations[-1].index == registration.index  # never re-registered


def allocate_request(*containers: list[str]) -> api_pb2.AllocateRequest:
    return api_pb2.AllocateRequest(
        container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=ids) for ids in containers]
    )


MANY = [f"stc{index}" for index in range(10_000)]

BAD_ALLOCATES = [
    (allocate_request(), grpc.StatusCode.INVALID_ARGUMENT, "no container requests"),
    (allocate_request([]), grpc.StatusCode.INVALID_ARGUMENT, "no device IDs"),
    (allocate_request(["stc9"]), grpc.StatusCode.INVALID_ARGUMENT, "unknown device IDs: 'stc9'"),
    (allocate_request(["stc3"]), grpc.StatusCode.FAILED_PRECONDITION, "unhealthy device IDs: stc3"),
    (allocate_request(["stc0", "stc0"]), grpc.StatusCode.INVALID_ARGUMENT, "duplicate"),
    (allocate_request(MANY), grpc.StatusCode.INVALID_ARGUMENT, "and 9988 more"),
    (allocate_request(["stc0"] * 10_000), grpc.StatusCode.INVALID_ARGUMENT, "duplicate"),
    (allocate_request(["../stc0"]), grpc.StatusCode.INVALID_ARGUMENT, "'../stc0'"),
    (allocate_request(["stc0/../../etc"]), grpc.StatusCode.INVALID_ARGUMENT, "unknown"),
    (allocate_request(["/dev/sda"]), grpc.StatusCode.INVALID_ARGUMENT, "'/dev/sda'"),
    (allocate_request(["stc0\x00"]), grpc.StatusCode.INVALID_ARGUMENT, "'stc0\\x00'"),
    (allocate_request(["stc0"], ["stc9"]), grpc.StatusCode.INVALID_ARGUMENT, "unknown"),
]


def preferred_request(
    available: list[str], must: list[str], size: int, containers: int = 1
) -> api_pb2.PreferredAllocationRequest:
    container = api_pb2.ContainerPreferredAllocationRequest(
        available_deviceIDs=available, must_include_deviceIDs=must, allocation_size=size
    )
    return api_pb2.PreferredAllocationRequest(container_requests=[container] * containers)


ALL = ["stc0", "stc1", "stc2", "stc3"]
BAD_PREFERRED = [
    (preferred_request(ALL, [], 2, 0), grpc.StatusCode.INVALID_ARGUMENT, "no container requests"),
    (preferred_request(ALL, [], 0), grpc.StatusCode.INVALID_ARGUMENT, "must be positive, got 0"),
    (preferred_request(ALL, [], -1), grpc.StatusCode.INVALID_ARGUMENT, "must be positive, got -1"),
    (preferred_request(ALL, [], 4), grpc.StatusCode.FAILED_PRECONDITION, "exceeds the 3 healthy"),
    (preferred_request(ALL, [], 2**31 - 1), grpc.StatusCode.FAILED_PRECONDITION, "exceeds"),
    (preferred_request(["stc9"], [], 1), grpc.StatusCode.INVALID_ARGUMENT, "unknown available"),
    (preferred_request(ALL, ["stc3"], 1), grpc.StatusCode.FAILED_PRECONDITION, "unhealthy"),
    (
        preferred_request(["stc0"], ["stc1"], 1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not in available",
    ),
    (preferred_request(ALL, ["stc0", "stc1"], 1), grpc.StatusCode.INVALID_ARGUMENT, "exceed the"),
    (preferred_request(["stc0", "stc0"], [], 1), grpc.StatusCode.INVALID_ARGUMENT, "duplicate"),
    (preferred_request(MANY, [], 1), grpc.StatusCode.INVALID_ARGUMENT, "more"),
    (preferred_request(["a/b\x00"], [], 1), grpc.StatusCode.INVALID_ARGUMENT, "'a/b\\x00'"),
]


def test_bad_allocate_and_preferred_requests_get_clear_errors(
    stub: api_pb2_grpc.DevicePluginStub, kubelet: KubeletEmulator, kubelet_dir: Path
) -> None:
    refusals: list[tuple[grpc.RpcError, grpc.StatusCode, str]] = []
    for request, code, text in BAD_ALLOCATES:
        with pytest.raises(grpc.RpcError) as refused:
            stub.Allocate(request, timeout=WAIT)
        refusals.append((refused.value, code, text))
    for preferred, code, text in BAD_PREFERRED:
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetPreferredAllocation(preferred, timeout=WAIT)
        refusals.append((refused.value, code, text))
    for error, code, text in refusals:
        assert isinstance(error, grpc.Call)
        details = error.details() or ""
        assert error.code() == code, (text, details)
        assert text in details, (text, details)
        assert len(details) < 1000  # capped, even for 10 000 IDs
    # Garbage on the wire: a gRPC error, not a crash.
    endpoint = kubelet_dir / kubelet.registrations[-1].endpoint
    with grpc.insecure_channel(f"unix://{endpoint}") as channel:
        raw = channel.unary_unary("/v1beta1.DevicePlugin/Allocate", None, None)
        with pytest.raises(grpc.RpcError) as garbage:
            raw(b"\xff\xfe\x00garbage", timeout=WAIT)
    assert isinstance(garbage.value, grpc.Call)
    assert garbage.value.code() != grpc.StatusCode.OK


ID_PARTS = st.sampled_from(["stc", "0", "1", "2", "3", "9", "/", ".", "\x00", "c0", "ctrl", "é"])
IDS = st.lists(st.lists(ID_PARTS, max_size=4).map("".join), max_size=6)
REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ids=IDS, available=IDS, must=IDS, size=st.integers(-2, 6))
def test_fuzzed_ids_never_reach_outside_dev_stc(
    stub: api_pb2_grpc.DevicePluginStub,
    ids: list[str],
    available: list[str],
    must: list[str],
    size: int,
) -> None:
    healthy = {"stc0", "stc1", "stc2"}
    response, code = None, None
    try:
        response = stub.Allocate(allocate_request(ids), timeout=WAIT)
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
    if response is None:
        assert code in REFUSALS
    else:
        assert ids
        assert set(ids) <= healthy
        assert len(set(ids)) == len(ids)
        specs = response.container_responses[0].devices
        assert all(DEVICE_PATH.fullmatch(s.host_path) for s in specs)
        assert all(DEVICE_PATH.fullmatch(s.container_path) for s in specs)
    answer, code = None, None
    try:
        answer = stub.GetPreferredAllocation(preferred_request(available, must, size), timeout=WAIT)
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
    if answer is None:
        assert code in REFUSALS
    else:
        chosen = list(answer.container_responses[0].deviceIDs)
        assert len(chosen) == size
        assert set(must) <= set(chosen) <= set(available) & healthy
