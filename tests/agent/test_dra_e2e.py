"""The agent in DRA mode against the DRA kubelet emulator: registration
through plugins_registry as a DRAPlugin, NodePrepareResources /
NodeUnprepareResources with claims from a fake ClaimSource, the device health
stream, the checkpoint across an agent restart. The agent runs in this
process (the claim source is an object); the kubelet side runs in threads."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stc_npu_agent import draplugin
from stc_npu_agent.agent import Agent
from stc_npu_agent.claims import FakeClaimSource
from stc_npu_agent.core.config import parse_config
from stc_npu_agent.testing.dra import DraKubeletEmulator
from stc_npu_agent.testing.pluginwatcher import get_info
from stc_npu_agent.testing.simnode import SimNode

from . import cdi_checker

DRIVER = "npu.streamcomputing.com"
NODE = "node-a"


def claim(
    name: str,
    uid: str,
    devices: list[str],
    *,
    pool: str = NODE,
    driver: str = DRIVER,
    namespace: str = "default",
) -> dict[str, Any]:
    return {
        "metadata": {"namespace": namespace, "name": name, "uid": uid},
        "status": {
            "allocation": {
                "devices": {
                    "results": [
                        {"request": "npus", "driver": driver, "pool": pool, "device": device}
                        for device in devices
                    ]
                }
            }
        },
    }


@pytest.fixture
def host() -> Iterator[Path]:
    # Short: unix socket paths have at most 107 bytes.
    short = Path(tempfile.mkdtemp(prefix="stc-dra-"))
    yield short
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def node(tmp_path: Path) -> SimNode:
    sim = SimNode(tmp_path / "node")
    for index in range(4):
        sim.add_npu(index, numa_node=index // 2)
    return sim


def dra_agent(host: Path, node: SimNode, claims: FakeClaimSource) -> Agent:
    config = parse_config(
        {
            "mode": "dra",
            "pluginRegistryDir": str(host / "plugins_registry"),
            "dra": {"stateDir": str(host / "plugins" / DRIVER)},
            "cdi": {"specDir": str(host / "cdi")},
        }
    )
    return Agent(
        host / "device-plugins",
        node.dev_dir,
        node.sys_dir,
        config,
        node_name=NODE,
        claims=claims,
    )


Scenario = Callable[[Agent], Awaitable[None]]


def run_agent(agent: Agent, scenario: Scenario) -> None:
    """Run ``agent`` on this thread's loop while ``scenario`` drives it."""

    async def main() -> None:
        task = asyncio.create_task(agent.run())
        try:
            await scenario(agent)
        finally:
            agent.stop()
            await asyncio.wait_for(task, 30)

    asyncio.run(main())


def cdi_names(spec_dir: Path) -> set[str]:
    """Every CDI device the specs in ``spec_dir`` define (the node's spec and
    the claims' own), each spec checked against the CDI spec's rules."""
    names = set()
    for spec in spec_dir.glob("*.json"):
        document = json.loads(spec.read_text())
        assert cdi_checker.problems(document) == [], spec.name
        names |= {f"{document['kind']}={device['name']}" for device in document["devices"]}
    return names


def claim_env(spec_dir: Path, uid: str) -> dict[str, list[str]]:
    """Device name -> env of the claim ``uid``'s own spec."""
    document = json.loads((spec_dir / f"streamcomputing.com-npu_claim-{uid}.json").read_text())
    return {device["name"]: device["containerEdits"]["env"] for device in document["devices"]}


def test_registers_as_a_dra_plugin_and_reports_health(host: Path, node: SimNode) -> None:
    agent = dra_agent(host, node, FakeClaimSource())
    kubelet = DraKubeletEmulator(host / "plugins_registry")

    async def scenario(agent: Agent) -> None:
        with kubelet:
            registration = await asyncio.to_thread(kubelet.wait_registered, DRIVER)
            assert registration.service == "v1.DRAPlugin"
            socket = Path(registration.endpoint)
            assert socket.parent == host / "plugins_registry"
            info = await asyncio.to_thread(get_info, socket)
            assert info.type == "DRAPlugin"
            assert info.name == DRIVER
            assert info.endpoint == str(socket)
            assert list(info.supported_versions) == ["v1.DRAPlugin", "v1beta1.DRAPlugin"]
            assert kubelet.health_pools(DRIVER) == {NODE}
            assert kubelet.health(DRIVER) == {f"stc{i}": ("HEALTHY", "") for i in range(4)}
            await asyncio.to_thread(
                kubelet.wait_until, lambda: agent.registered and agent.ready, what="ready"
            )
            # Health follows the inventory: an unplugged NPU turns UNHEALTHY, with why.
            node.unplug(2)
            await asyncio.to_thread(
                kubelet.wait_until,
                lambda: kubelet.health(DRIVER).get("stc2", ("",))[0] == "UNHEALTHY",
                what="stc2 unhealthy",
            )
            assert kubelet.health(DRIVER)["stc2"][1]
            assert kubelet.health(DRIVER)["stc0"] == ("HEALTHY", "")

    run_agent(agent, scenario)
    # A clean stop takes the registration socket away.
    assert list((host / "plugins_registry").iterdir()) == []


def test_prepare_answers_cdi_ids_of_the_agents_spec_and_is_idempotent(
    host: Path, node: SimNode
) -> None:
    claims = FakeClaimSource()
    claims.put(claim("train", "uid-1", ["stc1", "stc3"]))
    agent = dra_agent(host, node, claims)
    kubelet = DraKubeletEmulator(host / "plugins_registry")

    async def scenario(agent: Agent) -> None:
        with kubelet:
            await asyncio.to_thread(kubelet.wait_registered, DRIVER)
            answer = await asyncio.to_thread(
                kubelet.prepare, DRIVER, [("default", "train", "uid-1")]
            )
            result = answer.claims["uid-1"]
            assert result.error == ""
            ids = [list(d.cdi_device_ids) for d in result.devices]
            # Each NPU's own ID, and the ID of its request's env (its list of NPUs).
            env_id = "streamcomputing.com/npu=claim-uid-1-npus"
            assert ids == [
                ["streamcomputing.com/npu=stc1", env_id],
                ["streamcomputing.com/npu=stc3", env_id],
            ]
            assert claim_env(host / "cdi", "uid-1") == {
                "claim-uid-1-npus": ["STC_NPU_DEVICES=stc1,stc3"]
            }
            assert [(d.pool_name, d.device_name) for d in result.devices] == [
                (NODE, "stc1"),
                (NODE, "stc3"),
            ]
            assert [list(d.request_names) for d in result.devices] == [["npus"], ["npus"]]
            # Each ID resolves through the CDI spec the agent writes.
            assert {i for d in ids for i in d} <= cdi_names(host / "cdi")
            checkpoint = json.loads((host / "plugins" / DRIVER / "checkpoint.json").read_text())
            assert list(checkpoint["claims"]) == ["uid-1"]
            # Asked again (a kubelet retry or restart): the same, without a fetch.
            again = await asyncio.to_thread(
                kubelet.prepare, DRIVER, [("default", "train", "uid-1")]
            )
            assert again.claims["uid-1"] == result
            assert claims.fetches == 1

    run_agent(agent, scenario)


def test_each_claim_gets_its_own_error(host: Path, node: SimNode) -> None:
    claims = FakeClaimSource()
    claims.put(claim("good", "uid-good", ["stc0"]))
    claims.put(claim("recreated", "uid-new", ["stc1"]))
    claims.put(claim("foreign", "uid-foreign", ["gpu0"], driver="gpu.example.com"))
    claims.put(claim("elsewhere", "uid-else", ["stc2"], pool="node-b"))
    claims.put(claim("ghost", "uid-ghost", ["stc9"]))
    agent = dra_agent(host, node, claims)
    kubelet = DraKubeletEmulator(host / "plugins_registry")
    asked = [
        ("default", "good", "uid-good"),
        ("default", "recreated", "uid-old"),
        ("default", "foreign", "uid-foreign"),
        ("default", "elsewhere", "uid-else"),
        ("default", "ghost", "uid-ghost"),
        ("default", "missing", "uid-missing"),
    ]

    async def scenario(agent: Agent) -> None:
        with kubelet:
            await asyncio.to_thread(kubelet.wait_registered, DRIVER)
            answer = await asyncio.to_thread(kubelet.prepare, DRIVER, asked)

        errors = {uid: answer.claims[uid].error for _, _, uid in asked}
        assert errors["uid-good"] == ""
        assert [d.device_name for d in answer.claims["uid-good"].devices] == ["stc0"]
        assert "UID is 'uid-new', the kubelet asked for 'uid-old'" in errors["uid-old"]
        assert "no device of driver npu.streamcomputing.com" in errors["uid-foreign"]
        assert "in pool 'node-b', not this node's pool 'node-a'" in errors["uid-else"]
        assert "'stc9' is not an NPU of this node" in errors["uid-ghost"]
        assert "ResourceClaim default/missing not found" in errors["uid-missing"]
        for uid, error in errors.items():
            assert "\n" not in error, uid
            if error:
                assert not answer.claims[uid].devices
        checkpoint = json.loads((host / "plugins" / DRIVER / "checkpoint.json").read_text())
        assert list(checkpoint["claims"]) == ["uid-good"]

    run_agent(agent, scenario)


def test_an_agent_restart_keeps_prepared_claims_and_unprepare_forgets_them(
    host: Path, node: SimNode
) -> None:
    claims = FakeClaimSource()
    claims.put(claim("train", "uid-1", ["stc2"]))
    kubelet = DraKubeletEmulator(host / "plugins_registry")
    first_answer: list[object] = []

    async def prepare(agent: Agent) -> None:
        registration = await asyncio.to_thread(kubelet.wait_registered, DRIVER)
        first_answer.append(registration.index)
        answer = await asyncio.to_thread(kubelet.prepare, DRIVER, [("default", "train", "uid-1")])
        first_answer.append(answer.claims["uid-1"])

    with kubelet:
        run_agent(dra_agent(host, node, claims), prepare)
        # The new agent cannot read the claim any more (the API is away):
        # the checkpoint alone must answer.
        empty = FakeClaimSource()

        async def after_restart(agent: Agent) -> None:
            await asyncio.to_thread(
                kubelet.wait_registered, DRIVER, after=int(str(first_answer[0])) + 1
            )
            answer = await asyncio.to_thread(
                kubelet.prepare, DRIVER, [("default", "train", "uid-1")]
            )
            assert answer.claims["uid-1"] == first_answer[1]
            assert empty.fetches == 0
            undone = await asyncio.to_thread(
                kubelet.unprepare,
                DRIVER,
                [("default", "train", "uid-1"), ("default", "never", "uid-never")],
            )
            # Every claim has an entry; an unknown one is done already.
            assert {uid: r.error for uid, r in undone.claims.items()} == {
                "uid-1": "",
                "uid-never": "",
            }
            checkpoint = (host / "plugins" / DRIVER / "checkpoint.json").read_text()
            assert json.loads(checkpoint)["claims"] == {}

        run_agent(dra_agent(host, node, empty), after_restart)


@pytest.mark.parametrize(
    ("services", "health_package"),
    [(["v1beta1.DRAPlugin"], "v1beta1"), (["v1.DRAPlugin"], "v1")],
)
def test_older_and_newer_kubelet_apis_are_served(
    host: Path, node: SimNode, services: list[str], health_package: str
) -> None:
    claims = FakeClaimSource()
    claims.put(claim("c", "uid-c", ["stc0"]))
    kubelet = DraKubeletEmulator(
        host / "plugins_registry", services=services, health_package=health_package
    )

    async def scenario(agent: Agent) -> None:
        with kubelet:
            registration = await asyncio.to_thread(kubelet.wait_registered, DRIVER)
            assert registration.service == services[0]
            assert len(kubelet.health(DRIVER)) == 4
            answer = await asyncio.to_thread(kubelet.prepare, DRIVER, [("default", "c", "uid-c")])
            assert answer.claims["uid-c"].error == ""

    run_agent(dra_agent(host, node, claims), scenario)


def test_a_kubelet_restart_finds_the_same_dra_socket(host: Path, node: SimNode) -> None:
    kubelet = DraKubeletEmulator(host / "plugins_registry")

    async def scenario(agent: Agent) -> None:
        with kubelet:
            first = await asyncio.to_thread(kubelet.wait_registered, DRIVER)
            await asyncio.to_thread(kubelet.restart)
            second = await asyncio.to_thread(kubelet.wait_registered, DRIVER, after=first.index + 1)
            assert second.endpoint == first.endpoint
            await asyncio.to_thread(
                kubelet.wait_until, lambda: agent.registrations == 2, what="notified twice"
            )

    run_agent(dra_agent(host, node, FakeClaimSource()), scenario)


def test_without_a_claim_source_every_claim_says_so(host: Path, node: SimNode) -> None:
    config = parse_config(
        {
            "mode": "dra",
            "pluginRegistryDir": str(host / "plugins_registry"),
            "dra": {"stateDir": str(host / "state")},
            "cdi": {"specDir": str(host / "cdi")},
        }
    )
    agent = Agent(host / "device-plugins", node.dev_dir, node.sys_dir, config, node_name=NODE)
    kubelet = DraKubeletEmulator(host / "plugins_registry")

    async def scenario(agent: Agent) -> None:
        with kubelet:
            await asyncio.to_thread(kubelet.wait_registered, DRIVER)
            answer = await asyncio.to_thread(kubelet.prepare, DRIVER, [("ns", "c", "uid-c")])
            assert "no Kubernetes API client is configured" in answer.claims["uid-c"].error

    run_agent(agent, scenario)


def test_health_stays_known_past_the_kubelets_timeout(
    host: Path, node: SimNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kubelet counts a device's health as Unknown once it has not heard
    # of it for its timeout (30 s; seen on v1.36.2: pods' allocatedResourcesStatus
    # Unknown): the agent repeats the whole list well within it, with no change.
    monkeypatch.setattr(draplugin, "HEALTH_RESEND_INTERVAL", 0.2)
    agent = dra_agent(host, node, FakeClaimSource())
    kubelet = DraKubeletEmulator(host / "plugins_registry", health_timeout=2.0)

    async def scenario(agent: Agent) -> None:
        with kubelet:
            await asyncio.to_thread(kubelet.wait_registered, DRIVER)
            assert kubelet.health(DRIVER)["stc0"] == ("HEALTHY", "")
            await asyncio.sleep(3.0)  # past the timeout; nothing changed
            assert kubelet.health(DRIVER) == {f"stc{i}": ("HEALTHY", "") for i in range(4)}

    run_agent(agent, scenario)


def test_ready_once_registered_even_without_a_health_stream(host: Path, node: SimNode) -> None:
    # A kubelet with the ResourceHealthStatus gate off never opens the stream.
    kubelet = DraKubeletEmulator(host / "plugins_registry", health_package=None)

    async def scenario(agent: Agent) -> None:
        with kubelet:
            await asyncio.to_thread(kubelet.wait_registered, DRIVER)
            await asyncio.to_thread(kubelet.wait_until, lambda: agent.ready, what="agent ready")
            assert agent.instance is not None
            assert agent.instance.streams.open_streams == 0

    run_agent(dra_agent(host, node, FakeClaimSource()), scenario)


def test_no_cdi_ids_while_the_spec_that_resolves_them_is_missing(host: Path, node: SimNode) -> None:
    (host / "not-a-dir").write_text("")  # the spec dir cannot be made under a file
    claims = FakeClaimSource()
    claims.put(claim("c", "uid-c", ["stc0"]))
    config = parse_config(
        {
            "mode": "dra",
            "pluginRegistryDir": str(host / "plugins_registry"),
            "dra": {"stateDir": str(host / "state")},
            "cdi": {"specDir": str(host / "not-a-dir" / "cdi")},
        }
    )
    agent = Agent(
        host / "device-plugins", node.dev_dir, node.sys_dir, config, node_name=NODE, claims=claims
    )
    kubelet = DraKubeletEmulator(host / "plugins_registry")

    async def scenario(agent: Agent) -> None:
        with kubelet:
            await asyncio.to_thread(kubelet.wait_registered, DRIVER)
            answer = await asyncio.to_thread(kubelet.prepare, DRIVER, [("default", "c", "uid-c")])
            result = answer.claims["uid-c"]
            assert "the CDI spec" in result.error
            assert "is missing" in result.error
            assert not result.devices
            # Not prepared: asked again once the spec is there, it is fetched anew.
            assert not (host / "state" / "checkpoint.json").exists()

    run_agent(agent, scenario)


async def prepare_train(kubelet: DraKubeletEmulator) -> int:
    """Prepare claim default/train (uid-1) once the agent is registered;
    the index of that registration."""
    registration = await asyncio.to_thread(kubelet.wait_registered, DRIVER)
    answer = await asyncio.to_thread(kubelet.prepare, DRIVER, [("default", "train", "uid-1")])
    assert not answer.claims["uid-1"].error
    return registration.index


def test_a_clean_stop_keeps_the_cdi_spec_while_claims_are_prepared(
    host: Path, node: SimNode
) -> None:
    """A container of a pod holding a prepared claim may restart while the
    agent is away (an upgrade, a crash): the runtime resolves its CDI IDs
    from the spec then. The spec goes on a clean stop only once no claim
    is prepared."""
    claims = FakeClaimSource()
    claims.put(claim("train", "uid-1", ["stc1"]))
    kubelet = DraKubeletEmulator(host / "plugins_registry")
    spec_dir = host / "cdi"
    first: list[int] = []

    async def prepare(agent: Agent) -> None:
        first.append(await prepare_train(kubelet))

    async def unprepare(agent: Agent) -> None:
        await asyncio.to_thread(kubelet.wait_registered, DRIVER, after=first[0] + 1)
        undone = await asyncio.to_thread(kubelet.unprepare, DRIVER, [("default", "train", "uid-1")])
        assert not undone.claims["uid-1"].error

    with kubelet:
        run_agent(dra_agent(host, node, claims), prepare)
        assert "streamcomputing.com/npu=stc1" in cdi_names(spec_dir)
        run_agent(dra_agent(host, node, claims), unprepare)
    assert list(spec_dir.glob("*.json")) == []


def test_a_claims_env_spec_follows_the_checkpoint_across_restarts(
    host: Path, node: SimNode
) -> None:
    """The claim's own spec (the env listing its NPUs) is written with the
    claim, again at start when /var/run lost it (a reboot: the kubelet does
    not prepare again what it prepared before), removed with the claim; one
    whose claim is not in the checkpoint is removed at start."""
    claims = FakeClaimSource()
    claims.put(claim("train", "uid-1", ["stc3", "stc1"]))
    kubelet = DraKubeletEmulator(host / "plugins_registry")
    spec_dir = host / "cdi"
    own = spec_dir / "streamcomputing.com-npu_claim-uid-1.json"
    ghost = spec_dir / "streamcomputing.com-npu_claim-ghost.json"
    first: list[int] = []

    async def prepare(agent: Agent) -> None:
        first.append(await prepare_train(kubelet))
        assert claim_env(spec_dir, "uid-1") == {"claim-uid-1-npus": ["STC_NPU_DEVICES=stc1,stc3"]}

    async def after_reboot(agent: Agent) -> None:
        await asyncio.to_thread(kubelet.wait_registered, DRIVER, after=first[0] + 1)
        # Written at start, before any call of the kubelet.
        assert claim_env(spec_dir, "uid-1") == {"claim-uid-1-npus": ["STC_NPU_DEVICES=stc1,stc3"]}
        assert not ghost.exists()
        undone = await asyncio.to_thread(kubelet.unprepare, DRIVER, [("default", "train", "uid-1")])
        assert not undone.claims["uid-1"].error
        assert not own.exists()

    with kubelet:
        run_agent(dra_agent(host, node, claims), prepare)
        ghost.write_bytes(own.read_bytes())
        own.unlink()
        run_agent(dra_agent(host, node, claims), after_reboot)
