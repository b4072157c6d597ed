"""Running the real helm binaries on chart/stc-npu and reading what they render."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "chart" / "stc-npu"
SCENARIOS = sorted(CHART.glob("ci/*-values.yaml"))
HELMS = ("helm3", "helm4")
RELEASE = "stc-npu"
NAMESPACE = "kube-system"


def helm_binary(name: str) -> str:
    """The path of helm3 or helm4 on PATH; a failure (not a skip) when missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not on PATH: the chart tests need the real helm 3 and helm 4. "
            "Run `make tools` (bash ci/install-helm.sh .tools/bin) and put .tools/bin "
            "on PATH, or run the tests through `make test`.",
            pytrace=False,
        )
    return path


def run_helm(helm: str, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm_binary(helm), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=REPO,
    )


@dataclass(frozen=True)
class Render:
    text: str
    docs: tuple[dict[str, Any], ...]

    def kind(self, kind: str) -> dict[str, Any]:
        """The one object of this kind (for kinds the chart renders once)."""
        found = [doc for doc in self.docs if doc["kind"] == kind]
        assert len(found) == 1, f"expected one {kind}, rendered {len(found)}"
        return found[0]

    def object(self, identity: str) -> dict[str, Any]:
        """The object whose identity (see ``identities``) is this, e.g. "Pod-test"."""
        found = [
            doc for doc, name in zip(self.docs, identities(self), strict=True) if name == identity
        ]
        assert len(found) == 1, f"expected one {identity}, rendered {len(found)}"
        return found[0]

    def kinds(self) -> list[str]:
        return [doc["kind"] for doc in self.docs]


def template_args(
    values_files: Sequence[Path] = (),
    sets: Sequence[str] = (),
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    extra: Sequence[str] = (),
) -> list[str]:
    args = ["template", release, str(CHART), "--namespace", namespace, *extra]
    for path in values_files:
        args += ["--values", str(path)]
    for item in sets:
        args += ["--set", item]
    return args


@cache
def _render(helm: str, args: tuple[str, ...]) -> Render:
    result = run_helm(helm, args)
    assert result.returncode == 0, f"{helm} {' '.join(args)} failed:\n{result.stderr}"
    docs = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)
    return Render(result.stdout, docs)


def render(
    helm: str = "helm3",
    values_files: Sequence[Path] = (),
    sets: Sequence[str] = (),
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    extra: Sequence[str] = (),
) -> Render:
    """`helm template` of the chart (cached: the same arguments give one run)."""
    return _render(helm, tuple(template_args(values_files, sets, release, namespace, extra)))


def render_error(helm: str, sets: Sequence[str] = (), values_files: Sequence[Path] = ()) -> str:
    """The stderr of a `helm template` that must fail."""
    result = run_helm(helm, template_args(values_files, sets))
    assert result.returncode != 0, f"{helm} accepted {list(sets)}:\n{result.stdout[:2000]}"
    return result.stderr


MISSING = object()


def _flatten(node: object, path: str, out: dict[str, object]) -> None:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            _flatten(value, f"{path}.{key}", out)
    elif isinstance(node, list) and node:
        for index, value in enumerate(node):
            _flatten(value, f"{path}.{index}", out)
    else:
        out[path] = node


def identities(render: Render) -> list[str]:
    """A name for each object that stays the same when values rename objects:
    the kind followed by the part of the object's name after the DaemonSet's
    name ("ServiceAccount" for the agent's, "ServiceAccount-test", "Pod-test",
    "Pod-test-agents"), or "Kind/name" for a name of another form."""
    base = render.kind("DaemonSet")["metadata"]["name"]
    found = []
    for doc in render.docs:
        name = doc["metadata"]["name"]
        if name.startswith(base):
            found.append(doc["kind"] + name.removeprefix(base))
        else:
            found.append(f"{doc['kind']}/{name}")
    return found


def flatten(render: Render) -> dict[str, object]:
    """Every leaf as "Identity:dotted.path" -> value (see ``identities``)."""
    out: dict[str, object] = {}
    for doc, identity in zip(render.docs, identities(render), strict=True):
        for key, value in doc.items():
            _flatten(value, f"{identity}:{key}", out)
    return out


def changes(before: Render, after: Render) -> dict[str, object]:
    """The leaves that differ: path -> new value (MISSING when removed)."""
    old, new = flatten(before), flatten(after)
    return {
        path: new.get(path, MISSING)
        for path in sorted(old.keys() | new.keys())
        if old.get(path, MISSING) != new.get(path, MISSING)
    }


def agent_container(render: Render) -> dict[str, Any]:
    containers = render.kind("DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container
