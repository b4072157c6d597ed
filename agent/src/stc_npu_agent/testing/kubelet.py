"""A kubelet device-manager emulator for tests, both API generations.

Follows docs ``kubelet-device-plugins.md`` (facts read from the kubelet's
``pkg/kubelet/cm/devicemanager``). Real gRPC over unix sockets, in threads;
driven from synchronous test code; every method is thread-safe.

What is emulated
----------------
* ``start``: mkdir the plugin dir, clean it, serve ``Registration`` on
  ``kubelet.sock``; old generation (1.18-1.25) then creates an empty
  ``DEPRECATION`` file on every start, 1.26+ do not. The cleanup deletes
  every non-directory entry except ``kubelet_internal_checkpoint`` up to
  1.30, and only sockets from 1.31 on (a regular file such as an old
  ``DEPRECATION`` stays); ``stat`` follows symlinks, and entries whose
  ``stat`` fails (dangling symlinks) are left alone, like the kubelet's.
* ``Register``: version must be ``v1beta1`` and the resource name an extended
  resource name, else gRPC UNKNOWN (texts as the kubelet's). The endpoint is
  joined to the plugin dir, not validated.
  - old generation: answers at once; a background thread dials (blocking, up
    to ``dial_timeout``) and takes the options from ``RegisterRequest``; a
    failed dial is only recorded: ``registrations[i].error`` is set while
    ``accepted`` stays True (Register did succeed).
  - new generation: dials BEFORE answering (blocking, ``dial_timeout``, 10 s
    like the kubelet), calls ``GetDevicePluginOptions`` and uses only its
    answer; a failed dial or options call fails Register (UNKNOWN) and the
    registration is recorded with ``accepted=False``.
* ``ListAndWatch``: opened once per successful registration, consumed in a
  thread; every message replaces the device list and is recorded in
  ``updates``; never reopened. When the stream of the current registration
  ends, every device turns ``Unhealthy`` (allocatable 0, capacity kept) and
  the endpoint counts as stopped (``allocate`` refuses) until a new Register.
* Re-registration of a resource (keyed by resource name, socket name does not
  matter), 1.18 to 1.37 alike: the new registration becomes the endpoint
  (``allocate``, ``options``), but the kubelet does NOT end the old stream
  nor close its connection. The old stream stays open, and every message it
  sends still replaces the resource's device list (the kubelet's update
  callback goes by resource name). When a superseded stream ends, its
  connection is closed and, without the bug below, nothing else happens.
  - ``reregistration_bug=True`` (1.26+ only, kubernetes/kubernetes #121994,
    #127803, fixed by PR #135437): 1.26+ keep a client per resource name,
    replaced when a Register ARRIVES (before the dial), and deleted when that
    Register's dial fails. Whenever ANY stream of the resource ends, the
    kubelet disconnects whatever client the name maps to at that moment:
    all devices Unhealthy (allocatable 0), that client's connection closed,
    the name unmapped, and its endpoint, if installed, stopped and forgotten
    (``allocate`` refuses, ``options`` raises KeyError). So a superseded stream that ends
    after a new Register arrived cuts off the NEW registration (counted in
    ``cut_offs()`` when it was already installed); a plugin that keeps its
    old stream open while it registers anew is cut off as soon as the old
    one ends. The defence that works: end the old stream, then register.
    (A stream ending while the name maps to no client changes nothing, not
    even for the current registration: the kubelet's own behaviour.)
* Checkpoint ``kubelet_internal_checkpoint``: JSON ``{"Data":
  {"RegisteredDevices": {resource: [healthy ids]}, "PodDeviceEntries":
  [{"ResourceName", "DeviceIDs"}]}}``, same shape as the kubelet's but
  without pods/containers/checksum; written on every device list change and
  every successful ``allocate``; survives restarts. After a (re)start a
  resource from the checkpoint is listed (``resources()``) with capacity 0
  and allocatable 0 until its plugin registers again: this follows the
  kubelet source and the 1.32 observation in the reference ("capacity 0 until
  the plugin registers again"; the kubelet's own comment: "so that the
  resource capacity will stay zero till the corresponding device plugin
  re-registers"), not the looser summary "show capacity but 0 allocatable".
* ``stop``: stops the server, cancels the streams, forgets the in-memory
  device state (the kubelet process is gone) and, like every real kubelet
  on every stop, graceful or not, leaves ``kubelet.sock`` behind: the same
  file, now stale (connecting is refused), until the next start removes it
  and listens anew. ``crash=True`` is only recorded in the event log.

Fault injection (not kubelet behaviour; for reliability tests)
--------------------------------------------------------------
* ``stop(hang=True)``: leaves a ``kubelet.sock`` that LISTENS but never
  accepts or answers (a wedged kubelet): connects succeed (the kernel queues
  them), every RPC waits for its deadline. The next ``start`` removes it.
  ``hung_connections_pending()`` tells whether a connect waits there (a
  client's call is in flight).
* ``fail_register(text)``: every Register is refused with gRPC UNKNOWN and
  ``text`` (recorded with ``accepted=False``) until ``fail_register(None)``.
* ``events()`` (the emulator's event log), ``cut_offs()`` (how often the
  emulated re-registration bug cut off a registration) and
  ``open_streams()`` (streams still open, superseded ones included), to
  assert on.
* ``allocate`` / ``get_preferred_allocation`` / ``pre_start_container``: real
  calls over the registered endpoint's connection, one container request,
  only ``container_responses[0]`` returned; no deadline unless the caller
  passes ``timeout`` (the kubelet sets none).

Not emulated (deliberately)
---------------------------
* Dropping a resource 5 minutes after its stream ended / after a restart.
* The kubelet's own filtering: ``allocate`` sends whatever IDs it is given
  (unknown, unhealthy, in use) so tests can exercise a plugin's defences, and
  ``get_preferred_allocation`` returns the plugin's raw answer (the kubelet
  would intersect it with ``available`` and fall back to its own pick).
* The plugin-watcher path (``plugins_registry``), topology manager, pods.

Observation history (``registrations``, ``updates``) spans restarts; the
registration index is the position in ``registrations``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Literal

import grpc

from stc_npu_agent.v1beta1 import api_pb2, api_pb2_grpc

log = logging.getLogger(__name__)

Generation = Literal["old", "new"]

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
CHECKPOINT_FILE = "kubelet_internal_checkpoint"
DEPRECATION_FILE = "DEPRECATION"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"

# Generations by kubelet minor version (major 1).
_OLDEST_MINOR = 18
_LAST_OLD_MINOR = 25
# From 1.31 the start-up cleanup deletes sockets only.
_FIRST_SOCKETS_ONLY_CLEANUP_MINOR = 31
# How often wait_until re-evaluates a predicate without an emulator update,
# so predicates over outside state (files, the plugin) also work.
_RECHECK_INTERVAL = 0.1

# k8s.io/apimachinery validation: IsQualifiedName / IsDNS1123Subdomain.
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_QUALIFIED_NAME_MAX = 63
_DNS1123_SUBDOMAIN_MAX = 253
_REQUESTS_PREFIX = "requests."


@dataclass(frozen=True)
class Options:
    """DevicePluginOptions as the emulator uses them."""

    pre_start_required: bool = False
    get_preferred_allocation_available: bool = False

    @classmethod
    def from_pb(cls, pb: api_pb2.DevicePluginOptions) -> Options:
        return cls(
            pre_start_required=pb.pre_start_required,
            get_preferred_allocation_available=pb.get_preferred_allocation_available,
        )


@dataclass(frozen=True)
class Registration:
    """One Register call as the emulator saw it.

    ``options`` are the options in use: from the request (old generation) or
    from ``GetDevicePluginOptions`` (new generation); for a refused request,
    those of the request. ``requested_options`` are always the request's.
    ``error`` is set for a refused Register, and also for an accepted old
    generation Register whose later dial failed (``accepted`` stays True).
    """

    resource_name: str
    endpoint: str
    version: str
    options: Options
    generation: Generation
    received_at: float
    accepted: bool
    error: str | None
    requested_options: Options
    index: int


@dataclass(frozen=True)
class Device:
    """A device as the last ListAndWatch message (or a stream end) left it."""

    id: str
    health: str
    numa_nodes: tuple[int, ...] = ()

    @property
    def healthy(self) -> bool:
        # Only the exact string "Healthy" counts (reference: ListAndWatch).
        return self.health == HEALTHY


def parse_version(version: str) -> tuple[int, int]:
    """``"1.32"`` / ``"v1.26.3"`` -> (1, 32); only 1.18+ is emulated."""
    m = re.fullmatch(r"v?(\d+)\.(\d+)(\.\d+)?", version.strip())
    if m is None or int(m.group(1)) != 1 or int(m.group(2)) < _OLDEST_MINOR:
        raise ValueError(f"kubelet version {version!r}: expected 1.<minor>, minor >= 18")
    return int(m.group(1)), int(m.group(2))


def resource_name_error(name: str) -> str | None:
    """Why ``name`` is not an extended resource name, or None if it is one.

    Mirrors v1helper.IsExtendedResourceName: not native (must contain "/",
    no "kubernetes.io/"), no "requests." prefix, and "requests.<name>" must be
    a qualified name (prefix a DNS-1123 subdomain, name <= 63 characters).
    """
    if "/" not in name or "kubernetes.io/" in name:
        return "native resource name"
    if name.startswith(_REQUESTS_PREFIX):
        return "requests. prefix"
    prefix, _, short = (_REQUESTS_PREFIX + name).partition("/")
    if "/" in short:
        return "more than one '/'"
    if len(prefix) > _DNS1123_SUBDOMAIN_MAX or not _DNS1123_SUBDOMAIN.fullmatch(prefix):
        return "prefix is not a DNS-1123 subdomain"
    if not short or len(short) > _QUALIFIED_NAME_MAX or not _QUALIFIED_NAME.fullmatch(short):
        return "name part is not a qualified name (<= 63 characters)"
    return None


@dataclass(eq=False)
class _Stream:
    """One ListAndWatch stream (one per successful registration)."""

    reg_index: int
    resource: str
    endpoint: str
    channel: grpc.Channel
    epoch: int
    call: grpc.CallIterator[api_pb2.ListAndWatchResponse] | None = None
    open: bool = True
    superseded: bool = False  # replaced by a newer registration
    client: object = None  # 1.26+: the Register's entry in the client map


@dataclass
class _ResourceState:
    devices: dict[str, Device] = field(default_factory=dict)
    stream: _Stream | None = None  # the current registration's stream
    options: Options | None = None
    client: object = None  # 1.26+: the client the resource name maps to


class KubeletEmulator:
    """The kubelet's device manager, for tests (see the module docstring)."""

    def __init__(
        self,
        plugin_dir: Path,
        *,
        version: str = "1.32",
        reregistration_bug: bool = False,
        dial_timeout: float = 10.0,
    ) -> None:
        _, minor = parse_version(version)
        self.plugin_dir = Path(plugin_dir).absolute()
        self.version = version
        self.minor = minor
        self.generation: Generation = "old" if minor <= _LAST_OLD_MINOR else "new"
        if reregistration_bug and self.generation == "old":
            raise ValueError("reregistration_bug exists only in kubelets 1.26+")
        self.reregistration_bug = reregistration_bug
        self.dial_timeout = dial_timeout
        self.socket_path = self.plugin_dir / KUBELET_SOCKET
        self.checkpoint_path = self.plugin_dir / CHECKPOINT_FILE
        # One lock for all state; notify_all on every change (wait_* use it).
        self._cond = threading.Condition(threading.RLock())
        self._changes = 0
        self._server: grpc.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._epoch = 0  # bumped on every stop: stale threads check it
        self._closed = False
        self._registrations: list[Registration] = []
        self._first_list: set[int] = set()  # registrations whose stream delivered
        self._resources: dict[str, _ResourceState] = {}
        self._open_streams: set[_Stream] = set()  # current and superseded
        self._updates: dict[str, list[tuple[float, dict[str, Device]]]] = {}
        self._registered_devices: dict[str, list[str]] = {}
        self._assignments: list[tuple[str, tuple[str, ...]]] = []
        self._events: list[str] = []
        # Fault injection (see the module docstring).
        self._hung: socket.socket | None = None
        self._register_fault: str | None = None
        self._cut_offs = 0

    # --- lifecycle --------------------------------------------------------

    def start(self) -> None:
        """Start like the kubelet: clean the dir, serve Registration, then
        (old generation) create ``DEPRECATION``."""
        with self._cond:
            if self._closed:
                raise RuntimeError("emulator is closed")
            if self._server is not None:
                raise RuntimeError("emulator already running")
            self._close_hung()
            self.plugin_dir.mkdir(parents=True, exist_ok=True)
            self._clean_plugin_dir()
            # A fresh process knows only what the checkpoint holds.
            self._registered_devices = {}
            self._assignments = []
            self._load_checkpoint()
            self._executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kubelet")
            server = grpc.server(self._executor)
            api_pb2_grpc.add_RegistrationServicer_to_server(_RegistrationServicer(self), server)
            server.add_insecure_port(f"unix://{self.socket_path}")
            server.start()
            self._server = server
            if self.generation == "old":
                # 1.18-1.25 create it on every start, after serving.
                (self.plugin_dir / DEPRECATION_FILE).touch()
            self._event("started")
            self._notify()

    def stop(self, *, crash: bool = False, hang: bool = False) -> None:
        """Stop serving and drop every stream; ``kubelet.sock`` stays behind,
        stale (it refuses connections), as after every real kubelet stop;
        ``crash`` is only recorded in the event log. ``hang`` puts a socket
        there that accepts connections but never answers (fault injection).
        No-op when stopped (except that ``hang`` still installs the wedged
        socket)."""
        if crash and hang:
            raise ValueError("crash and hang are exclusive")
        with self._cond:
            server = self._server
            if server is None:
                if hang:
                    self._hang()
                return
            self._server = None
            self._epoch += 1
            streams = list(self._open_streams)
            self._resources.clear()
            self._event(f"stopped (crash={crash})")
            self._notify()
        # gRPC may unlink the socket file when it stops: a hard link keeps
        # the very file (inode) in place, as a stopped kubelet leaves it.
        keep = self.plugin_dir / f".{KUBELET_SOCKET}.stale"
        try:
            keep.unlink(missing_ok=True)
            os.link(self.socket_path, keep)
        except OSError:
            kept = False  # the dir or the socket was deleted under us
        else:
            kept = True
        server.stop(grace=None).wait()
        if self._executor is not None:
            # Handlers still dialing finish on their own (epoch check).
            self._executor.shutdown(wait=False)
            self._executor = None
        for stream in streams:
            _close_stream(stream)
        if kept:
            if os.path.lexists(self.socket_path):
                keep.unlink()
            else:
                os.replace(keep, self.socket_path)
        if hang:
            with self._cond:
                self._hang()

    def _hang(self) -> None:
        """A listening ``kubelet.sock`` that never accepts: a wedged kubelet."""
        self._close_hung()
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.socket_path))
        sock.listen(64)  # the kernel completes connects; nobody reads them
        self._hung = sock
        self._event("hung: kubelet.sock listens but never answers")
        self._notify()

    def hung_connections_pending(self) -> bool:
        """Whether a connect waits in the wedged socket's backlog (a client's
        call is in flight there); False when there is no wedged socket."""
        with self._cond:
            sock = self._hung
            if sock is None:
                return False
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable)

    def _close_hung(self) -> None:
        sock, self._hung = self._hung, None
        if sock is not None:
            sock.close()
            self.socket_path.unlink(missing_ok=True)

    def fail_register(self, error: str | None) -> None:
        """Refuse every Register with gRPC UNKNOWN and ``error`` (fault
        injection); ``None`` ends the fault."""
        with self._cond:
            self._register_fault = error
            self._event(f"register fault: {error}")
            self._notify()

    def end_stream(self, resource: str) -> None:
        """End the current ListAndWatch stream of ``resource`` from the
        kubelet's side (it stops the endpoint, as on an internal error):
        the devices turn unhealthy and, as always, the stream is not reopened."""
        with self._cond:
            state = self._resources.get(resource)
            stream = state.stream if state is not None else None
            if stream is None or not stream.open:
                raise RuntimeError(f"no open stream for {resource!r}")
            self._event(f"stream #{stream.reg_index} {resource} ended by the kubelet")
        _close_stream(stream)

    def events(self) -> list[str]:
        """The emulator's event log (a snapshot), oldest first."""
        with self._cond:
            return list(self._events)

    def cut_offs(self) -> int:
        """How often the emulated re-registration bug cut off a registration."""
        with self._cond:
            return self._cut_offs

    def restart(self, *, crash: bool = False, down_for: float = 0.0) -> None:
        """``stop(crash=crash)``, stay down ``down_for`` seconds, ``start()``."""
        self.stop(crash=crash)
        if down_for > 0:
            time.sleep(down_for)  # the requested downtime, not synchronization
        self.start()

    def close(self) -> None:
        """Stop everything; idempotent."""
        self.stop()
        with self._cond:
            self._close_hung()
            self._closed = True

    def __enter__(self) -> KubeletEmulator:
        """Starts the emulator unless it is running already."""
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def running(self) -> bool:
        with self._cond:
            return self._server is not None

    # --- observation ------------------------------------------------------

    @property
    def registrations(self) -> list[Registration]:
        """Every Register call so far (a snapshot), index = position."""
        with self._cond:
            return list(self._registrations)

    def wait_registered(
        self, resource: str, *, after: int = 0, timeout: float = 10.0
    ) -> Registration:
        """The latest accepted registration of ``resource`` with index >=
        ``after`` whose stream delivered its first list; waits for one."""

        def find() -> Registration | None:
            for reg in reversed(self._registrations[after:]):
                if reg.resource_name == resource and reg.accepted and reg.index in self._first_list:
                    return reg
            return None

        deadline = time.monotonic() + timeout
        with self._cond:
            while (reg := find()) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [
                        f"#{r.index} accepted={r.accepted} error={r.error}"
                        for r in self._registrations
                        if r.resource_name == resource
                    ]
                    raise TimeoutError(
                        f"no accepted registration of {resource!r} with index >= {after} "
                        f"delivered a device list within {timeout} s; registrations of it: "
                        f"{seen or 'none'}; recent events: {self._events[-8:]}"
                    )
                self._cond.wait(remaining)
            return reg

    def wait_until(
        self, predicate: Callable[[], bool], *, timeout: float = 10.0, what: str = ""
    ) -> None:
        """Wait until ``predicate()`` is true; it is re-evaluated (outside the
        lock) on every emulator update and at least every 0.1 s."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                seen = self._changes
            if predicate():
                return
            with self._cond:
                while self._changes == seen:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(
                            f"timed out after {timeout} s waiting for {what or 'a condition'}; "
                            f"recent events: {self._events[-8:]}"
                        )
                    if not self._cond.wait(min(remaining, _RECHECK_INTERVAL)):
                        break  # re-check predicates over outside state

    def resources(self) -> list[str]:
        """Resource names the running kubelet knows (registered or from the
        checkpoint), sorted."""
        with self._cond:
            return sorted(self._resources)

    def devices(self, resource: str) -> dict[str, Device]:
        """The latest device list of ``resource`` ({} if unknown)."""
        with self._cond:
            state = self._resources.get(resource)
            return dict(state.devices) if state else {}

    def allocatable(self, resource: str) -> int:
        """Healthy devices (0 for an unknown resource)."""
        return sum(d.healthy for d in self.devices(resource).values())

    def capacity(self, resource: str) -> int:
        """Healthy + unhealthy devices (0 for an unknown resource)."""
        return len(self.devices(resource))

    def updates(self, resource: str) -> list[tuple[float, dict[str, Device]]]:
        """Every ListAndWatch message applied for ``resource``: (monotonic
        time received, device list)."""
        with self._cond:
            return [(t, dict(d)) for t, d in self._updates.get(resource, [])]

    def stream_open(self, resource: str) -> bool:
        """Whether the current registration's stream is open."""
        with self._cond:
            state = self._resources.get(resource)
            return bool(state and state.stream and state.stream.open)

    def open_streams(self, resource: str) -> int:
        """ListAndWatch streams of ``resource`` open now, current and
        superseded (the kubelet never ends a superseded one itself)."""
        with self._cond:
            return sum(stream.resource == resource for stream in self._open_streams)

    def options(self, resource: str) -> Options:
        """The options in use for ``resource``'s current registration."""
        with self._cond:
            state = self._resources.get(resource)
            if state is None or state.options is None:
                raise KeyError(f"no plugin registered for {resource!r}")
            return state.options

    def assignments(self, resource: str) -> list[tuple[str, ...]]:
        """Device IDs of every successful allocate (kept in the checkpoint)."""
        with self._cond:
            return [ids for res, ids in self._assignments if res == resource]

    # --- calls into the plugin --------------------------------------------

    def allocate(
        self, resource: str, ids: Sequence[str], *, timeout: float | None = None
    ) -> api_pb2.ContainerAllocateResponse:
        """Allocate with one ContainerAllocateRequest; returns
        ``container_responses[0]``. The plugin's grpc.RpcError propagates."""
        stub = api_pb2_grpc.DevicePluginStub(self._live_channel(resource))
        request = api_pb2.AllocateRequest(
            container_requests=[api_pb2.ContainerAllocateRequest(devices_ids=list(ids))]
        )
        response = stub.Allocate(request, timeout=timeout)
        if not response.container_responses:
            # The kubelet's own error for this case.
            raise RuntimeError(f"no containers return in allocation response {response}")
        with self._cond:
            self._assignments.append((resource, tuple(ids)))
            self._write_checkpoint()
            self._notify()
        return response.container_responses[0]

    def get_preferred_allocation(
        self,
        resource: str,
        available: Sequence[str],
        must_include: Sequence[str],
        size: int,
        *,
        timeout: float | None = None,
    ) -> list[str]:
        """GetPreferredAllocation for one container; the plugin's raw answer.
        Raises RuntimeError if the plugin did not advertise it."""
        if not self.options(resource).get_preferred_allocation_available:
            raise RuntimeError(f"plugin for {resource!r} does not offer GetPreferredAllocation")
        stub = api_pb2_grpc.DevicePluginStub(self._live_channel(resource))
        request = api_pb2.PreferredAllocationRequest(
            container_requests=[
                api_pb2.ContainerPreferredAllocationRequest(
                    available_deviceIDs=list(available),
                    must_include_deviceIDs=list(must_include),
                    allocation_size=size,
                )
            ]
        )
        response = stub.GetPreferredAllocation(request, timeout=timeout)
        if not response.container_responses:
            raise RuntimeError(f"empty preferred allocation response {response}")
        return list(response.container_responses[0].deviceIDs)

    def pre_start_container(
        self, resource: str, ids: Sequence[str], *, timeout: float = 30.0
    ) -> None:
        """PreStartContainer (30 s deadline, like the kubelet); only if the
        plugin requires it, else RuntimeError."""
        if not self.options(resource).pre_start_required:
            raise RuntimeError(f"plugin for {resource!r} does not require PreStartContainer")
        stub = api_pb2_grpc.DevicePluginStub(self._live_channel(resource))
        stub.PreStartContainer(
            api_pb2.PreStartContainerRequest(devices_ids=list(ids)), timeout=timeout
        )

    # --- Register (called in gRPC server threads) ---------------------------

    def _handle_register(
        self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> api_pb2.Empty:
        received = time.monotonic()
        requested = Options.from_pb(request.options)
        resource = request.resource_name
        # Not validated, joined like Go's filepath.Join (an absolute
        # endpoint is appended, not substituted).
        path = posixpath.normpath(f"{self.plugin_dir}/{request.endpoint}")

        def record(options: Options, accepted: bool, error: str | None) -> int:
            with self._cond:
                index = len(self._registrations)
                self._registrations.append(
                    Registration(
                        resource_name=resource,
                        endpoint=request.endpoint,
                        version=request.version,
                        options=options,
                        generation=self.generation,
                        received_at=received,
                        accepted=accepted,
                        error=error,
                        requested_options=requested,
                        index=index,
                    )
                )
                self._event(f"register #{index} {resource} accepted={accepted} error={error}")
                self._notify()
                return index

        error: str | None = None
        if request.version != API_VERSION:
            error = (
                f"invalid version: requested API version {request.version!r} is not "
                f'supported by kubelet. Supported versions are ["{API_VERSION}"]'
            )
        elif resource_name_error(resource) is not None:
            error = f'the ResourceName "{resource}" is invalid'
        else:
            with self._cond:
                error = self._register_fault
        if error is not None:
            record(requested, False, error)
            context.abort(grpc.StatusCode.UNKNOWN, error)

        with self._cond:
            epoch = self._epoch

        if self.generation == "old":
            # 1.18-1.25: answer at once; dial afterwards in the background.
            index = record(requested, True, None)
            threading.Thread(
                target=self._connect_old,
                args=(index, resource, path, requested, epoch),
                name=f"kubelet-dial-{index}",
                daemon=True,
            ).start()
            return api_pb2.Empty()

        # 1.26+: map the name to this Register's client, dial before
        # answering, options only from the plugin.
        client = object()
        self._map_client(resource, client, epoch)
        with self._cond:
            self._event(f"register for {resource}: dialing {request.endpoint}")
            self._notify()
        channel, dial_error = self._dial(path)
        options = requested
        if channel is not None:
            try:
                pb = api_pb2_grpc.DevicePluginStub(channel).GetDevicePluginOptions(api_pb2.Empty())
                options = Options.from_pb(pb)
            except grpc.RpcError as exc:
                channel.close()
                channel = None
                dial_error = f"failed to get device plugin options: {_rpc_text(exc)}"
        if channel is None:
            # The kubelet deletes the name's client, whichever it is by now.
            self._map_client(resource, None, epoch)
            error = f"failed to connect to device plugin {resource} at {path}: {dial_error}"
            record(options, False, error)
            context.abort(grpc.StatusCode.UNKNOWN, error)
        index = record(options, True, None)
        if not self._install(
            index=index,
            resource=resource,
            path=path,
            options=options,
            channel=channel,
            epoch=epoch,
            client=client,
        ):
            context.abort(grpc.StatusCode.UNAVAILABLE, "kubelet is shutting down")
        return api_pb2.Empty()

    def _map_client(self, resource: str, client: object, epoch: int) -> None:
        """1.26+: the resource name now maps to ``client`` (None: unmapped)."""
        with self._cond:
            if epoch == self._epoch and self._server is not None:
                self._resources.setdefault(resource, _ResourceState()).client = client

    def _connect_old(
        self, index: int, resource: str, path: str, options: Options, epoch: int
    ) -> None:
        channel, dial_error = self._dial(path)
        if channel is None:
            # The old kubelet only logs this; we record it on the registration.
            with self._cond:
                self._registrations[index] = replace(
                    self._registrations[index],
                    error=f"failed to dial device plugin at {path}: {dial_error}",
                )
                self._event(f"register #{index}: dial failed")
                self._notify()
            return
        self._install(
            index=index, resource=resource, path=path, options=options, channel=channel, epoch=epoch
        )

    def _dial(self, path: str) -> tuple[grpc.Channel | None, str]:
        """Blocking dial with ``dial_timeout`` (the kubelet: 10 s, WithBlock)."""
        channel = grpc.insecure_channel(f"unix://{path}")
        ready = grpc.channel_ready_future(channel)
        try:
            ready.result(timeout=self.dial_timeout)
        except grpc.FutureTimeoutError:
            ready.cancel()
            channel.close()
            return None, f"not reachable within {self.dial_timeout} s"
        return channel, ""

    def _install(
        self,
        *,
        index: int,
        resource: str,
        path: str,
        options: Options,
        channel: grpc.Channel,
        epoch: int,
        client: object = None,
    ) -> bool:
        """Make registration ``index`` the resource's endpoint and open its
        one ListAndWatch stream; the previous stream stays open."""
        with self._cond:
            if epoch != self._epoch or self._server is None:
                channel.close()
                return False
            state = self._resources.setdefault(resource, _ResourceState())
            old = state.stream
            stream = _Stream(index, resource, path, channel, epoch, client=client)
            stream.call = api_pb2_grpc.DevicePluginStub(channel).ListAndWatch(api_pb2.Empty())
            state.stream = stream
            state.options = options
            self._open_streams.add(stream)
            if old is not None and old.open:
                old.superseded = True
            self._event(f"registration #{index} installed for {resource}")
            self._notify()
        threading.Thread(
            target=self._consume, args=(stream,), name=f"kubelet-law-{index}", daemon=True
        ).start()
        return True

    def _consume(self, stream: _Stream) -> None:
        """Read one ListAndWatch stream until it ends; never reopen it."""
        assert stream.call is not None
        reason = "ended by the plugin"
        try:
            for response in stream.call:
                devices = {
                    d.ID: Device(d.ID, d.health, tuple(n.ID for n in d.topology.nodes))
                    for d in response.devices
                }
                with self._cond:
                    state = self._resources.get(stream.resource)
                    if stream.epoch != self._epoch or state is None:
                        continue  # from before a restart: ignored
                    # Current or superseded: the kubelet goes by resource name.
                    state.devices = devices
                    self._updates.setdefault(stream.resource, []).append(
                        (time.monotonic(), dict(devices))
                    )
                    self._first_list.add(stream.reg_index)
                    self._registered_devices[stream.resource] = [
                        d.id for d in devices.values() if d.healthy
                    ]
                    self._write_checkpoint()
                    self._notify()
        except grpc.RpcError as exc:
            reason = f"failed: {_rpc_text(exc)}"
        self._stream_ended(stream, reason)

    def _stream_ended(self, stream: _Stream, reason: str) -> None:
        to_close = [stream]  # the kubelet closes the ended endpoint's connection
        with self._cond:
            stream.open = False
            self._open_streams.discard(stream)
            self._event(f"stream #{stream.reg_index} {stream.resource} {reason}")
            state = self._resources.get(stream.resource)
            if stream.epoch == self._epoch and state is not None:
                if self.reregistration_bug:
                    to_close += self._disconnect_client(state, stream)
                elif state.stream is stream:
                    # Reference: the stream ended -> every device unhealthy at
                    # once, capacity kept; only a new Register recovers.
                    _mark_unhealthy(state)
            self._notify()
        for each in to_close:
            _close_stream(each)

    def _disconnect_client(self, state: _ResourceState, ended: _Stream) -> list[_Stream]:
        """1.26+ with the bug: the end of ANY stream of the resource
        disconnects the client its name maps to now (the caller holds the
        lock); returns the streams whose connection that closes."""
        client, state.client = state.client, None
        if client is None:
            return []  # nothing mapped: the end goes unnoticed
        _mark_unhealthy(state)
        current = state.stream
        if client is ended.client:
            return []  # its own end: unhealthy, as always
        self._event(
            f"reregistration bug: stream #{ended.reg_index} ending disconnected the client of "
            f"the newer registration{f' #{current.reg_index}' if current else ''}"
        )
        if current is None or current.client is not client:
            return []  # that Register is still dialing: its endpoint comes later
        self._cut_offs += 1
        state.stream = None
        state.options = None
        return [current]

    # --- internals --------------------------------------------------------

    def _live_channel(self, resource: str) -> grpc.Channel:
        with self._cond:
            state = self._resources.get(resource)
            if state is None or state.stream is None:
                raise RuntimeError(f"no plugin registered for {resource!r}")
            if not state.stream.open:
                # The kubelet refuses calls into a stopped endpoint.
                raise RuntimeError(f"endpoint of {resource!r} stopped (its stream ended)")
            return state.stream.channel

    def _clean_plugin_dir(self) -> None:
        sockets_only = self.minor >= _FIRST_SOCKETS_ONLY_CLEANUP_MINOR
        for entry in os.scandir(self.plugin_dir):
            if entry.name == CHECKPOINT_FILE:
                continue
            try:
                mode = os.stat(entry.path).st_mode  # follows symlinks, like os.Stat
            except OSError:
                continue  # the kubelet logs and skips what it cannot stat
            if stat.S_ISDIR(mode) or (sockets_only and not stat.S_ISSOCK(mode)):
                continue
            # Gone since the stat (e.g. a plugin removing its own socket):
            # the kubelet logs a failed removal and goes on.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)

    def _load_checkpoint(self) -> None:
        try:
            data = json.loads(self.checkpoint_path.read_text())["Data"]
        except FileNotFoundError:
            return
        self._registered_devices = {
            str(res): [str(i) for i in ids] for res, ids in data["RegisteredDevices"].items()
        }
        self._assignments = [
            (str(e["ResourceName"]), tuple(str(i) for i in e["DeviceIDs"]))
            for e in data["PodDeviceEntries"]
        ]
        # Known, but capacity 0 until the plugin registers again.
        for resource in self._registered_devices:
            self._resources[resource] = _ResourceState()

    def _write_checkpoint(self) -> None:
        data = {
            "Data": {
                "RegisteredDevices": self._registered_devices,
                "PodDeviceEntries": [
                    {"ResourceName": res, "DeviceIDs": list(ids)} for res, ids in self._assignments
                ],
            }
        }
        tmp = self.plugin_dir / f".{CHECKPOINT_FILE}.tmp"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.checkpoint_path)

    def _event(self, text: str) -> None:
        log.debug("kubelet emulator: %s", text)
        self._events.append(f"{time.monotonic():.3f} {text}")

    def _notify(self) -> None:
        self._changes += 1
        self._cond.notify_all()


class _RegistrationServicer(api_pb2_grpc.RegistrationServicer):
    def __init__(self, emulator: KubeletEmulator) -> None:
        self._emulator = emulator

    def Register(
        self, request: api_pb2.RegisterRequest, context: grpc.ServicerContext
    ) -> api_pb2.Empty:
        return self._emulator._handle_register(request, context)


def _mark_unhealthy(state: _ResourceState) -> None:
    state.devices = {i: replace(d, health=UNHEALTHY) for i, d in state.devices.items()}


def _close_stream(stream: _Stream) -> None:
    # Cancelling the call ends the consumer's iteration; closing the channel
    # is what the kubelet does when it stops an endpoint.
    if stream.call is not None:
        stream.call.cancel()  # type: ignore[no-untyped-call]
    stream.channel.close()


def _rpc_text(exc: grpc.RpcError) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return f"{code}: {details}"
