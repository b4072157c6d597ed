"""Smoke test of `make bench`: bench/run.py --quick runs and writes every
benchmark with a sane structure. Never a timing threshold: benchmarks are
not tests (the figures are in bench/README.md)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "bench" / "run.py"

# Every benchmark the issue asks for, by the key bench/run.py writes.
EXPECTED = {
    # 1. kubelet restart -> Register
    "restart_to_register_ms",
    "restart_emulator_start_ms",
    "restart_agent_share_ms",
    "restart_to_list_ms",
    # 2. own socket deleted -> Register
    "socket_deleted_to_register_ms",
    # 3. NPU nodes removed -> Unhealthy, re-added -> Healthy
    "unplug_to_unhealthy_ms",
    "replug_to_healthy_ms",
    "node_removed_to_unhealthy_ms",
    "node_restored_to_healthy_ms",
    # 4. new NPU plugged -> advertised
    "new_npu_to_advertised_ms",
    # 5. Allocate (1 and 8 NPUs, sequential and 16 callers), GetPreferredAllocation on 64
    "rpc_floor_ms",
    "allocate_1_seq_ms",
    "allocate_8_seq_ms",
    "allocate_1_c16_ms",
    "allocate_8_c16_ms",
    "allocate_1_c16_throughput",
    "allocate_1_seq_ms_warning",
    "preferred_64_size8_ms",
    # 6. cold start
    "cold_start_to_register_ms",
    "python_agent_import_ms",
    # 7. RSS after start and growth
    "rss_after_start_mb",
    "rss_after_cold_start_mb",
    "rss_growth_mb",
    # 8. idle CPU
    "idle_cpu_percent",
    # 9. scale: 64 NPUs
    "scale_add_64_to_advertised_ms",
    "scale_list_bytes",
    "storm_converged_after_last_op_ms",
    "scale_cold_start_to_list_ms",
    # 10, 11. re-registration with a stale kubelet.sock, after bursts of restarts
    "stale_restart_to_register_ms",
    "burst_last_restart_to_register_ms",
    # Cost and exposure: a busy /dev, a flood of idle probe connections
    "dev_noise_cpu_percent",
    "dev_noise_unplug_to_unhealthy_ms",
    "probe_flood_threads",
    "probe_flood_rss_mb",
    "probe_flood_healthz_ms",
    # A scrape costs little: latency, agent CPU, RSS with metrics on
    "scrape_ms",
    "scrape_agent_cpu_ms",
    "metrics_rss_added_mb",
    # Health: the vendor probe
    "vendor_probe_agent_cpu_ms_per_npu",
    "vendor_probe_reading_to_unhealthy_ms",
    "vendor_probe_card_off_to_unhealthy_ms",
    # Re-registration after a kubelet restart, by registration strategy
    "reregister_kubelet_socket_ms",
    "reregister_plugin_watcher_ms",
    # DRA mode: RSS, health after an unplug, the NodePrepareResources path
    "dra_rss_after_start_mb",
    "dra_rss_end_mb",
    "dra_unplug_to_unhealthy_ms",
    "dra_prepare_refused_ms",
}
# Differences between two readings, which may come out below zero.
MAY_BE_NEGATIVE = {
    "rss_growth_mb",
    "probe_flood_threads",
    "probe_flood_rss_mb",
    "metrics_rss_added_mb",
}


@pytest.mark.skipif(os.geteuid() != 0, reason="the simulated node needs mknod (root)")
def test_quick_bench_writes_every_benchmark(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    document = json.loads(out.read_text())

    assert document["plan"]["quick"] is True
    machine = document["machine"]
    assert machine["nproc"] >= 1
    assert machine["cpu_model"]
    assert machine["python"]

    benchmarks = document["benchmarks"]
    assert not EXPECTED - set(benchmarks)
    for key, stats in benchmarks.items():
        assert stats["n"] >= 1, key
        assert stats["unit"], key
        figures = [stats[name] for name in ("median", "p90", "max", "min", "mean")]
        for figure in figures:
            assert isinstance(figure, int | float), key
            assert math.isfinite(figure), key
            assert figure >= 0 or key in MAY_BE_NEGATIVE, (key, figure)
        assert stats["min"] <= stats["median"] <= stats["p90"] <= stats["max"], key
        assert stats["met"] in (True, False, None), key
        # The table printed every benchmark too.
        assert key in completed.stdout, key

    # Counts follow the plan: the restart benchmark did every restart.
    assert benchmarks["restart_to_register_ms"]["n"] == document["plan"]["restarts"]
    for key in ("reregister_kubelet_socket_ms", "reregister_plugin_watcher_ms"):
        assert benchmarks[key]["n"] == document["plan"]["reregistrations"], key
    # The plugin watcher finds the same socket; kubelet-socket makes a new one each time.
    assert benchmarks["reregister_plugin_watcher_ms"]["extra"]["new_plugin_sockets"] == 0
    assert (
        benchmarks["reregister_kubelet_socket_ms"]["extra"]["new_plugin_sockets"]
        == document["plan"]["reregistrations"]
    )
    assert benchmarks["allocate_1_seq_ms"]["n"] == document["plan"]["allocates"]
    assert benchmarks["scale_add_64_to_advertised_ms"]["extra"]["devices"] == 64
    assert benchmarks["scale_add_64_to_advertised_ms"]["extra"]["device_nodes"] == 384
    assert benchmarks["rss_growth_mb"]["extra"]["restarts"] == document["plan"]["churn_restarts"]
