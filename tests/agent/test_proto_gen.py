"""The committed protobuf/gRPC modules are exactly what api.proto generates,
and the proto is wire-identical to the kubelet's published v1beta1 API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from stc_npu_agent.v1beta1 import api_pb2

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "agent" / "src" / "stc_npu_agent" / "v1beta1"
GENERATED = ["api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py", "api_pb2_grpc.pyi"]


def test_regenerating_gives_the_committed_files(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "ci" / "gen-proto.sh"), str(tmp_path)], check=True, env=env)
    for name in GENERATED:
        fresh = (tmp_path / "stc_npu_agent" / "v1beta1" / name).read_text()
        committed = (PACKAGE / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto` and commit"


def test_package_and_method_paths_match_the_kubelet() -> None:
    # The kubelet calls /v1beta1.DevicePlugin/<Method>: the package name is wire.
    file = api_pb2.DESCRIPTOR
    assert file.package == "v1beta1"
    plugin = file.services_by_name["DevicePlugin"]
    assert [m.name for m in plugin.methods] == [
        "GetDevicePluginOptions",
        "ListAndWatch",
        "GetPreferredAllocation",
        "Allocate",
        "PreStartContainer",
    ]
    assert plugin.methods_by_name["ListAndWatch"].server_streaming
    assert [m.name for m in file.services_by_name["Registration"].methods] == ["Register"]


def fields(message: str) -> dict[str, tuple[int, int, bool]]:
    descriptor = api_pb2.DESCRIPTOR.message_types_by_name[message]
    return {f.name: (f.number, f.type, f.is_repeated) for f in descriptor.fields}


def test_field_numbers_and_types_match_the_published_api() -> None:
    string, boolean, message, int32, int64 = 9, 8, 11, 5, 3
    assert fields("RegisterRequest") == {
        "version": (1, string, False),
        "endpoint": (2, string, False),
        "resource_name": (3, string, False),
        "options": (4, message, False),
    }
    assert fields("DevicePluginOptions") == {
        "pre_start_required": (1, boolean, False),
        "get_preferred_allocation_available": (2, boolean, False),
    }
    assert fields("Device") == {
        "ID": (1, string, False),
        "health": (2, string, False),
        "topology": (3, message, False),
    }
    assert fields("NUMANode") == {"ID": (1, int64, False)}
    assert fields("ContainerPreferredAllocationRequest") == {
        "available_deviceIDs": (1, string, True),
        "must_include_deviceIDs": (2, string, True),
        "allocation_size": (3, int32, False),
    }
    assert fields("ContainerAllocateResponse") == {
        "envs": (1, message, True),
        "mounts": (2, message, True),
        "devices": (3, message, True),
        "annotations": (4, message, True),
        "cdi_devices": (5, message, True),
    }
    assert fields("Mount") == {
        "container_path": (1, string, False),
        "host_path": (2, string, False),
        "read_only": (3, boolean, False),
    }
    assert fields("DeviceSpec") == {
        "container_path": (1, string, False),
        "host_path": (2, string, False),
        "permissions": (3, string, False),
    }
