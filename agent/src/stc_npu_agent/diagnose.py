"""`stc-npu-agent diagnose`: what the agent sees on this node, for an operator.

Reads the same flags and config as the agent (in the pod, the same
environment), scans the devices with the same code, and asks the sockets in
the kubelet dir whether they answer. Where the probe address is known, the
running agent's own view wins: its /status (it remembers NPUs that vanished)
and its /allocate, the very answer its Allocate would give now; without it,
a one-shot scan stands in, and the report says which it is. It never opens a
ListAndWatch stream on the running agent: closing it would look like the
kubelet leaving.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from stc_npu_agent import __version__
from stc_npu_agent.agent import KUBELET_SOCKET, SOCKET_PREFIX, unix_socket_state
from stc_npu_agent.core.allocation import Delivery, spec_file_name
from stc_npu_agent.core.config import Config
from stc_npu_agent.core.devices import DeviceRules, Inventory, PciInfo
from stc_npu_agent.core.health import SIGNALS, signals_document
from stc_npu_agent.discovery import DeviceScanner, hpe_problem
from stc_npu_agent.plugin import allocation_document
from stc_npu_agent.probes import parse_address
from stc_npu_agent.v1beta1 import api_pb2, api_pb2_grpc

STC_PCI_VENDOR = "0x23e2"


@dataclass(frozen=True)
class Paths:
    kubelet_dir: Path
    dev_dir: Path
    sys_dir: Path
    hpe_dir: Path  # where this process sees the host's hpe.hostPath
    probe_address: str | None


def _plugin_options(path: Path) -> dict[str, bool] | None:
    try:
        with grpc.insecure_channel(f"unix:{path}") as channel:
            options = api_pb2_grpc.DevicePluginStub(channel).GetDevicePluginOptions(
                api_pb2.Empty(), timeout=2.0
            )
    except grpc.RpcError:
        return None
    return {
        "preStartRequired": options.pre_start_required,
        "getPreferredAllocationAvailable": options.get_preferred_allocation_available,
    }


def _probe_url(probe_address: str) -> str:
    host, port = parse_address(probe_address)
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 (a bind-all address is reached locally)
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _get_json(url: str) -> tuple[dict[str, Any] | None, str]:
    """The JSON document at ``url``, and where it came from or why there is none."""
    try:
        # Always an http:// URL made from the probe address (_probe_url).
        with urllib.request.urlopen(url, timeout=2.0) as response:  # noqa: S310
            document: dict[str, Any] = json.loads(response.read())
    except (OSError, ValueError) as error:
        return None, f"the agent's probe at {url} did not answer ({error})"
    return document, f"from {url}"


def _agent_status(probe_address: str | None) -> tuple[dict[str, Any] | None, str]:
    """The running agent's own view from its /status endpoint, and where it came from."""
    if not probe_address:
        return None, "no probe address configured (--probe-address)"
    return _get_json(f"{_probe_url(probe_address)}/status")


def _cdi_problems(config: Config) -> list[str]:
    if not config.uses_cdi:
        return []
    spec = Path(config.cdi.spec_dir) / spec_file_name(config.resource_name)
    if spec.is_file():
        return []
    return [
        f"deviceListStrategy has cdi-cri but the CDI spec {spec} is missing: "
        "containers given CDI names cannot start"
    ]


def _allocation(
    device_id: str,
    agent: tuple[str, str] | None,
    inventory: Inventory,
    scanner: DeviceScanner,
    config: Config,
) -> dict[str, Any]:
    """The Allocate answer for ``device_id``: the running agent's own where it
    answers (``agent`` is its probe URL and why it is used, or None and why
    not), else the same code on a one-shot scan. Says which, and why."""
    why_not = "no probe address configured (--probe-address)"
    if agent is not None:
        query = urllib.parse.urlencode({"id": device_id})
        answer, detail = _get_json(f"{agent[0]}/allocate?{query}")
        if answer is not None:
            return {**answer, "source": "agent", "sourceDetail": detail}
        why_not = detail
    answer = allocation_document(
        inventory,
        scanner,
        [device_id],
        config.hpe,
        Delivery.from_config(config),
        sharing=config.sharing,
    )
    return {**answer, "source": "scan", "sourceDetail": why_not}


def _npu_entries(
    inventory: Inventory, agent_view: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """One entry per NPU known to the scan or to the agent, in index order."""
    entries = []
    unknown_index = 1 << 30
    for device_id in sorted(
        set(inventory.npus) | set(agent_view),
        key=lambda i: (inventory.npus[i].index if i in inventory.npus else unknown_index, i),
    ):
        local = inventory.get(device_id)
        seen = agent_view.get(device_id)
        if seen is not None:
            health, reason, numa = seen["health"], seen["reason"], seen["numaNode"]
            expected, present = seen["expectedNodes"], set(seen["presentNodes"])
            signals = seen.get("signals", {})
        elif local is not None:
            health, reason, numa = local.health, local.reason, local.numa_node
            expected, present = list(local.expected_nodes), set(local.present_nodes)
            signals = signals_document(local.signals)
        else:
            continue
        # The agent remembers the PCI facts of an NPU that vanished.
        remembered = PciInfo(**seen["pci"]) if seen is not None and "pci" in seen else PciInfo()
        pci = local.pci if local is not None else remembered
        entries.append(
            {
                "id": device_id,
                "health": health,
                "reason": reason,
                "signals": signals,
                "source": "agent" if seen is not None else "scan",
                "nodes": [{"name": name, "present": name in present} for name in expected],
                "numaNode": numa,
                "pci": {
                    "address": pci.address,
                    "vendor": pci.vendor,
                    "device": pci.device,
                    "driver": pci.driver,
                    "isStreamComputing": pci.vendor == STC_PCI_VENDOR,
                },
            }
        )
    return entries


def collect(paths: Paths, config: Config, allocate: Sequence[str] = ()) -> dict[str, Any]:
    """Everything diagnose reports, as plain data (the JSON output)."""
    rules = DeviceRules(config.discovery)
    scanner = DeviceScanner(paths.dev_dir, paths.sys_dir, rules)
    inventory = Inventory().updated(scanner.scan(), rules)
    problems: list[str] = []
    if not paths.dev_dir.is_dir():
        problems.append(f"device dir {paths.dev_dir} does not exist")
    elif not inventory.npus:
        problems.append(f"no NPU device nodes in {paths.dev_dir}")

    # The running agent remembers nodes that have vanished; a one-shot scan
    # cannot, so the agent's view wins where it can be had.
    status, status_detail = _agent_status(paths.probe_address)
    npus = _npu_entries(inventory, {npu["id"]: npu for npu in status["npus"]} if status else {})
    # Impostors (another vendor, driver or device) are named in the reason.
    for entry in npus:
        if entry["health"] != "Healthy":
            problems.append(f"{entry['id']} is Unhealthy: {entry['reason']}")

    kubelet_state = unix_socket_state(paths.kubelet_dir / KUBELET_SOCKET)
    if kubelet_state != "answers":
        problems.append(f"{KUBELET_SOCKET} in {paths.kubelet_dir}: {kubelet_state}")
    own = []
    if paths.kubelet_dir.is_dir():
        for path in sorted(paths.kubelet_dir.iterdir()):
            if path.name.startswith(SOCKET_PREFIX):
                state = unix_socket_state(path)
                own.append(
                    {
                        "name": path.name,
                        "state": state,
                        "options": _plugin_options(path) if state == "answers" else None,
                    }
                )
    if not any(sock["state"] == "answers" for sock in own):
        problems.append(f"no agent socket answers in {paths.kubelet_dir}")
    agent = (
        (_probe_url(paths.probe_address), status_detail) if status and paths.probe_address else None
    )
    registered = bool(status["ready"]) if status else None
    if registered is False:
        problems.append("the agent is not registered with the kubelet (or has no stream)")

    hpe = hpe_problem(config, paths.hpe_dir)
    if hpe:
        problems.append(hpe)
    problems += _cdi_problems(config)

    return {
        "version": __version__,
        "config": config.to_mapping(),
        # The resource registered with the kubelet (renamed when shared).
        "resource": config.advertised_resource,
        "paths": {
            "kubeletDir": str(paths.kubelet_dir),
            "devDir": str(paths.dev_dir),
            "sysDir": str(paths.sys_dir),
            "hpeDir": str(paths.hpe_dir),
        },
        "npus": npus,
        "kubelet": {
            "socket": kubelet_state,
            # Kubelets 1.18-1.25 write this file on every start; 1.26+ do not.
            "deprecationFile": (paths.kubelet_dir / "DEPRECATION").exists(),
        },
        "agent": {
            "sockets": own,
            "registered": registered,
            "registeredDetail": status_detail,
            "vendorProbe": status.get("vendorProbe") if status else None,
        },
        "hpe": {"mode": config.hpe.mode, "hostPath": config.hpe.host_path, "problem": hpe},
        "allocate": {
            device_id: _allocation(device_id, agent, inventory, scanner, config)
            for device_id in allocate
        },
        "problems": problems,
    }


def render_text(report: dict[str, Any]) -> str:
    lines = [f"stc-npu-agent {report['version']} diagnose", ""]
    paths = report["paths"]
    lines.append(
        f"paths: kubelet {paths['kubeletDir']}, devices {paths['devDir']}, sysfs {paths['sysDir']}"
    )
    config = report["config"]
    hpe = report["hpe"]
    lines.append(
        f"resource {config['resourceName']}, HPE {hpe['mode']} "
        f"({config['hpe']['hostPath']} -> {config['hpe']['containerPath']})"
    )
    sharing = config["sharing"]
    if sharing["replicas"] > 1:
        lines.append(
            f"sharing: {sharing['replicas']} replicas per NPU (<npu>::0 .. "
            f"<npu>::{sharing['replicas'] - 1}) as {report['resource']}"
            + (", one per container" if sharing["failRequestsGreaterThanOne"] else "")
        )
    lines += ["", f"NPUs ({len(report['npus'])}):"]
    for npu in report["npus"]:
        numa = "none" if npu["numaNode"] is None else npu["numaNode"]
        pci = npu["pci"]
        lines.append(
            f"  {npu['id']:<6} {npu['health']:<9} NUMA {numa}  PCI {pci['address'] or '?'} "
            f"vendor {pci['vendor'] or '?'} device {pci['device'] or '?'} "
            f"driver {pci['driver'] or 'none'}"
        )
        nodes = " ".join(n["name"] if n["present"] else f"!{n['name']}" for n in npu["nodes"])
        lines.append(f"         nodes: {nodes}")
        if npu["reason"]:
            lines.append(f"         why: {npu['reason']}")
        if npu["signals"]:
            lines.append(f"         signals: {_render_signals(npu['signals'])}")
    kubelet = report["kubelet"]
    generation = (
        "1.18-1.25 (DEPRECATION file)" if kubelet["deprecationFile"] else "1.26+ or unknown"
    )
    lines += ["", f"kubelet.sock: {kubelet['socket']}; kubelet generation: {generation}"]
    agent = report["agent"]
    for sock in agent["sockets"]:
        lines.append(f"agent socket {sock['name']}: {sock['state']}")
    if not agent["sockets"]:
        lines.append("agent socket: none")
    registered = {True: "yes", False: "no", None: "unknown"}[agent["registered"]]
    lines.append(f"registered: {registered} ({agent['registeredDetail']})")
    lines.append(_vendor_probe_line(agent["vendorProbe"]))
    for device_id, answer in report["allocate"].items():
        lines += ["", *_render_allocation(device_id, answer)]
    lines.append("")
    if report["problems"]:
        lines.append(f"problems ({len(report['problems'])}):")
        lines += [f"  - {problem}" for problem in report["problems"]]
    else:
        lines.append("no problems found")
    return "\n".join(lines) + "\n"


def _render_signals(signals: dict[str, dict[str, Any]]) -> str:
    """``presence ok, cardStatus BAD (off), temperature bad, ignored (...)``."""
    parts = []
    rank = {name: position for position, name in enumerate(SIGNALS)}
    for name, signal in sorted(signals.items(), key=lambda item: rank.get(item[0], len(rank))):
        text = f"{name} {'BAD' if signal['counts'] else signal['state']}"
        if signal["ignored"]:
            text += ", ignored"
        if signal["state"] == "bad" or signal["streak"]:
            text += f" ({signal['value']}"
            if signal["streak"]:
                text += f"; {signal['streak']} of {signal['needed']} readings to change"
            text += ")"
        parts.append(text)
    return ", ".join(parts)


def _vendor_probe_line(probe: dict[str, Any] | None) -> str:
    if probe is None:
        return "vendor probe: off, or no run yet (only the running agent has it)"
    failed = ", ".join(probe["lastRunFailed"]) or "none"
    success = probe["lastSuccessAt"]
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(success)) if success else "never"
    return (
        f"vendor probe: last run {probe['lastRunSeconds'] * 1000:.0f} ms, failed: {failed}; "
        f"last fully successful run {when}"
    )


def _render_allocation(device_id: str, answer: dict[str, Any]) -> list[str]:
    if answer["source"] == "agent":
        source = f"answered by the running agent ({answer['sourceDetail']})"
    else:
        source = f"would answer, by a one-shot scan ({answer['sourceDetail']})"
    lines = [f"Allocate [{device_id}] {source}:"]
    if "error" in answer:
        lines.append(f"  error {answer['error']['code']}: {answer['error']['message']}")
        return lines
    for device in answer["devices"]:
        host, container = device["hostPath"], device["containerPath"]
        lines.append(f"  device {host} -> {container} ({device['permissions']})")
    for mount in answer["mounts"]:
        mode = "read-only" if mount["readOnly"] else "read-write"
        lines.append(f"  mount  {mount['hostPath']} -> {mount['containerPath']} ({mode})")
    for key, value in sorted(answer["envs"].items()):
        lines.append(f"  env    {key}={value}")
    lines += [f"  cdi    {name}" for name in answer.get("cdiDevices", [])]
    return lines


def run_diagnose(paths: Paths, config: Config, allocate: Sequence[str], as_json: bool) -> int:
    """Print the report; exit 0 when nothing is wrong, 1 when problems were found."""
    report = collect(paths, config, allocate)
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render_text(report), end="")
    return 1 if report["problems"] else 0
