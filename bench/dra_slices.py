"""DRA: ResourceSlice publishing against the stand-in API server
(``stc_npu_agent.testing.fakeapi``), in one process with the real publisher,
client library, scanner and a simulated node (root, for ``mknod``).

- unplug -> slice updated: from right before ``SimNode.unplug`` (all 6
  nodes) to the server storing the slice with that NPU tainted; the scan is
  called directly (the inotify path to the inventory is row 3 of run.py).
- storm: one NPU flapping (unplug/replug every 10 ms) for ``--storm``
  seconds; API writes counted at the server, per minute.
- RSS: a fresh process importing what device-plugin mode imports, against
  one that also loads the API client and publishes once (mode dra's extra).

    python bench/dra_slices.py [--runs 30] [--storm 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent" / "src"))

from stc_npu_agent.core.devices import DeviceRules, Inventory
from stc_npu_agent.discovery import DeviceScanner
from stc_npu_agent.kubeapi import KubeApi, server_config
from stc_npu_agent.slices import SlicePublisher
from stc_npu_agent.testing.fakeapi import FakeApiServer
from stc_npu_agent.testing.simnode import SimNode

DRIVER = "npu.streamcomputing.com"
NODE = "bench-node"
SLICE = f"{NODE}-{DRIVER}"
RSS = "int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])/1024"


def tainted(server: FakeApiServer, name: str) -> bool:
    with server.lock:
        stored = server.slices.get(SLICE)
        if stored is None:
            return False
        return any(d["name"] == name and d.get("taints") for d in stored["spec"]["devices"])


async def wait(condition: object) -> None:
    while not condition():  # type: ignore[operator]
        await asyncio.sleep(0.0005)


async def unplug_times(root: Path, runs: int, interval: float) -> list[float]:
    node = SimNode(root)
    for index in range(8):
        node.add_npu(index, numa_node=index // 4)
    scanner = DeviceScanner(node.dev_dir, node.sys_dir, DeviceRules())
    with FakeApiServer() as server:
        server.add_node(NODE)
        api = KubeApi(server_config(server.url))
        publisher = SlicePublisher(api, NODE, driver=DRIVER, min_interval=interval)
        inventory = Inventory().updated(scanner.scan(), scanner.rules)
        publisher.update(inventory)
        await publisher.in_sync.wait()
        times = []
        for run in range(runs):
            index = run % 8
            await asyncio.sleep(interval)  # a fresh write slot: the time of one update
            start = time.monotonic()
            node.unplug(index)
            inventory = inventory.updated(scanner.scan(), scanner.rules)
            publisher.update(inventory)
            await wait(lambda i=index: tainted(server, f"stc{i}"))
            times.append(time.monotonic() - start)
            node.replug(index)
            inventory = inventory.updated(scanner.scan(), scanner.rules)
            publisher.update(inventory)
            await publisher.in_sync.wait()
        publisher.stop()
        await api.close()
    return times


async def storm_writes(root: Path, seconds: float, interval: float) -> tuple[int, int]:
    node = SimNode(root)
    for index in range(8):
        node.add_npu(index)
    scanner = DeviceScanner(node.dev_dir, node.sys_dir, DeviceRules())
    with FakeApiServer() as server:
        server.add_node(NODE)
        api = KubeApi(server_config(server.url))
        publisher = SlicePublisher(api, NODE, driver=DRIVER, min_interval=interval)
        inventory = Inventory().updated(scanner.scan(), scanner.rules)
        publisher.update(inventory)
        await publisher.in_sync.wait()
        before = len(server.writes())
        changes = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if changes % 2 == 0:
                node.unplug(7)
            else:
                node.replug(7)
            inventory = inventory.updated(scanner.scan(), scanner.rules)
            publisher.update(inventory)
            changes += 1
            await asyncio.sleep(0.01)
        writes = len(server.writes()) - before
        publisher.stop()
        await api.close()
    return changes, writes


def rss_mib(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code + f"\nprint({RSS})"], capture_output=True,
                         text=True, check=True)  # fmt: skip
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--storm", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times = asyncio.run(unplug_times(Path(tmp) / "a", args.runs, args.interval))
        changes, writes = asyncio.run(storm_writes(Path(tmp) / "b", args.storm, args.interval))
    ms = sorted(t * 1000 for t in times)
    print(f"unplug -> slice updated (ms, {len(ms)} runs): median {statistics.median(ms):.1f}, "
          f"p90 {ms[int(len(ms) * 0.9) - 1]:.1f}, max {ms[-1]:.1f}")  # fmt: skip
    print(f"storm: {changes} inventory changes in {args.storm:.0f} s, {writes} API writes = "
          f"{writes * 60 / args.storm:.0f} writes/min (interval {args.interval} s)")  # fmt: skip
    plugin = "import stc_npu_agent.cli, stc_npu_agent.agent"
    dra = plugin + (
        "\nimport asyncio\nfrom stc_npu_agent.kubeapi import KubeApi, server_config\n"
        "from stc_npu_agent.testing.fakeapi import FakeApiServer\n"
        "async def one(url):\n    api = KubeApi(server_config(url))\n"
        "    await api.get_slice('none')\n    await api.close()\n"
        "with FakeApiServer() as s:\n    asyncio.run(one(s.url))"
    )
    base, with_api = rss_mib(plugin), rss_mib(dra)
    print(f"RSS: device-plugin mode's imports {base:.1f} MiB; with the API client and one "
          f"request {with_api:.1f} MiB (+{with_api - base:.1f}; the stand-in server's thread "
          "included)")  # fmt: skip


if __name__ == "__main__":
    main()
