"""Kubernetes client libraries for the DRA driver, side by side: installed
size, import time, RSS after import and after one request to a stand-in API
server (a GET of a ResourceSlice).

Not part of `make bench`: it needs one venv per library, made beforehand
(`python3 -m venv DIR/NAME && DIR/NAME/bin/pip install NAME` for kubernetes,
lightkube and kr8s, plus an empty DIR/base), and this repo's agent package
importable in none of them (the stand-in server runs here, in the caller).

    python bench/client_libraries.py DIR
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent" / "src"))

from stc_npu_agent.testing.fakeapi import FakeApiServer

RSS = "int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])//1024"

IMPORTS = {
    "kubernetes": "import kubernetes.client",
    "lightkube": "import lightkube, lightkube.generic_resource",
    "kr8s": "import kr8s.asyncio",
}

# One GET of the slice "probe", printing RSS (MiB) after import and after the request.
REQUEST = {
    "kubernetes": """
import kubernetes.client as k
a = {rss}
c = k.Configuration(); c.host = URL
api = k.ResourceV1Api(k.ApiClient(c))
s = api.read_resource_slice("probe")
assert s.spec.driver == "probe"
print(a, {rss})
""",
    "lightkube": """
import asyncio, lightkube, lightkube.generic_resource as g
from lightkube.config.models import Cluster, User
a = {rss}
RS = g.create_global_resource("resource.k8s.io", "v1", "ResourceSlice", "resourceslices")
async def main():
    conf = lightkube.KubeConfig.from_one(cluster=Cluster(server=URL), user=User(token="t"))
    c = lightkube.AsyncClient(config=conf)
    s = await c.get(RS, "probe")
    assert s.to_dict()["spec"]["driver"] == "probe"
asyncio.run(main())
print(a, {rss})
""",
    "kr8s": """
import asyncio, kr8s.asyncio
from kr8s.asyncio.objects import new_class
a = {rss}
RS = new_class(kind="ResourceSlice", version="resource.k8s.io/v1", namespaced=False)
async def main():
    api = await kr8s.asyncio.api(url=URL)
    s = await RS.get("probe", api=api)
    assert s.raw["spec"]["driver"] == "probe"
asyncio.run(main())
print(a, {rss})
""",
}


def site_packages_kib(venv: Path) -> int:
    site = next(venv.glob("lib/python3*/site-packages"))
    out = subprocess.run(["du", "-sk", str(site)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def best_of(python: Path, code: str, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([str(python), "-c", code], check=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    root = Path(sys.argv[1])
    base = root / "base"
    base_size = site_packages_kib(base)
    base_time = best_of(base / "bin" / "python", "pass")
    with FakeApiServer() as server:
        server.slices["probe"] = {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSlice",
            "metadata": {"name": "probe", "resourceVersion": "1", "uid": "u"},
            "spec": {"driver": "probe", "pool": {"name": "n", "generation": 1,
                     "resourceSliceCount": 1}, "nodeName": "n", "devices": []},
        }  # fmt: skip
        print("| library | installed (MiB, own + deps) | import (ms, best of 5) "
              "| RSS after import (MiB) | RSS after one request (MiB) |")  # fmt: skip
        print("|---|---|---|---|---|")
        for name, statement in IMPORTS.items():
            python = root / name / "bin" / "python"
            size = (site_packages_kib(root / name) - base_size) / 1024
            imported = best_of(python, statement) - base_time
            code = f"URL = {server.url!r}\n" + REQUEST[name].format(rss=RSS)
            out = subprocess.run(
                [str(python), "-c", code], capture_output=True, text=True, check=False
            )
            rss = out.stdout.split() if out.returncode == 0 else ["-", out.stderr.strip()[-80:]]
            rss_base = subprocess.run(
                [str(base / "bin" / "python"), "-c", f"print({RSS})"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()  # fmt: skip
            print(f"| {name} | {size:.1f} | {imported * 1000:.0f} | {rss[0]} | {rss[1]} |")
        print(f"(bare python: RSS {rss_base} MiB; {statistics.mean([base_time]) * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
