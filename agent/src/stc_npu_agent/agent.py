"""The agent's lifecycle: serve, prove it answers, register, watch, re-register.

One plugin *instance* is a gRPC server on a socket whose name is unique to
it. Each registration gets a new instance, and the old one (with its
ListAndWatch stream) is ended first: kubelets 1.26+ key plugins by resource
name, and a late close of an old stream would cut off the new registration.

Re-registration has three triggers, combined because each alone is missed in
some setting: ``kubelet.sock`` made anew (a kubelet restart), our own socket
deleted (the kubelet cleans its dir on start), and the kubelet ending our
ListAndWatch stream. Every trigger sets one event, so a burst of them gives
one re-registration. Failures back off (50 ms doubling to 5 s), but a
``kubelet.sock`` other than the one the failed attempt used is a new kubelet
and is tried at once, however it was seen (before, during or after the
attempt). A 1 s tick is the safety net for all file system signals, the only
source when inotify cannot be had, and the heartbeat ``/healthz`` reads.

What an instance serves and how it registers come from the mode
(``modes.py``): with the plugin watcher (``registration.py``) the kubelet
finds the instance itself, so only the deletion of its socket calls for a
new one, and the kubelet's NotifyRegistrationStatus says when it is
registered.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from stc_npu_agent import events
from stc_npu_agent.claims import ClaimSource
from stc_npu_agent.core.allocation import Delivery
from stc_npu_agent.core.config import Config
from stc_npu_agent.core.devices import DeviceRules
from stc_npu_agent.core.health import signals_document
from stc_npu_agent.core.sharing import replica_ids
from stc_npu_agent.discovery import DeviceScanner, hpe_problem
from stc_npu_agent.modes import Services, plan_for
from stc_npu_agent.plugin import StreamTracker, allocation_document
from stc_npu_agent.registration import (
    CHANNEL_OPTIONS,
    KUBELET_SOCKET,
    RegisterCall,
    Registrar,
)
from stc_npu_agent.sinks import SinkSet
from stc_npu_agent.state import DeviceState
from stc_npu_agent.vendor_probe import health_sources
from stc_npu_agent.watch import DirectoryWatcher

if TYPE_CHECKING:
    from stc_npu_agent.kubeapi import KubeApi  # mode dra only: lightkube loads lazily

log = logging.getLogger(__name__)

SOCKET_PREFIX = "stc-npu."
SOCKET_SUFFIX = ".sock"

TICK_SECONDS = 1.0
# Device rescans without an event, when inotify works: a safety net only.
RESYNC_TICKS = 10
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 5.0
# Old kubelets only log a failed dial: without a stream by then, start over.
STREAM_DEADLINE = 10.0
STOP_GRACE = 0.5
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_UNIX_PATH = 107
# Exit status when the plugin dir this process sees is gone for good.
EXIT_PLUGIN_DIR_UNLINKED = 1


def socket_identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of a socket file: a new file differs even when the file
    system reuses the inode number. Not ctime: a chmod or chown of the same
    socket changes it, and would look like a kubelet restart."""
    try:
        info = path.stat()
    except OSError:
        return None
    if not stat.S_ISSOCK(info.st_mode):
        return None
    return (info.st_ino, info.st_mtime_ns)


def our_sockets(directory: Path, *, unpublished: bool = False) -> list[Path]:
    """The sockets of agents of ours in ``directory`` (``stc-npu.<id>.sock``;
    ``unpublished`` adds those still under their dot-name); none if unreadable."""
    try:
        names = [entry.name for entry in os.scandir(directory)]
    except OSError:
        return []
    return [
        directory / name
        for name in names
        if (name.removeprefix(".") if unpublished else name).startswith(SOCKET_PREFIX)
        and name.endswith(SOCKET_SUFFIX)
    ]


def unix_socket_state(path: Path) -> str:
    """'answers' (something accepts connections), 'refuses' (a stale socket),
    'missing', or 'unreachable' (any other error, e.g. a full backlog)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(str(path))
    except OSError as error:
        if error.errno == errno.ENOENT:
            return "missing"
        return "refuses" if error.errno == errno.ECONNREFUSED else "unreachable"
    finally:
        probe.close()
    return "answers"


class PluginInstance:
    """One gRPC server on one uniquely named socket, for one registration."""

    def __init__(
        self,
        registrar: Registrar,
        services: Services,
        state: DeviceState,
        on_lost: Callable[[], None],
    ) -> None:
        # Unique to this instance (the upstream sample uses dp.<unix time>);
        # hex keeps it short: a unix socket path has at most 107 bytes.
        self.name = f"{SOCKET_PREFIX}{time.time_ns():x}{SOCKET_SUFFIX}"
        self.path = registrar.socket_dir / self.name
        self.bind_path = registrar.bind_path(self.path)
        self.streams = StreamTracker(on_lost)
        self._state = state
        self._services = services
        # What sets the socket's dir, for an error an operator can act on.
        self._dir_setting = "pluginRegistryDir" if registrar.kubelet_finds_us else "--kubelet-dir"
        self._server = grpc.aio.server()
        services.add_to(self._server, self.streams)
        registrar.add_services(self._server, self.path)
        self.registered_at = 0.0

    async def start(self) -> None:
        longest = max((self.path, self.bind_path), key=lambda path: len(os.fsencode(path)))
        if len(os.fsencode(longest)) > MAX_UNIX_PATH:
            raise OSError(
                f"socket path {longest} is longer than {MAX_UNIX_PATH} bytes, the limit "
                f"for unix sockets: use a shorter {self._dir_setting}"
            )
        try:
            self._server.add_insecure_port(f"unix:{self.bind_path}")
        except RuntimeError:
            # grpc only says "Failed to bind" (the errno goes to its own log):
            # name the cause an operator can fix.
            raise RuntimeError(
                f"cannot create {self.path}: {_bind_problem(self.path.parent)}"
            ) from None
        await self._server.start()
        # Only the kubelet (root) needs the socket.
        os.chmod(self.bind_path, 0o600)
        # Prove it answers before telling the kubelet about it.
        async with grpc.aio.insecure_channel(f"unix:{self.bind_path}", CHANNEL_OPTIONS) as channel:
            await self._services.self_check(channel)

    async def close(self) -> None:
        self.streams.closing = True
        self._state.wake()  # streams waiting for a change see the close now
        # Gone from the kubelet's view before the server stops answering.
        for path in {self.path, self.bind_path}:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        await self._server.stop(STOP_GRACE)


class Agent:
    def __init__(
        self,
        kubelet_dir: str | Path,
        dev_dir: str | Path,
        sys_dir: str | Path,
        config: Config,
        *,
        node_name: str = "",
        claims: ClaimSource | None = None,
        api: KubeApi | None = None,
        hpe_dir: str | Path | None = None,
    ) -> None:
        self.kubelet_dir = Path(kubelet_dir)
        self.kubelet_socket = self.kubelet_dir / KUBELET_SOCKET
        self.config = config
        rules = DeviceRules(config.discovery)
        self.naming = rules.naming
        self.scanner = DeviceScanner(dev_dir, sys_dir, rules)
        # asyncio objects bind to the loop on first use (Python 3.10+), so
        # they can be made here, before run() starts the loop; the probes
        # may read the state from their thread before that.
        self.state = DeviceState(self.scanner, config.health)
        # Health sources beyond the scan (the vendor probe): tasks of run().
        self.sources = health_sources(self.state, config.health)
        # The mode's registration strategy, instance services and sinks (the
        # side effects that follow the inventory: the CDI spec, ...).
        plan = plan_for(
            config,
            self.state,
            kubelet_dir=self.kubelet_dir,
            sys_dir=Path(sys_dir),
            hpe_dir=Path(hpe_dir) if hpe_dir is not None else None,
            node_name=node_name or socket.gethostname(),
            claims=claims,
            api=api,
            on_status=self._on_registration_status,
            other_agent_serving=self._other_agent_serving,
        )
        self.registrar = plan.registrar
        self.services = plan.services
        self.sinks = SinkSet(plan.sinks)
        self.slices = plan.slices
        self.api = api
        self.watcher: DirectoryWatcher  # needs the loop: made in run()
        self.instance: PluginInstance | None = None
        self.registered = False
        self.registrations = 0
        # Beats when the tick has done its work: /healthz fails if it stops.
        self.heartbeat = time.monotonic()
        self.exit_code = 0
        self._registered_kubelet: tuple[int, int] | None = None
        # The kubelet.sock last seen: only a different one is "changed".
        self._seen_kubelet: tuple[int, int] | None = None
        self._stop = asyncio.Event()
        self._reregister = asyncio.Event()
        self._kubelet_changed = asyncio.Event()
        self._reason = ""
        self._cause = events.START  # of the next registration (a metric label)

    # --- what the probes read (from another thread: plain attribute reads) ---

    @property
    def ready(self) -> bool:
        instance = self.instance
        if not self.registered or instance is None:
            return False
        return instance.streams.open_streams > 0 or not self.services.ready_needs_stream

    def status(self) -> dict[str, object]:
        """The agent's view, including NPUs that vanished since it saw them."""
        instance = self.instance
        return {
            "mode": self.config.mode,
            "registration": self.registrar.name,
            "registered": self.registered,
            "ready": self.ready,
            "registrations": self.registrations,
            "socket": instance.name if instance is not None else None,
            "vendorProbe": self.state.probe_document(),
            "resourceName": self.config.advertised_resource,
            "replicas": self.config.sharing.replicas,
            # mode dra: the node's ResourceSlice (None in device-plugin mode)
            "resourceSlice": self.slices.status() if self.slices is not None else None,
            "npus": [
                {
                    "id": npu.id,
                    "health": npu.health,
                    "reason": npu.reason,
                    "signals": signals_document(npu.signals),
                    "expectedNodes": list(npu.expected_nodes),
                    "presentNodes": list(npu.present_nodes),
                    "numaNode": npu.numa_node,
                    "deviceIds": list(replica_ids(npu.id, self.config.sharing.replicas)),
                    "pci": {
                        "address": npu.pci.address,
                        "vendor": npu.pci.vendor,
                        "device": npu.pci.device,
                        "driver": npu.pci.driver,
                    },
                }
                for npu in self.state.inventory.ordered()
            ],
        }

    def allocation(self, ids: Sequence[str]) -> dict[str, object]:
        """What Allocate would answer for ``ids`` now (the probes' /allocate,
        for `diagnose --allocate`): reads only, no log line, no rescan."""
        return allocation_document(
            self.state.inventory,
            self.scanner,
            ids,
            self.config.hpe,
            Delivery.from_config(self.config),
            sharing=self.config.sharing,
        )

    # --- signals ---

    def request_reregister(self, reason: str, cause: str) -> None:
        if self._stop.is_set():
            return  # our own shutdown removes our socket and ends our streams
        if self.registered:
            log.info("re-registering: %s", reason)
        self.registered = False
        self._reason = self._reason or reason
        self._cause = self._cause or cause
        self._reregister.set()

    def stop(self) -> None:
        self._stop.set()

    def _on_kubelet_dir_event(self, names: set[str]) -> None:
        if (
            not names
            or KUBELET_SOCKET in names
            or (self.instance is not None and self.instance.name in names)
        ):
            self._check_sockets()

    def _on_dev_dir_event(self, names: set[str]) -> None:
        if not names or any(self.naming.classify(name) for name in names):
            self.state.schedule_rescan()

    def _check_sockets(self) -> None:
        """Compare the kubelet dir with what we registered against."""
        if self._stop.is_set():
            return
        kubelet = socket_identity(self.kubelet_socket)
        # Wakes whoever waits for a new kubelet.sock (they compare identities
        # themselves). Only on a change: the 1 s tick calls this too, and
        # waking for a socket that merely still exists capped every backoff
        # at 1 s (tests/reliability/test_plugin_dir_faults.py).
        if kubelet is not None and kubelet != self._seen_kubelet:
            self._kubelet_changed.set()
            self.state.events.kubelet_seen(kubelet)
        self._seen_kubelet = kubelet
        if self.instance is None or not (self.registered or self.registrar.kubelet_finds_us):
            return
        if self.registrar.kubelet_finds_us:
            # The kubelet finds the instance by its socket: nothing else counts.
            if not self.instance.path.exists():
                self.request_reregister(
                    f"own socket {self.instance.name} was deleted", events.SOCKET_DELETED
                )
        elif kubelet is None:
            self.request_reregister(
                f"{KUBELET_SOCKET} was removed (kubelet stopped)", events.KUBELET_STOPPED
            )
        elif kubelet != self._registered_kubelet:
            self.request_reregister(
                f"{KUBELET_SOCKET} was re-created (kubelet restart)", events.KUBELET_RESTART
            )
        elif not self.instance.path.exists():
            self.request_reregister(
                f"own socket {self.instance.name} was deleted", events.SOCKET_DELETED
            )

    def _on_stream_lost(self) -> None:
        if self.registrar.kubelet_finds_us:
            # A kubelet restart: the new kubelet finds the same socket and
            # opens a new stream (until then not Ready: no stream is open).
            log.info("the kubelet ended our stream: waiting for it to register us again")
            return
        self.request_reregister("the kubelet ended the ListAndWatch stream", events.STREAM_ENDED)

    def _on_registration_status(self, registered: bool, error: str) -> None:
        """NotifyRegistrationStatus from the kubelet's plugin watcher."""
        instance = self.instance
        if not registered:
            self.registered = False
            log.warning("the kubelet refused the registration: %s", error or "no reason given")
            return
        self.registered = True
        self.registrations += 1
        if instance is not None:
            instance.registered_at = time.monotonic()
        if self.slices is not None:
            # A starting kubelet deletes the slices of drivers it has not
            # registered yet: read ours back and put it right.
            self.slices.resync()
        log.info(
            "the kubelet registered %s (%s) as %s",
            self.config.advertised_resource,
            self.registrar.name,
            instance.name if instance is not None else "?",
        )

    # --- the loop ---

    async def run(self) -> int:
        """Serve until stopped; the process's exit status."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        log.info("effective config: %s", json.dumps(self.config.to_mapping(), sort_keys=True))
        sharing = self.config.sharing
        if sharing.shared:
            log.info(
                "sharing: each NPU is %d devices of %s (stc0::0 .. stc0::%d), each the whole "
                "NPU: no memory or fault isolation between the pods that share one",
                sharing.replicas,
                self.config.advertised_resource,
                sharing.replicas - 1,
            )
        self.state.rescan()
        self._log_inventory()
        self.sinks.update(self.state.inventory)  # before the first registration
        self.watcher = DirectoryWatcher(loop)
        self.watcher.add(self.scanner.dev_dir, self._on_dev_dir_event)
        self.watcher.add(self.kubelet_dir, self._on_kubelet_dir_event)
        if self.registrar.socket_dir != self.kubelet_dir:
            self.watcher.add(self.registrar.socket_dir, self._on_kubelet_dir_event)
        ticker = asyncio.create_task(self._tick())
        sources = [asyncio.create_task(source.run()) for source in self.sources]
        follower = asyncio.create_task(self.sinks.follow(self.state, TICK_SECONDS))
        try:
            await self._lifecycle()
        finally:
            ticker.cancel()
            follower.cancel()
            self.registered = False
            for task in sources:
                task.cancel()
            # A source ends its own runs (e.g. kills a running stc-smi).
            await asyncio.gather(*sources, return_exceptions=True)
            if self.instance is not None:
                await self.instance.close()
            # After our own socket is gone: any socket of ours that still
            # answers is another agent's.
            self.sinks.stop()
            if self.api is not None:
                await self.api.close()
            self.watcher.stop()
            log.info("stopped")
        return self.exit_code

    def _log_inventory(self) -> None:
        npus = self.state.inventory.ordered()
        if not npus:
            log.warning(
                "no NPUs found in %s (they are advertised when they appear)", self.scanner.dev_dir
            )
        for npu in npus:
            numa = "none" if npu.numa_node is None else npu.numa_node
            log.info(
                "found %s: %s, NUMA %s, PCI %s vendor %s, nodes %s%s",
                npu.id,
                npu.health,
                numa,
                npu.pci.address or "unknown",
                npu.pci.vendor or "unknown",
                ",".join(npu.present_nodes),
                f" ({npu.reason})" if npu.reason else "",
            )

    async def _lifecycle(self) -> None:
        failures = 0
        while not self._stop.is_set():
            if not self.registrar.kubelet_finds_us and not await self._wait_for_kubelet():
                return
            # Read before our socket exists: if this is a new kubelet's
            # socket, its start-up cleanup of the dir is already done.
            kubelet = socket_identity(self.kubelet_socket)
            if await self._register(kubelet):
                failures = 0
                if not await self._wait_for(self._reregister):
                    return
                continue
            failures += 1
            delay = min(BACKOFF_FIRST * 2 ** (failures - 1), BACKOFF_MAX)
            # A kubelet.sock other than the one this attempt used is a new
            # kubelet: try it at once, also when it appeared during the attempt.
            if not await self._kubelet_socket_other_than(kubelet, timeout=delay):
                return

    async def _wait_for(self, event: asyncio.Event, timeout: float | None = None) -> bool:
        """Wait for ``event`` (or the timeout); False when the agent is stopping."""
        waiters = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._stop.wait())}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return not self._stop.is_set()

    async def _wait_for_kubelet(self) -> bool:
        """Until kubelet.sock exists; False when the agent is stopping."""
        if socket_identity(self.kubelet_socket) is None:
            log.info("waiting for the kubelet: %s not found", self.kubelet_socket)
        return await self._kubelet_socket_other_than(None)

    async def _kubelet_socket_other_than(
        self, identity: tuple[int, int] | None, timeout: float | None = None
    ) -> bool:
        """Until kubelet.sock is a socket other than ``identity`` (or the
        timeout passed); False when the agent is stopping.

        The event is only a wake-up: it is cleared BEFORE the socket is
        looked at, so a change at any moment is either seen by the look or
        sets the event again; none is lost."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._stop.is_set():
            self._kubelet_changed.clear()
            current = socket_identity(self.kubelet_socket)
            if current is not None and current != identity:
                return True
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return True
            if not await self._wait_for(self._kubelet_changed, timeout=remaining):
                break
        return False

    async def _register(self, kubelet: tuple[int, int] | None) -> bool:
        """One attempt to register with the kubelet whose socket is ``kubelet``."""
        started = time.monotonic()
        reason, self._reason = self._reason, ""
        self._reregister.clear()
        old, self.instance = self.instance, None
        if old is not None:
            await old.close()
        # Each probe of a leftover socket may block (0.5 s): not on the loop.
        await asyncio.to_thread(self._remove_stale_sockets)
        instance = PluginInstance(self.registrar, self.services, self.state, self._on_stream_lost)

        async def await_answer(call: RegisterCall) -> None:
            await self._await_register(call, kubelet)

        try:
            await instance.start()
            if self.registrar.kubelet_finds_us:
                self.instance = instance  # the kubelet may call in at once
            await self.registrar.register(instance.path, await_answer)
        except (grpc.RpcError, OSError, RuntimeError) as error:
            log.warning("registration failed: %s", _describe_error(error))
            self.instance = None
            self.state.events.registration_failed()
            await instance.close()
            return False
        except Exception:
            # A defect, not a kubelet fault: say so with the traceback, and
            # keep the agent going (with backoff) rather than let it die.
            log.exception("registration failed unexpectedly")
            self.state.events.registration_failed()
            await instance.close()
            return False
        self.instance = instance
        self._registered_kubelet = kubelet
        if self.registrar.kubelet_finds_us:
            return True  # registered once the kubelet's NotifyRegistrationStatus says so
        self.registered = True
        self.registrations += 1
        instance.registered_at = time.monotonic()
        self.state.events.registered(self._cause, kubelet)
        self._cause = ""
        log.info(
            "registered %s with the kubelet as %s in %.1f ms%s",
            self.config.advertised_resource,
            instance.name,
            (instance.registered_at - started) * 1000,
            f" (after: {reason})" if reason else "",
        )
        # Anything that changed while we registered must still count.
        self._check_sockets()
        return True

    async def _await_register(self, call: RegisterCall, kubelet: tuple[int, int] | None) -> None:
        """Wait for Register, but give it up when a new kubelet.sock appears
        or the agent stops. A wedged kubelet, or a 1.26+ kubelet that started
        meanwhile (and deleted our socket) and now dials it for 10 s, would
        otherwise hold the agent for the whole REGISTER_TIMEOUT while the
        new kubelet waits for us (tests/reliability/test_plugin_dir_faults.py)."""
        answer = asyncio.ensure_future(call)
        replaced = asyncio.ensure_future(self._kubelet_socket_other_than(kubelet))
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({answer, replaced, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            replaced.cancel()
            stopping.cancel()
        if not answer.done():
            call.cancel()
            answer.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                await answer
            why = "the agent is stopping" if self._stop.is_set() else f"a new {KUBELET_SOCKET}"
            raise RuntimeError(f"Register given up for {why}")
        answer.result()

    def _remove_stale_sockets(self) -> None:
        """Delete our earlier sockets that nothing serves (e.g. after a SIGKILL).

        One that still answers belongs to a live agent (a rolling update's
        overlap): it is left alone, never fought over.
        """
        # Also a plugin-watcher socket left unpublished under its dot-name.
        for path in our_sockets(self.registrar.socket_dir, unpublished=True):
            if unix_socket_state(path) in ("refuses", "missing"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    log.info("removed stale socket %s", path.name)

    def _other_agent_serving(self) -> bool:
        """Whether a socket of ours other than this agent's answers in the kubelet dir."""
        own = self.instance.name if self.instance is not None else None
        return any(
            path.name != own and unix_socket_state(path) == "answers"
            for path in our_sockets(self.registrar.socket_dir)
        )

    async def _tick(self) -> None:
        """Run the periodic check every second, forever: a failure is logged
        (with its traceback) and the next tick tries again; the heartbeat
        only moves when a check completes, so /healthz fails if they stop."""
        ticks = 0
        failure = ""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            ticks += 1
            try:
                self._periodic_check(ticks)
            except Exception as error:
                if repr(error) == failure:
                    log.error("periodic check failed again: %s", error)
                else:
                    log.exception("periodic check failed (tried again every tick)")
                failure = repr(error)
                continue
            if failure:
                log.info("periodic check works again")
                failure = ""
            self.heartbeat = time.monotonic()

    def _periodic_check(self, ticks: int) -> None:
        if _unlinked(self.kubelet_dir):
            # A hostPath bind mount keeps showing a directory deleted on the
            # host; a new kubelet.sock in the new one never shows up here.
            log.error(
                "the plugin dir %s was deleted: this path shows the deleted directory "
                "(a bind mount of a dir made anew on the host); exiting so that a restart "
                "mounts the new one",
                self.kubelet_dir,
            )
            self.exit_code = EXIT_PLUGIN_DIR_UNLINKED
            self.stop()
            return
        self.watcher.ensure()
        self._check_sockets()
        polling = not self.watcher.watching(self.scanner.dev_dir)
        if polling or ticks % RESYNC_TICKS == 0:
            self.state.rescan()
        instance = self.instance
        if (
            self.registered
            and not self.registrar.kubelet_finds_us
            and instance is not None
            and instance.streams.opened_total == 0
            and time.monotonic() - instance.registered_at > STREAM_DEADLINE
        ):
            self.request_reregister(
                f"the kubelet opened no ListAndWatch stream within {STREAM_DEADLINE:.0f} s",
                events.NO_STREAM,
            )


def _unlinked(directory: Path) -> bool:
    """Whether ``directory`` resolves to a directory that was deleted (a
    mount point keeps it reachable): no links to it are left."""
    try:
        return os.stat(directory).st_nlink == 0
    except OSError:
        return False


def _bind_problem(directory: Path) -> str:
    """Why a socket cannot be made in ``directory`` (after a failed bind)."""
    if not directory.is_dir():
        return f"the plugin dir {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"the plugin dir {directory} is not writable (permission denied)"
    return "bind failed (the gRPC log line above has the reason)"


def _describe_error(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error)


def run(
    *,
    kubelet_dir: str,
    dev_dir: str,
    sys_dir: str,
    config: Config,
    probe_address: str | None = None,
    hpe_dir: str | None = None,
    node_name: str = "",
    api: KubeApi | None = None,
) -> int:
    """Run the agent until SIGTERM/SIGINT; 0 on a clean stop, non-zero when
    only a restart can help (the plugin dir unlinked). ``api``: mode dra's
    Kubernetes API (ResourceSlices, ResourceClaims)."""
    agent = Agent(
        kubelet_dir, dev_dir, sys_dir, config, hpe_dir=hpe_dir, node_name=node_name, api=api
    )
    log.info(
        "stc-npu-agent starting: kubelet dir %s, dev dir %s, sys dir %s",
        kubelet_dir,
        dev_dir,
        sys_dir,
    )
    # Operators fix the node, not the pod: warn, and keep serving.
    problem = hpe_problem(config, Path(hpe_dir or config.hpe.host_path))
    if problem:
        log.warning("%s", problem)
    probes = None
    if probe_address:
        from stc_npu_agent.probes import ProbeServer  # noqa: PLC0415

        probes = ProbeServer(probe_address, agent)
        if config.metrics.enabled:
            from stc_npu_agent.metrics import AgentSource, Metrics  # noqa: PLC0415 (only when used)

            metrics = Metrics()
            metrics.watch(AgentSource(agent))
            agent.state.events = metrics
            agent.state.observers.append(metrics)
            probes.routes["/metrics"] = metrics.scrape
        probes.start()
    elif config.metrics.enabled:
        log.warning("metrics.enabled, but no probe address: /metrics is not served")
    try:
        return asyncio.run(agent.run())
    finally:
        if probes is not None:
            probes.stop()
