"""A tiny stand-in for the Kubernetes API server, for tests and the bench.

Serves, over plain HTTP on 127.0.0.1, just what the DRA publisher and the
claim source call: ResourceSlices (get, list, create, update, delete),
ResourceClaims (get), Nodes (get) and ``/version``, as JSON, with the API server's rules
that matter to a client: ``resourceVersion`` checks on update (409
Conflict), 404 and 409 on create of an existing name, a taint's
``timeAdded`` filled in, and (``device_taints=False``) the silent drop of
device taints by a cluster without the DRADeviceTaints feature. Every
request is recorded (method, path, monotonic time) for counting writes.

Not emulated: authentication, watches, field selectors, validation.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SLICES = "/apis/resource.k8s.io/v1/resourceslices"
_SLICE = re.compile(re.escape(SLICES) + r"/([^/]+)")
_CLAIM = re.compile(r"/apis/resource\.k8s\.io/v1/namespaces/([^/]+)/resourceclaims/([^/]+)")
_NODE = re.compile(r"/api/v1/nodes/([^/]+)")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    at: float  # time.monotonic()


class FakeApiServer:
    def __init__(self, *, device_taints: bool = True) -> None:
        self.device_taints = device_taints
        self.slices: dict[str, dict[str, Any]] = {}
        self.claims: dict[tuple[str, str], dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.requests: list[Request] = []
        self.fail_next: list[int] = []  # HTTP statuses to answer the next requests with
        self.now: str | None = None  # the server's time for timeAdded (None: the clock)
        # Seconds between storing a write and answering it: a slow server,
        # during which a client can see the new state by another read.
        self.answer_delay = 0.0
        self.lock = threading.Lock()
        self._version = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeApiServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_node(self, name: str) -> str:
        uid = str(uuid.uuid4())
        self.nodes[name] = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "uid": uid, "resourceVersion": self._next_version()},
        }
        return uid

    def add_claim(self, claim: dict[str, Any]) -> None:
        metadata = claim["metadata"]
        self.claims[(metadata["namespace"], metadata["name"])] = claim

    def writes(self) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.method in ("POST", "PUT", "PATCH", "DELETE")]

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def _store(self, obj: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        metadata = obj.setdefault("metadata", {})
        metadata["resourceVersion"] = self._next_version()
        metadata["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
        now = self.now or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for device in obj.get("spec", {}).get("devices", []):
            if not self.device_taints:
                device.pop("taints", None)
            for taint in device.get("taints", []):
                taint.setdefault("timeAdded", now)
        return obj

    def handle(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        with self.lock:
            self.requests.append(Request(method, path, time.monotonic()))
            if self.fail_next:
                status = self.fail_next.pop(0)
                return status, _status(status, "injected failure")
            return self._route(method, path, body)

    def _route(  # noqa: PLR0911 (one return per route)
        self, method: str, path: str, body: dict[str, Any] | None
    ) -> tuple[int, Any]:
        if path.rstrip("/") == "/version" and method == "GET":
            return 200, {"major": "1", "minor": "36", "gitVersion": "v1.36.2"}
        if path == SLICES and method == "GET":
            items = [self.slices[name] for name in sorted(self.slices)]
            listing = {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSliceList"}
            return 200, {
                **listing,
                "metadata": {"resourceVersion": str(self._version)},
                "items": items,
            }
        if path == SLICES and method == "POST" and body is not None:
            name = body["metadata"]["name"]
            if name in self.slices:
                return 409, _status(409, f'resourceslices "{name}" already exists', "AlreadyExists")
            self.slices[name] = self._store(body, None)
            return 201, self.slices[name]
        if match := _SLICE.fullmatch(path):
            return self._one_slice(method, match[1], body)
        if (match := _CLAIM.fullmatch(path)) and method == "GET":
            claim = self.claims.get((match[1], match[2]))
            if claim is None:
                return 404, _status(404, f'resourceclaims "{match[2]}" not found', "NotFound")
            return 200, claim
        if (match := _NODE.fullmatch(path)) and method == "GET":
            node = self.nodes.get(match[1])
            if node is None:
                return 404, _status(404, f'nodes "{match[1]}" not found', "NotFound")
            return 200, node
        return 404, _status(404, f"the server could not find {method} {path}", "NotFound")

    def _one_slice(self, method: str, name: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        current = self.slices.get(name)
        if current is None:
            return 404, _status(404, f'resourceslices "{name}" not found', "NotFound")
        if method == "GET":
            return 200, current
        if method == "DELETE":
            del self.slices[name]
            return 200, _status(200, "deleted", "")
        if method == "PUT" and body is not None:
            sent = body.get("metadata", {}).get("resourceVersion")
            if sent != current["metadata"]["resourceVersion"]:
                message = f'Operation cannot be fulfilled on resourceslices "{name}"'
                return 409, _status(409, message, "Conflict")
            self.slices[name] = self._store(body, current)
            return 200, self.slices[name]
        return 405, _status(405, f"{method} not allowed", "MethodNotAllowed")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                status, answer = server.handle(self.command, self.path.split("?")[0], body)
                if server.answer_delay and self.command != "GET":
                    time.sleep(server.answer_delay)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve  # noqa: N815 (http.server's names)

            def log_message(self, format: str, *args: Any) -> None:
                return

        return Handler


def _status(code: int, message: str, reason: str = "InternalError") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Success" if code < 300 else "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
