"""`make demo`: the real agent on a simulated 4-NPU node, driven by the kubelet emulator.

Prints a transcript of what the agent does: registration, the advertised
devices with their NUMA nodes, an Allocate response, an unplug turning an NPU
Unhealthy and back, a kubelet restart and the re-registration time. Cleans
up and exits 0; any step that does not happen fails the demo (exit 1).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stc_npu_agent.testing.kubelet import KubeletEmulator
from stc_npu_agent.testing.simnode import SimNode

RESOURCE = "streamcomputing.com/npu"
NUMA_OF = {0: 0, 1: 0, 2: 1, 3: 1}


def say(who: str, text: str) -> None:
    print(f"[{who:>7}] {text}", flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def show_devices(kubelet: KubeletEmulator) -> None:
    for device_id, device in sorted(kubelet.devices(RESOURCE).items()):
        numa = ",".join(map(str, device.numa_nodes)) or "none"
        say("kubelet", f"  {device_id:<5} {device.health:<9} NUMA {numa}")
    say(
        "kubelet",
        f"  allocatable {kubelet.allocatable(RESOURCE)}, capacity {kubelet.capacity(RESOURCE)}",
    )


def show_allocation(kubelet: KubeletEmulator) -> None:
    response = kubelet.allocate(RESOURCE, ["stc1"])
    say("kubelet", "Allocate [stc1] ->")
    for spec in response.devices:
        say(
            "kubelet",
            f"  device {spec.host_path} -> {spec.container_path} ({spec.permissions})",
        )
    for mount in response.mounts:
        mode = "read-only" if mount.read_only else "read-write"
        say("kubelet", f"  mount  {mount.host_path} -> {mount.container_path} ({mode})")
    for key, value in sorted(response.envs.items()):
        say("kubelet", f"  env    {key}={value}")

    preferred = kubelet.get_preferred_allocation(RESOURCE, ["stc3", "stc0", "stc2", "stc1"], [], 2)
    say("kubelet", f"GetPreferredAllocation 2 of 4 -> {preferred} (one NUMA node)")


def show_unplug(node: SimNode, kubelet: KubeletEmulator) -> None:
    unplugged = time.monotonic()
    node.unplug(2)
    say("node", "hot-unplug NPU 2 (its six device nodes vanish)")
    kubelet.wait_until(
        lambda: not kubelet.devices(RESOURCE)["stc2"].healthy, timeout=10, what="stc2 down"
    )
    say("kubelet", f"stc2 Unhealthy after {ms(time.monotonic() - unplugged)}:")
    show_devices(kubelet)
    replugged = time.monotonic()
    node.replug(2)
    say("node", "replug NPU 2")
    kubelet.wait_until(
        lambda: kubelet.devices(RESOURCE)["stc2"].healthy, timeout=10, what="stc2 back"
    )
    say("kubelet", f"stc2 Healthy again after {ms(time.monotonic() - replugged)}")


def show_restart(kubelet: KubeletEmulator) -> None:
    count = len(kubelet.registrations)
    kubelet.stop()
    say("kubelet", "kubelet stopped; restarting (it deletes every plugin socket)")
    restarted = time.monotonic()
    kubelet.start()
    again = kubelet.wait_registered(RESOURCE, after=count, timeout=15)
    say(
        "kubelet",
        f"re-registered {ms(again.received_at - restarted)} after the kubelet started, "
        f"new socket {again.endpoint}",
    )
    show_devices(kubelet)


def demo(root: Path) -> None:
    node = SimNode(root / "node")
    for index, numa in NUMA_OF.items():
        node.add_npu(index, numa_node=numa)
    names = " ".join(node.node_names(0))
    say("node", f"4 NPUs (NUMA 0,0,1,1), e.g. NPU 0 has {names}")
    say("node", f"char devices under {node.dev_dir}, sysfs under {node.sys_dir}")

    kubelet_dir = root / "device-plugins"
    kubelet = KubeletEmulator(kubelet_dir, version="1.32")
    kubelet.start()
    say("kubelet", f"emulated kubelet 1.32 serving {kubelet_dir}/kubelet.sock")
    log_path = root / "agent.log"
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        agent = subprocess.Popen(
            [
                sys.executable, "-m", "stc_npu_agent",
                "--kubelet-dir", str(kubelet_dir),
                "--dev-dir", str(node.dev_dir),
                "--sys-dir", str(node.sys_dir),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        say("agent", f"stc-npu-agent started (pid {agent.pid})")
        registration = kubelet.wait_registered(RESOURCE, timeout=15)
        say(
            "kubelet",
            f"Register {registration.resource_name} {registration.version} from "
            f"{registration.endpoint}, "
            f"{ms(registration.received_at - started)} after process start",
        )
        options = kubelet.options(RESOURCE)
        say(
            "kubelet",
            f"  GetDevicePluginOptions: preferred allocation "
            f"{'yes' if options.get_preferred_allocation_available else 'no'}, "
            f"pre-start {'yes' if options.pre_start_required else 'no'}",
        )
        say("kubelet", "ListAndWatch:")
        show_devices(kubelet)

        show_allocation(kubelet)
        show_unplug(node, kubelet)
        show_restart(kubelet)
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(15)
        left = sorted(p.name for p in kubelet_dir.glob("stc-npu.*.sock"))
        say("agent", f"SIGTERM -> exit {code}, own sockets left: {left or 'none'}")
        kubelet.close()
        print("\n--- the agent's own log ---")
        print(log_path.read_text(errors="replace").rstrip())
    if code != 0 or left:
        raise SystemExit(1)


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="stc-npu-demo-"))
    try:
        demo(root)
    except (TimeoutError, AssertionError) as error:
        print(f"demo failed: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\ndemo finished: the agent registered, served, followed the devices and the kubelet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
