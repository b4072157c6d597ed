"""Registration through the kubelet's plugin watcher on the real v1.36 node
(chart value registration=plugin-watcher), in order: install (the agent's
socket appears in the kubelet's plugins_registry, none in the device-plugin
dir, and the kubelet registers the resource from it), a pod gets its NPU
through that registration, kubelet restarts (the new kubelet finds the
socket by itself; running pods untouched), and uninstall (the socket goes,
the kubelet deregisters the plugin, allocatable 0).

Runs after the other v1.36 scenarios (file order; the restricted namespace
is there, nothing of ours is installed) and before test_2_old_kubelet.py
stops the v1.36 kubelet; it leaves nothing installed. Waits are generous;
durations are reported, never asserted.
"""

from __future__ import annotations

import time
from datetime import datetime
from functools import partial

import pytest
from ci.e2e import transcript
from ci.e2e.cluster import wait_for

from stc_npu_agent.agent import SOCKET_PREFIX
from tests.e2e import kit
from tests.e2e.conftest import E2E, RESOURCE
from tests.e2e.test_1_current_kubelet import (
    IMAGES,
    RESTRICTED_NS,
    agent_logs,
    apply_example,
    check_pod_view,
    delete_example_pods,
    install,
    our_sockets,
    restart_kubelet,
    running_pods,
    uninstall,
)

pytestmark = pytest.mark.timeout(900)

REGISTRATION = "plugin-watcher"
HELM = "helm4"
KUBELET_RESTARTS = 2
# The kubelet's own log lines (--v=2): its plugin watcher starting on
# plugins_registry, the device manager taking a plugin from it, and letting
# it go when its socket is removed.
WATCHER_START = "Plugin Watcher Start"
REGISTERING = "Registering plugin at endpoint"
DEREGISTERING = "Deregistering plugin"


def registry_sockets(e2e: E2E) -> list[str]:
    """The agent's sockets in the kubelet's plugins_registry, published or
    not (an unpublished one is a dot-name the watcher ignores)."""
    registry = e2e.cluster.plugin_registry_dir
    if not registry.is_dir():
        return []
    return sorted(
        p.name for p in registry.iterdir() if p.name.removeprefix(".").startswith(SOCKET_PREFIX)
    )


def registered_endpoint(e2e: E2E, pid: int, after: datetime | None = None) -> kit.LogLine:
    """The kubelet's line registering our resource from the plugin watcher."""
    return kit.first_line(kit.kubelet_log(pid), REGISTERING, RESOURCE, after=after)


def test_plugin_watcher_install_registers_through_plugins_registry(e2e: E2E) -> None:
    started = datetime.now()
    install(e2e, HELM, registration=REGISTRATION)
    sockets = registry_sockets(e2e)
    assert len(sockets) == 1, f"expected one published socket in plugins_registry: {sockets}"
    assert not sockets[0].startswith("."), f"the socket was never published: {sockets}"
    assert our_sockets() == [], "plugin-watcher mode must put no socket in the device-plugin dir"
    line = kit.wait_result(
        partial(registered_endpoint, e2e, e2e.cluster.kubelet_pid(), None),
        "the kubelet's log to show it registering our plugin",
    )
    assert str(e2e.cluster.plugin_registry_dir / sockets[0]) in line.text, line.text
    assert line.at >= started.replace(microsecond=0), f"an older registration: {line}"
    transcript.say(f"  kubelet: {line.text[:300]}")
    registered = [line for line in agent_logs(e2e).splitlines() if "the kubelet registered" in line]
    assert registered, "the agent's log has no registration line"
    assert f"({REGISTRATION})" in registered[-1], registered[-1]
    transcript.say(f"  agent: {registered[-1]}")


def test_a_pod_gets_its_npu_through_the_plugin_watcher_registration(e2e: E2E) -> None:
    example = IMAGES / "pod-mapped" / "example-pod-2npu.yaml"
    with transcript.step(f"example pod {example.parent.name}/{example.name} (2 NPUs)"):
        name, took = apply_example(e2e, example, RESTRICTED_NS)
        transcript.figure(f"{REGISTRATION}: pod start {example.name}", took)
        npu_ids = check_pod_view(e2e, RESTRICTED_NS, name, 2, hpe_mounted=True)
        transcript.say(f"  {name}: STC_NPU_DEVICES={','.join(npu_ids)}")


def test_kubelet_restarts_find_the_socket_again(e2e: E2E) -> None:
    before = running_pods(e2e)
    assert before, "the example pod should be running"
    socket = registry_sockets(e2e)
    for restart in range(1, KUBELET_RESTARTS + 1):
        with transcript.step(f"{REGISTRATION}: kubelet restart {restart}/{KUBELET_RESTARTS}"):
            restart_kubelet(
                e2e,
                f"{REGISTRATION}: kubelet restart {restart}: watcher start -> plugin registered",
                WATCHER_START,
                REGISTERING,
            )
        # The agent only kept serving: the same socket, no new one.
        assert registry_sockets(e2e) == socket, f"{socket} -> {registry_sockets(e2e)}"
        after = running_pods(e2e)
        assert after == before, f"pods changed across the restart: {before} -> {after}"
    lines = [line for line in agent_logs(e2e).splitlines() if "the kubelet registered" in line]
    assert len(lines) >= KUBELET_RESTARTS + 1, f"registrations in the agent's log: {lines}"
    for line in lines[-KUBELET_RESTARTS:]:
        transcript.say(f"  agent: {line}")


def test_uninstall_removes_the_socket_and_the_kubelet_lets_the_plugin_go(e2e: E2E) -> None:
    with transcript.step("delete the example pod"):
        delete_example_pods(e2e)
    started = datetime.now()
    begun = time.monotonic()
    uninstall(e2e, HELM)
    with transcript.step("no socket of ours in plugins_registry; the kubelet deregistered it"):
        wait_for(lambda: not registry_sockets(e2e), "no socket of ours in plugins_registry")
        line = kit.wait_result(
            lambda: kit.first_line(
                kit.kubelet_log(e2e.cluster.kubelet_pid()),
                DEREGISTERING,
                RESOURCE,
                after=started.replace(microsecond=0),
            ),
            "the kubelet's log to show it deregistering our plugin",
        )
        transcript.say(f"  kubelet: {line.text[:300]}")
    transcript.figure(f"{REGISTRATION}: uninstall -> socket gone, deregistered", kit.since(begun))
