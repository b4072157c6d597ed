"""The ResourceSlice publisher against a stand-in API server, through the
real client library: published on start, no churn on restart, taints or
omission, coalesced writes, retries, conflicts; and the claim source."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from stc_npu_agent.claims import ClaimFetchError
from stc_npu_agent.core.devices import DeviceRules, Inventory
from stc_npu_agent.discovery import DeviceScanner
from stc_npu_agent.kubeapi import (
    KubeApi,
    in_cluster_config,
    server_config,
    slice_publisher,
)
from stc_npu_agent.slices import ApiError, SlicePublisher
from stc_npu_agent.testing.fakeapi import FakeApiServer
from stc_npu_agent.testing.simnode import SimNode

DRIVER = "npu.streamcomputing.com"
NODE = "node-a"
SLICE = f"{NODE}-{DRIVER}"


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer() as api:
        api.add_node(NODE)
        yield api


def scan(node: SimNode, before: Inventory | None = None) -> Inventory:
    scanner = DeviceScanner(node.dev_dir, node.sys_dir, DeviceRules())
    return (before or Inventory()).updated(scanner.scan(), scanner.rules)


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(2000):  # 20 s, generous
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


class Harness:
    def __init__(self, server: FakeApiServer, **options: Any) -> None:
        self.api = KubeApi(server_config(server.url))
        self.publisher = SlicePublisher(self.api, NODE, driver=DRIVER, **options)

    async def close(self) -> None:
        self.publisher.stop()
        await self.api.close()


@pytest.fixture
def make(server: FakeApiServer) -> Callable[..., Harness]:
    """Publishers on the test's loop (asyncio.run cancels what is left at its end)."""

    def factory(**options: Any) -> Harness:
        return Harness(server, **options)

    return factory


def sync(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a loop of its own (no pytest plugin needed)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def devices(server: FakeApiServer) -> dict[str, dict[str, Any]]:
    return {device["name"]: device for device in server.slices[SLICE]["spec"]["devices"]}


def generation(server: FakeApiServer) -> int:
    return int(server.slices[SLICE]["spec"]["pool"]["generation"])


@sync
async def test_published_on_start_owned_by_the_node(
    server: FakeApiServer, make: Callable[..., Harness], tmp_path: Path
) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0, numa_node=0)
    node.add_npu(1, numa_node=1)
    harness = make()
    harness.publisher.update(scan(node))
    await until(lambda: SLICE in server.slices, "the slice is created")
    stored = server.slices[SLICE]
    assert stored["spec"]["pool"] == {"name": NODE, "generation": 1, "resourceSliceCount": 1}
    assert stored["spec"]["nodeName"] == NODE
    assert stored["spec"]["driver"] == DRIVER
    assert stored["metadata"]["ownerReferences"][0]["uid"] == server.nodes[NODE]["metadata"]["uid"]
    assert devices(server)["stc1"]["attributes"]["numaNode"] == {"int": 1}


@sync
async def test_a_restarted_agent_writes_nothing_when_the_slice_is_right(
    server: FakeApiServer, make: Callable[..., Harness], tmp_path: Path
) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0)
    node.add_npu(1)
    node.remove_node("stc1c0")  # a tainted device too: its timeAdded must not count
    first = make()
    first.publisher.update(scan(node))
    await first.publisher.in_sync.wait()
    await first.close()
    writes = len(server.writes())
    second = make()
    second.publisher.update(scan(node))
    await asyncio.wait_for(second.publisher.in_sync.wait(), 20)
    assert len(server.writes()) == writes == 1
    assert generation(server) == 1


@sync
async def test_unplug_taints_the_npu_and_replug_clears_it(
    server: FakeApiServer, make: Callable[..., Harness], tmp_path: Path
) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0)
    node.add_npu(1)
    harness = make(min_interval=0.05)
    inventory = scan(node)
    harness.publisher.update(inventory)
    await until(lambda: SLICE in server.slices, "the slice is created")
    node.unplug(1)
    inventory = scan(node, inventory)
    harness.publisher.update(inventory)
    await until(lambda: "taints" in devices(server)["stc1"], "stc1 is tainted")
    taint = devices(server)["stc1"]["taints"][0]
    assert taint["effect"] == "NoSchedule"
    assert taint["value"].startswith("missing-stc1")
    assert "taints" not in devices(server)["stc0"]
    assert generation(server) == 2
    node.replug(1)
    harness.publisher.update(scan(node, inventory))
    await until(lambda: "taints" not in devices(server)["stc1"], "stc1's taint is gone")
    assert generation(server) == 3


@sync
async def test_a_taint_keeps_its_time_when_other_devices_change(
    server: FakeApiServer, make: Callable[..., Harness], tmp_path: Path
) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0)
    node.add_npu(1)
    node.remove_node("stc1c0")
    server.now = "2026-01-01T00:00:00Z"
    harness = make(min_interval=0.05)
    inventory = scan(node)
    harness.publisher.update(inventory)
    await until(lambda: SLICE in server.slices, "the slice is created")
    server.now = "2026-01-01T00:05:00Z"
    node.remove_node("stc0c0")
    harness.publisher.update(scan(node, inventory))
    await until(lambda: "taints" in devices(server)["stc0"], "stc0 is tainted")
    assert devices(server)["stc0"]["taints"][0]["timeAdded"] == "2026-01-01T00:05:00Z"
    assert devices(server)["stc1"]["taints"][0]["timeAdded"] == "2026-01-01T00:00:00Z"


@sync
async def test_in_sync_waits_for_a_change_made_during_a_write(
    server: FakeApiServer, make: Callable[..., Harness], tmp_path: Path
) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0)
    harness = make(min_interval=0.05)
    inventory = scan(node)
    harness.publisher.update(inventory)
    await harness.publisher.in_sync.wait()
    server.answer_delay = 0.5  # the write that taints stc0 is stored, its answer late
    node.unplug(0)
    inventory = scan(node, inventory)
    harness.publisher.update(inventory)
    await until(lambda: "taints" in devices(server)["stc0"], "stc0 is tainted")
    node.replug(0)  # before the publisher has the answer to the tainting write
    harness.publisher.update(scan(node, inventory))
    await asyncio.wait_for(harness.publisher.in_sync.wait(), 20)
    assert "taints" not in devices(server)["stc0"]


@sync
async def test_without_device_taints_unhealthy_npus_are_left_out(
    server: FakeApiServer,
    make: Callable[..., Harness],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server.device_taints = False
    node = SimNode(tmp_path)
    node.add_npu(0)
    node.add_npu(1)
    node.remove_node("stc1ctrl")
    harness = make(min_interval=0.05)
    with caplog.at_level(logging.WARNING):
        harness.publisher.update(scan(node))
        await until(harness.publisher.in_sync.is_set, "the slice is in sync")
    assert list(devices(server)) == ["stc0"]
    assert harness.publisher.taints_supported is False
    assert sum("DRADeviceTaints" in r.getMessage() for r in caplog.records) == 1


@sync
async def test_writes_are_coalesced_to_one_per_interval(
    server: FakeApiServer, make: Callable[..., Harness], tmp_path: Path
) -> None:
    node = SimNode(tmp_path)
    for index in range(4):
        node.add_npu(index)
    interval = 0.3
    harness = make(min_interval=interval)
    inventory = scan(node)
    harness.publisher.update(inventory)
    # A storm: stc3 flaps 40 times, each change handed over at once.
    for flap in range(40):
        if flap % 2 == 0:
            node.unplug(3)
        else:
            node.replug(3)
        inventory = scan(node, inventory)
        harness.publisher.update(inventory)
        await asyncio.sleep(0.01)
    await until(harness.publisher.in_sync.is_set, "the slice follows the last change")
    assert len(server.writes()) < 40
    # When the publisher sent them (the server's arrival times also carry
    # each request's own latency).
    writes = list(harness.publisher.write_times)
    assert len(writes) == len(server.writes())
    gaps = [later - earlier for earlier, later in itertools.pairwise(writes)]
    assert all(gap >= interval * 0.95 for gap in gaps), gaps
    assert "taints" not in devices(server)["stc3"]  # the storm ended with stc3 back


@sync
async def test_api_errors_are_retried_and_warned_once(
    server: FakeApiServer,
    make: Callable[..., Harness],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0)
    server.fail_next = [500, 500, 500, 500]  # the node read, then the slice's
    harness = make(min_interval=0.05)
    with caplog.at_level(logging.WARNING):
        harness.publisher.update(scan(node))
        await until(lambda: SLICE in server.slices, "the slice is created after the errors")
    warnings = [r.getMessage() for r in caplog.records if "cannot publish" in r.getMessage()]
    assert len(warnings) == 1
    assert SLICE in warnings[0]
    assert "500" in warnings[0]


@sync
async def test_status_says_whether_the_slice_is_published_and_why_not(
    server: FakeApiServer, make: Callable[..., Harness], tmp_path: Path
) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0)
    server.fail_next = [500] * 6  # retried with backoff: the problem stays a while
    harness = make(min_interval=0.05)
    publisher = harness.publisher
    assert publisher.status() == {"name": SLICE, "inSync": False, "writes": 0, "problem": None}
    publisher.update(scan(node))
    await until(lambda: publisher.status()["problem"] is not None, "a problem reported")
    status = publisher.status()
    assert status["inSync"] is False
    assert "500" in str(status["problem"])
    await until(lambda: publisher.status()["inSync"] is True, "the slice published")
    assert publisher.status() == {"name": SLICE, "inSync": True, "writes": 1, "problem": None}
    await harness.close()


@sync
async def test_a_node_read_that_fails_for_a_while_still_gives_the_owner_reference(
    server: FakeApiServer, make: Callable[..., Harness], tmp_path: Path
) -> None:
    # An agent that starts before it can reach the API server (on the real
    # cluster: before the Service route works) must not publish an orphan
    # slice for good: the Node is read again with the write's retries.
    node = SimNode(tmp_path)
    node.add_npu(0)
    server.fail_next = [503]  # the node read
    harness = make(min_interval=0.05)
    harness.publisher.update(scan(node))
    await until(lambda: SLICE in server.slices, "the slice is created after the error")
    owners = server.slices[SLICE]["metadata"].get("ownerReferences")
    assert owners, "the slice was published without the Node as its owner"
    assert owners[0]["uid"] == server.nodes[NODE]["metadata"]["uid"]


@sync
async def test_a_node_the_agent_may_not_read_leaves_the_slice_without_owner(
    server: FakeApiServer, make: Callable[..., Harness], tmp_path: Path
) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0)
    server.fail_next = [403]  # the node read: RBAC without nodes get
    harness = make(min_interval=0.05)
    harness.publisher.update(scan(node))
    await until(lambda: SLICE in server.slices, "the slice is created without its owner")
    assert not server.slices[SLICE]["metadata"].get("ownerReferences")


@sync
async def test_a_slice_changed_by_someone_else_is_read_again(
    server: FakeApiServer, make: Callable[..., Harness], tmp_path: Path
) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0)
    node.add_npu(1)
    harness = make(min_interval=0.05)
    inventory = scan(node)
    harness.publisher.update(inventory)
    await until(lambda: SLICE in server.slices, "the slice is created")
    with server.lock:  # another writer: a new resourceVersion and generation
        server.slices[SLICE]["metadata"]["resourceVersion"] = "999"
        server.slices[SLICE]["spec"]["pool"]["generation"] = 7
    node.unplug(0)
    harness.publisher.update(scan(node, inventory))
    await until(lambda: "taints" in devices(server)["stc0"], "stc0 is tainted")
    assert generation(server) == 8  # above the one found, as the API asks
    statuses = [r.method for r in server.requests]
    assert statuses.count("PUT") == 2  # the stale one (409) and the one after reading again


@sync
async def test_a_malformed_slice_on_the_server_is_replaced(
    server: FakeApiServer, make: Callable[..., Harness], tmp_path: Path
) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0)
    server.slices[SLICE] = {
        "metadata": {"name": SLICE, "resourceVersion": "5", "uid": "u"},
        "spec": {"driver": DRIVER, "nodeName": NODE},  # no pool: not ours as written
    }
    harness = make(min_interval=0.05)
    harness.publisher.update(scan(node))
    await until(lambda: "pool" in server.slices[SLICE]["spec"], "the slice is rewritten")
    assert list(devices(server)) == ["stc0"]


@sync
async def test_resync_puts_back_a_deleted_slice(
    server: FakeApiServer, make: Callable[..., Harness], tmp_path: Path
) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0)
    harness = make(min_interval=0.05, resync_interval=0.2)
    harness.publisher.update(scan(node))
    await until(lambda: SLICE in server.slices, "the slice is created")
    with server.lock:
        del server.slices[SLICE]
    await until(lambda: SLICE in server.slices, "the slice is back")


@sync
async def test_resync_on_demand_puts_back_a_slice_the_kubelet_wiped(
    server: FakeApiServer, make: Callable[..., Harness], tmp_path: Path
) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0)
    harness = make(min_interval=0.05)  # the periodic read-back is a minute away
    harness.publisher.update(scan(node))
    await until(lambda: SLICE in server.slices, "the slice is created")
    with server.lock:
        del server.slices[SLICE]
    harness.publisher.resync()
    await until(lambda: SLICE in server.slices, "the slice is back")


@sync
async def test_stop_leaves_the_slice_and_delete_removes_it(
    server: FakeApiServer, make: Callable[..., Harness], tmp_path: Path
) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0)
    harness = make()
    harness.publisher.update(scan(node))
    await harness.publisher.in_sync.wait()
    harness.publisher.stop()
    assert SLICE in server.slices
    await harness.publisher.delete()
    assert SLICE not in server.slices


@sync
async def test_the_factory_reads_the_kernel_driver_version(
    server: FakeApiServer, tmp_path: Path
) -> None:
    node = SimNode(tmp_path)
    node.add_npu(0)
    (node.sys_dir / "module" / "stc").mkdir(parents=True)
    (node.sys_dir / "module" / "stc" / "version").write_text("1.4.0\n")
    api = KubeApi(server_config(server.url))
    publisher = slice_publisher(api, NODE, node.sys_dir, min_interval=0.05)
    publisher.update(scan(node))
    await until(lambda: SLICE in server.slices, "the slice is created")
    assert devices(server)["stc0"]["attributes"]["driverVersion"] == {"version": "1.4.0"}
    publisher.stop()
    await api.close()


@sync
async def test_claim_source_reads_the_claim(server: FakeApiServer) -> None:
    claim = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": "c1", "namespace": "team", "uid": "u-1"},
        "status": {"allocation": {"devices": {"results": [{"driver": DRIVER, "device": "stc0"}]}}},
    }
    server.add_claim(claim)
    api = KubeApi(server_config(server.url))
    try:
        got = await api.get_claim("team", "c1")
        assert got["metadata"]["uid"] == "u-1"
        assert got["status"] == claim["status"]
        with pytest.raises(ClaimFetchError, match=r"ResourceClaim team/gone: 404 NotFound"):
            await api.get_claim("team", "gone")
    finally:
        await api.close()


@sync
async def test_unreachable_api_server_is_one_line() -> None:
    api = KubeApi(server_config("http://127.0.0.1:9"))
    try:
        with pytest.raises(ApiError, match="API server unreachable") as caught:
            await api.get_slice("x")
        assert "\n" not in str(caught.value)
    finally:
        await api.close()


def test_in_cluster_config_from_the_service_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("secret-token")
    (tmp_path / "namespace").write_text("kube-system")
    (tmp_path / "ca.crt").write_text("")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    config = in_cluster_config(tmp_path).get()
    assert config is not None
    assert config.cluster.server == "https://10.0.0.1:443"
    missing = tmp_path / "none"
    with pytest.raises(ApiError, match=f"ServiceAccount token at {missing}"):
        in_cluster_config(missing)


def test_device_plugin_mode_never_loads_the_client_library() -> None:
    code = (
        "import sys, stc_npu_agent.cli, stc_npu_agent.agent, stc_npu_agent.sinks;"
        "import stc_npu_agent.slices, stc_npu_agent.core.slices;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightkube', 'httpx2')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
    )
    assert out.stdout.strip() == "[]"
    # ... and the check can fail: kubeapi does load it.
    out = subprocess.run(
        [sys.executable, "-c", code.replace("stc_npu_agent.sinks;", "stc_npu_agent.kubeapi;")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "lightkube" in out.stdout
