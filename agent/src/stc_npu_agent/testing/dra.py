"""A kubelet's DRA side, for tests: registration through ``plugins_registry``,
NodePrepareResources / NodeUnprepareResources, and the device health stream.

What is emulated (the kubelet's ``pkg/kubelet/cm/dra`` as of 1.34-1.36):

* The plugin watcher (``testing/pluginwatcher.py``) finds the driver's
  registration socket (at start too: the dir is never cleaned) and calls
  ``GetInfo`` (1 s deadline). Type must be ``DRAPlugin``; the service version
  is the newest the kubelet knows among ``supported_versions``
  (``v1.DRAPlugin``, then ``v1beta1.DRAPlugin``), else the registration
  fails. The kubelet dials the endpoint, answers
  ``NotifyRegistrationStatus``, and at once opens the health stream
  (``NodeWatchResources`` of ``health_package``: v1alpha1 in 1.34-1.36,
  the only health package the v1.36.2 kubelet has; None: a kubelet with the
  ResourceHealthStatus gate off, which never opens it), consumed in a thread; every message replaces
  the health of the driver's devices (``health()``, history in
  ``health_updates``). As the kubelet's health cache (``healthinfo.go``), a
  device not heard of for ``health_timeout`` (a constant 30 s in the kubelet;
  the message's ``health_check_timeout_seconds`` is not used yet) counts as
  UNKNOWN: a driver must repeat its list, not only send changes.
* ``prepare`` / ``unprepare``: one call with the given claims over the
  chosen version's path, the answer returned as is (per-claim errors
  included).
* A removed registration socket deregisters the driver (the stream is
  closed); ``stop`` drops everything in memory, ``start`` finds the socket
  again.

Not emulated: the API server (claims are whatever the test's ClaimSource
holds), the claim info cache and its checkpoint, pods, CDI injection.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc

from stc_npu_agent.dra import api_pb2 as dra_pb2
from stc_npu_agent.drahealth import api_pb2 as health_pb2
from stc_npu_agent.testing.pluginwatcher import PluginDirWatcher, get_info, notify

DRA_PLUGIN_TYPE = "DRAPlugin"
# The kubelet's known services, newest first, and their gRPC service names.
SERVICES = {
    "v1.DRAPlugin": "k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin",
    "v1beta1.DRAPlugin": "k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin",
}
DIAL_TIMEOUT = 10.0
# The kubelet's health cache counts a device it has not heard of for this
# long as Unknown (pkg/kubelet/cm/dra/healthinfo.go: healthTimeout).
HEALTH_TIMEOUT = 30.0

ClaimRef = tuple[str, str, str]  # namespace, name, uid
ResponseT = TypeVar("ResponseT")


@dataclass(frozen=True)
class DraRegistration:
    driver: str
    endpoint: str
    service: str  # the chosen one, e.g. "v1.DRAPlugin"; "" when refused
    accepted: bool
    error: str | None
    index: int


@dataclass
class _Driver:
    registration: DraRegistration
    socket_path: Path
    channel: grpc.Channel
    stream: grpc.CallIterator[health_pb2.NodeWatchResourcesResponse] | None = None


class DraKubeletEmulator:
    def __init__(
        self,
        registry_dir: Path,
        *,
        services: Sequence[str] = tuple(SERVICES),
        health_package: str | None = "v1alpha1",
        health_timeout: float = HEALTH_TIMEOUT,
    ) -> None:
        self.registry_dir = Path(registry_dir).absolute()
        self.services = tuple(services)
        self.health_package = health_package
        self.health_timeout = health_timeout
        self._cond = threading.Condition(threading.RLock())
        self._changes = 0
        self._registrations: list[DraRegistration] = []
        self._drivers: dict[str, _Driver] = {}  # by driver name
        self._health: dict[str, dict[tuple[str, str], tuple[str, str]]] = {}
        # (driver, pool, device) -> monotonic time last heard of
        self._heard: dict[tuple[str, str, str], float] = {}
        self.health_updates: list[tuple[float, dict[tuple[str, str], tuple[str, str]]]] = []
        self._watcher: PluginDirWatcher | None = None

    # --- lifecycle ---

    def start(self) -> None:
        self._watcher = PluginDirWatcher(self.registry_dir, self._found, self._removed)
        self._watcher.start()

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        with self._cond:
            drivers = list(self._drivers.values())
            self._drivers.clear()
            self._notify()
        for driver in drivers:
            self._close(driver)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> DraKubeletEmulator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- observation ---

    @property
    def registrations(self) -> list[DraRegistration]:
        with self._cond:
            return list(self._registrations)

    def wait_registered(
        self, driver: str, *, after: int = 0, timeout: float = 10.0
    ) -> DraRegistration:
        """The latest accepted registration of ``driver`` (index >= ``after``)
        whose health stream (if the kubelet opens one) delivered its first message."""
        found: list[DraRegistration] = []

        def ready() -> bool:
            current = self._drivers.get(driver)
            if current is None or current.registration.index < after:
                return False
            if self.health_package is not None and driver not in self._health:
                return False
            found.append(current.registration)
            return True

        self.wait_until(ready, timeout=timeout, what=f"{driver} registered")
        return found[-1]

    def health(self, driver: str) -> dict[str, tuple[str, str]]:
        """Device name -> (health, message), health as the enum's name
        (HEALTHY, UNHEALTHY, UNKNOWN), from the latest message; UNKNOWN
        when that message is older than the device's timeout."""
        now = time.monotonic()
        with self._cond:
            result = {}
            for (pool, device), status in self._health.get(driver, {}).items():
                heard = self._heard.get((driver, pool, device), now)
                stale = now - heard > self.health_timeout
                result[device] = ("UNKNOWN", status[1]) if stale else status
            return result

    def health_pools(self, driver: str) -> set[str]:
        with self._cond:
            return {pool for pool, _ in self._health.get(driver, {})}

    def wait_until(
        self, predicate: Callable[[], bool], *, timeout: float = 10.0, what: str = ""
    ) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out waiting for {what or predicate}")
                self._cond.wait(min(left, 0.1))

    # --- calls ---

    def prepare(
        self, driver: str, claims: Sequence[ClaimRef], timeout: float = 30.0
    ) -> dra_pb2.NodePrepareResourcesResponse:
        request = dra_pb2.NodePrepareResourcesRequest(
            claims=[dra_pb2.Claim(namespace=ns, name=name, uid=uid) for ns, name, uid in claims]
        )
        return self._call(
            driver,
            "NodePrepareResources",
            request,
            dra_pb2.NodePrepareResourcesResponse,
            timeout,
        )

    def unprepare(
        self, driver: str, claims: Sequence[ClaimRef], timeout: float = 30.0
    ) -> dra_pb2.NodeUnprepareResourcesResponse:
        request = dra_pb2.NodeUnprepareResourcesRequest(
            claims=[dra_pb2.Claim(namespace=ns, name=name, uid=uid) for ns, name, uid in claims]
        )
        return self._call(
            driver,
            "NodeUnprepareResources",
            request,
            dra_pb2.NodeUnprepareResourcesResponse,
            timeout,
        )

    def _call(
        self,
        driver: str,
        method: str,
        request: object,
        response: type[ResponseT],
        timeout: float,
    ) -> ResponseT:
        with self._cond:
            current = self._drivers.get(driver)
            if current is None:
                raise RuntimeError(f"DRA driver {driver} is not registered")
        path = f"/{SERVICES[current.registration.service]}/{method}"
        call = current.channel.unary_unary(
            path,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response.FromString,  # type: ignore[attr-defined]
        )
        answer: ResponseT = call(request, timeout=timeout)
        return answer

    # --- the plugin watcher's handlers ---

    def _found(self, socket_path: Path) -> bool:
        try:
            info = get_info(socket_path)
        except grpc.RpcError:
            return False
        error: str | None = None
        service = next((s for s in self.services if s in info.supported_versions), "")
        if info.type != DRA_PLUGIN_TYPE:
            error = f"plugin type {info.type!r} is not DRAPlugin"
        elif not service:
            error = (
                f"none of the versions {list(info.supported_versions)} is supported "
                f"(known: {list(self.services)})"
            )
        channel = None
        if error is None:
            channel = grpc.insecure_channel(f"unix://{info.endpoint}")
            try:
                grpc.channel_ready_future(channel).result(timeout=DIAL_TIMEOUT)
            except grpc.FutureTimeoutError:
                channel.close()
                channel = None
                error = f"cannot connect to {info.endpoint}"
        with self._cond:
            registration = DraRegistration(
                info.name, info.endpoint, service, error is None, error, len(self._registrations)
            )
            self._registrations.append(registration)
            self._notify()
        notify(socket_path, error is None, error or "")
        if channel is None:
            return True  # refused for good: the kubelet only logs it
        driver = _Driver(registration, socket_path, channel)
        with self._cond:
            old = self._drivers.get(info.name)
            self._drivers[info.name] = driver
            self._health.pop(info.name, None)
        if old is not None:
            self._close(old)
        self._watch_health(driver)
        return True

    def _removed(self, socket_path: Path) -> bool:
        with self._cond:
            gone = [d for d in self._drivers.values() if d.socket_path == socket_path]
            for driver in gone:
                del self._drivers[driver.registration.driver]
            self._notify()
        for driver in gone:
            self._close(driver)
        return True

    def _watch_health(self, driver: _Driver) -> None:
        if self.health_package is None:
            return
        stream = driver.channel.unary_stream(
            f"/{self.health_package}.DRAResourceHealth/NodeWatchResources",
            request_serializer=health_pb2.NodeWatchResourcesRequest.SerializeToString,
            response_deserializer=health_pb2.NodeWatchResourcesResponse.FromString,
        )(health_pb2.NodeWatchResourcesRequest())
        driver.stream = stream
        threading.Thread(
            target=self._consume, args=(driver, stream), name="dra-health", daemon=True
        ).start()

    def _consume(
        self,
        driver: _Driver,
        stream: grpc.CallIterator[health_pb2.NodeWatchResourcesResponse],
    ) -> None:
        name = driver.registration.driver
        try:
            for message in stream:
                devices = {
                    (d.device.pool_name, d.device.device_name): (
                        health_pb2.HealthStatus.Name(d.health),
                        d.message,
                    )
                    for d in message.devices
                }
                now = time.monotonic()
                with self._cond:
                    if self._drivers.get(name) is not driver:
                        return
                    for pool, device in devices:
                        self._heard[(name, pool, device)] = now
                    self._health[name] = devices
                    self.health_updates.append((time.monotonic(), dict(devices)))
                    self._notify()
        except grpc.RpcError:
            return

    def _close(self, driver: _Driver) -> None:
        if driver.stream is not None:
            driver.stream.cancel()  # type: ignore[no-untyped-call]
        driver.channel.close()

    def _notify(self) -> None:
        self._changes += 1
        self._cond.notify_all()
