"""Prometheus metrics: in process (fed events, served by the probe server) and
from the real agent process; every scrape is parsed with prometheus-client's
own parser, never by hand."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from stc_npu_agent import __version__
from stc_npu_agent.core.devices import Inventory
from stc_npu_agent.events import CAUSES, KUBELET_RESTART, START
from stc_npu_agent.metrics import IDENTITY, PRESENCE, Metrics, health_transitions
from stc_npu_agent.probes import ProbeServer, parse_address
from stc_npu_agent.testing.kubelet import KubeletEmulator
from stc_npu_agent.testing.simnode import SimNode
from tests.agent.conftest import RESOURCE, AgentFactory
from tests.agent.test_inventory import char, npu_nodes, scan, stc_pci

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample as (name, sorted labels) -> value, by prometheus-client's parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


class FakeSource:
    def __init__(self) -> None:
        self.inventory = scan(Inventory(), npu_nodes(0) + npu_nodes(1) + npu_nodes(2))
        self.registered = True
        self.open_streams = 1
        self.last_scan = 1_700_000_000.5


@pytest.fixture
def metrics() -> Metrics:
    metrics = Metrics()
    metrics.watch(FakeSource())
    return metrics


def scrape(metrics: Metrics) -> Samples:
    return parse(metrics.scrape({}).text)


def test_gauges_are_read_from_the_agent_at_scrape_time(metrics: Metrics) -> None:
    source = FakeSource()
    metrics = Metrics()
    metrics.watch(source)
    samples = scrape(metrics)
    assert value(samples, "stc_npu_npus", health="Healthy") == 3
    assert value(samples, "stc_npu_npus", health="Unhealthy") == 0
    assert value(samples, "stc_npu_registered") == 1
    assert value(samples, "stc_npu_list_and_watch_streams") == 1
    assert value(samples, "stc_npu_last_scan_timestamp_seconds") == 1_700_000_000.5
    # stc1 loses a node: the next scrape says so, with no event in between.
    nodes = [n for n in npu_nodes(0) + npu_nodes(1) + npu_nodes(2) if n.name != "stc1c2"]
    source.inventory = scan(source.inventory, nodes)
    source.registered, source.open_streams = False, 0
    samples = scrape(metrics)
    assert value(samples, "stc_npu_npus", health="Healthy") == 2
    assert value(samples, "stc_npu_npus", health="Unhealthy") == 1
    assert value(samples, "stc_npu_registered") == 0
    assert value(samples, "stc_npu_list_and_watch_streams") == 0


def test_build_info_and_every_cause_from_the_start(metrics: Metrics) -> None:
    samples = scrape(metrics)
    assert not [name for name, _ in samples if name.endswith("_created")]
    info = [key for key in samples if key[0] == "stc_npu_build_info"]
    assert len(info) == 1
    assert dict(info[0][1])["version"] == __version__
    for cause in CAUSES:
        assert value(samples, "stc_npu_registrations_total", cause=cause) == 0


def test_registrations_by_cause_and_restart_to_register(metrics: Metrics) -> None:
    old, new = (1, 10), (2, 20)
    metrics.kubelet_seen(old)
    metrics.registered(START, old)
    metrics.registration_failed()
    metrics.kubelet_seen(new)
    time.sleep(0.01)
    metrics.registered(KUBELET_RESTART, new)
    samples = scrape(metrics)
    assert value(samples, "stc_npu_registrations_total", cause=START) == 1
    assert value(samples, "stc_npu_registrations_total", cause=KUBELET_RESTART) == 1
    assert value(samples, "stc_npu_registration_failures_total") == 1
    # Only the restart is timed: the first registration follows the agent's start.
    assert value(samples, "stc_npu_kubelet_restart_to_register_seconds_count") == 1
    assert value(samples, "stc_npu_kubelet_restart_to_register_seconds_sum") >= 0.01


def test_same_kubelet_again_is_no_restart(metrics: Metrics) -> None:
    kubelet = (1, 10)
    metrics.kubelet_seen(kubelet)
    metrics.registered(START, kubelet)
    metrics.registered("stream_ended", kubelet)
    assert value(scrape(metrics), "stc_npu_kubelet_restart_to_register_seconds_count") == 0


def test_calls_by_method_and_code(metrics: Metrics) -> None:
    metrics.call_finished("Allocate", "OK", 0.002)
    metrics.call_finished("Allocate", "OK", 0.0004)
    metrics.call_finished("Allocate", "FAILED_PRECONDITION", 0.003)
    metrics.call_finished("GetPreferredAllocation", "OK", 0.001)
    samples = scrape(metrics)
    name = "stc_npu_device_plugin_call_duration_seconds"
    assert value(samples, f"{name}_count", method="Allocate", code="OK") == 2
    assert value(samples, f"{name}_bucket", method="Allocate", code="OK", le="0.0005") == 1
    assert value(samples, f"{name}_count", method="Allocate", code="FAILED_PRECONDITION") == 1
    assert value(samples, f"{name}_count", method="GetPreferredAllocation", code="OK") == 1


def test_health_transitions_by_signal() -> None:
    healthy = scan(Inventory(), npu_nodes(0) + npu_nodes(1))
    missing = scan(healthy, [n for n in npu_nodes(0) + npu_nodes(1) if n.name != "stc0ctrl"])
    assert health_transitions(healthy, missing) == [("stc0", PRESENCE, False)]
    assert health_transitions(missing, healthy) == [("stc0", PRESENCE, True)]
    assert health_transitions(healthy, healthy) == []
    foreign = scan(healthy, [*npu_nodes(0), *npu_nodes(1)[:-1], char("stc1ctrl", stc_pci(7))])
    assert health_transitions(healthy, foreign) == [("stc1", IDENTITY, False)]
    # An NPU that appears is no transition.
    assert health_transitions(Inventory(), healthy) == []


def test_transitions_are_counted_from_inventory_changes(metrics: Metrics) -> None:
    healthy = scan(Inventory(), npu_nodes(0))
    missing = scan(healthy, npu_nodes(0)[:-1])
    metrics.inventory_changed(healthy, missing)
    metrics.inventory_changed(missing, healthy)
    metrics.inventory_changed(healthy, missing)
    samples = scrape(metrics)
    name = "stc_npu_health_transitions_total"
    assert value(samples, name, signal=PRESENCE, health="Unhealthy") == 2
    assert value(samples, name, signal=PRESENCE, health="Healthy") == 1


def test_probe_events(metrics: Metrics) -> None:
    assert value(scrape(metrics), "stc_npu_last_probe_success_timestamp_seconds") == 0
    before = time.time()
    metrics.probe_finished(0.2, ok=True)
    metrics.probe_finished(5.0, ok=False)
    samples = scrape(metrics)
    assert value(samples, "stc_npu_probe_duration_seconds_count") == 2
    assert value(samples, "stc_npu_last_probe_success_timestamp_seconds") >= before


class ProbeTarget:
    heartbeat = time.monotonic()
    ready = True

    def status(self) -> dict[str, object]:
        return {}

    def allocation(self, ids: object) -> dict[str, object]:
        return {}


@pytest.fixture
def served(metrics: Metrics) -> Iterator[int]:
    server = ProbeServer("127.0.0.1:0", ProbeTarget())
    server.routes["/metrics"] = metrics.scrape
    server.start()
    yield server.port
    server.stop()


def test_served_on_the_probe_port_with_prometheus_content_type(served: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{served}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        samples = parse(response.read().decode())
    assert value(samples, "stc_npu_npus", health="Healthy") == 3


def test_the_npu_exporters_port_is_refused() -> None:
    with pytest.raises(ValueError, match="9836 is the vendor's npu-exporter"):
        parse_address(":9836")


def test_prometheus_client_is_not_imported_with_metrics_off() -> None:
    code = (
        "import sys, stc_npu_agent.agent, stc_npu_agent.probes, stc_npu_agent.cli; "
        "print('prometheus_client' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# --- the real agent process ---------------------------------------------------


def get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status), response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, "", ""


def wait_for(port: int, check: object, what: str, timeout: float = 30.0) -> Samples:
    deadline = time.monotonic() + timeout
    samples: Samples = {}
    while time.monotonic() < deadline:
        status, _, text = get(port, "/metrics")
        if status == 200:
            samples = parse(text)
            try:
                if check(samples):  # type: ignore[operator]
                    return samples
            except KeyError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"metrics never showed {what}: {samples}")


def test_agent_serves_metrics_that_follow_what_happens(
    kubelet: KubeletEmulator,
    node: SimNode,
    start_agent: AgentFactory,
    unused_tcp_port: int,
) -> None:
    port = unused_tcp_port
    start_agent({"metrics": {"enabled": True}}, extra_args=["--probe-address", f"127.0.0.1:{port}"])
    first = kubelet.wait_registered(RESOURCE)
    samples = wait_for(
        port, lambda s: value(s, "stc_npu_list_and_watch_streams") == 1, "the stream open"
    )
    assert value(samples, "stc_npu_registrations_total", cause="start") == 1
    assert value(samples, "stc_npu_npus", health="Healthy") == 4
    assert value(samples, "stc_npu_registered") == 1

    assert kubelet.allocate(RESOURCE, ["stc0"]).devices
    with pytest.raises(grpc.RpcError) as refused:
        kubelet.allocate(RESOURCE, ["stc9"])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert kubelet.get_preferred_allocation(RESOURCE, ["stc0", "stc1", "stc2"], [], 2)
    name = "stc_npu_device_plugin_call_duration_seconds_count"
    samples = wait_for(
        port, lambda s: value(s, name, method="GetPreferredAllocation", code="OK") == 1, "calls"
    )
    assert value(samples, name, method="Allocate", code="OK") == 1
    assert value(samples, name, method="Allocate", code="INVALID_ARGUMENT") == 1

    node.unplug(2)
    samples = wait_for(
        port, lambda s: value(s, "stc_npu_npus", health="Unhealthy") == 1, "stc2 unhealthy"
    )
    transitions = "stc_npu_health_transitions_total"
    assert value(samples, transitions, signal="presence", health="Unhealthy") == 1

    # A stopping kubelet ends our stream and leaves its socket behind: the
    # first signal the agent sees names the cause, whichever it is.
    kubelet.restart(down_for=0.3)
    kubelet.wait_registered(RESOURCE, after=first.index + 1)
    samples = wait_for(
        port,
        lambda s: (
            sum(
                value(s, "stc_npu_registrations_total", cause=cause)
                for cause in ("kubelet_restart", "kubelet_stopped", "stream_ended")
            )
            == 1
        ),
        "the re-registration",
    )
    assert value(samples, "stc_npu_kubelet_restart_to_register_seconds_count") == 1


def test_metrics_are_off_by_default(
    kubelet: KubeletEmulator, start_agent: AgentFactory, unused_tcp_port: int, tmp_path: Path
) -> None:
    agent = start_agent(extra_args=["--probe-address", f"127.0.0.1:{unused_tcp_port}"])
    agent.wait_log("probes on http://127.0.0.1")
    assert get(unused_tcp_port, "/metrics")[0] == 404
    assert get(unused_tcp_port, "/healthz")[0] == 200
