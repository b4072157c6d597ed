"""The committed protobuf/gRPC modules are exactly what each api.proto
generates, and each proto is wire-identical to the kubelet's published API
(device plugin v1beta1, plugin registration, DRA v1, DRA device health v1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from google.protobuf.descriptor import FileDescriptor

from stc_npu_agent.dra import api_pb2 as dra_pb2
from stc_npu_agent.drahealth import api_pb2 as health_pb2
from stc_npu_agent.pluginregistration import api_pb2 as registration_pb2
from stc_npu_agent.v1beta1 import api_pb2

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "agent" / "src" / "stc_npu_agent"
API_PACKAGES = ["v1beta1", "pluginregistration", "dra", "drahealth"]
GENERATED = ["api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py", "api_pb2_grpc.pyi"]


def test_regenerating_gives_the_committed_files(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "ci" / "gen-proto.sh"), str(tmp_path)], check=True, env=env)
    for package in API_PACKAGES:
        for name in GENERATED:
            fresh = (tmp_path / "stc_npu_agent" / package / name).read_text()
            committed = (SOURCE / package / name).read_text()
            assert fresh == committed, f"{package}/{name} is stale: run `make proto` and commit"


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


def fields(
    message: str, file: FileDescriptor = api_pb2.DESCRIPTOR
) -> dict[str, tuple[int, int, bool]]:
    descriptor = file.message_types_by_name[message]
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


def methods(file: FileDescriptor, service: str) -> list[str]:
    return [method.full_name for method in file.services_by_name[service].methods]


def test_plugin_registration_paths_and_fields_match_the_kubelet() -> None:
    # Upstream's package is "pluginregistration" (unversioned): the paths are
    # /pluginregistration.Registration/GetInfo and .../NotifyRegistrationStatus.
    file = registration_pb2.DESCRIPTOR
    assert methods(file, "Registration") == [
        "pluginregistration.Registration.GetInfo",
        "pluginregistration.Registration.NotifyRegistrationStatus",
    ]
    string, boolean = 9, 8
    assert fields("PluginInfo", file) == {
        "type": (1, string, False),
        "name": (2, string, False),
        "endpoint": (3, string, False),
        "supported_versions": (4, string, True),
    }
    assert fields("RegistrationStatus", file) == {
        "plugin_registered": (1, boolean, False),
        "error": (2, string, False),
    }


def test_dra_paths_and_fields_match_the_kubelet() -> None:
    file = dra_pb2.DESCRIPTOR
    assert methods(file, "DRAPlugin") == [
        "k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin.NodePrepareResources",
        "k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin.NodeUnprepareResources",
    ]
    string, message = 9, 11
    assert fields("Claim", file) == {
        "namespace": (1, string, False),
        "uid": (2, string, False),
        "name": (3, string, False),
    }
    assert fields("Device", file) == {
        "request_names": (1, string, True),
        "pool_name": (2, string, False),
        "device_name": (3, string, False),
        "cdi_device_ids": (4, string, True),
    }
    assert fields("NodePrepareResourceResponse", file) == {
        "devices": (1, message, True),
        "error": (2, string, False),
    }
    assert fields("NodeUnprepareResourceResponse", file) == {"error": (1, string, False)}
    # map<string, ...> fields are repeated messages on the wire.
    assert fields("NodePrepareResourcesResponse", file) == {"claims": (1, message, True)}


def test_dra_health_paths_and_fields_match_the_kubelet() -> None:
    file = health_pb2.DESCRIPTOR
    assert file.package == "v1"
    assert methods(file, "DRAResourceHealth") == ["v1.DRAResourceHealth.NodeWatchResources"]
    method = file.services_by_name["DRAResourceHealth"].methods_by_name["NodeWatchResources"]
    assert method.server_streaming
    string, message, enum, int64 = 9, 11, 14, 3
    assert fields("DeviceHealth", file) == {
        "device": (1, message, False),
        "health": (2, enum, False),
        "last_updated_time": (3, int64, False),
        "health_check_timeout_seconds": (4, int64, False),
        "message": (5, string, False),
    }
    assert fields("DeviceIdentifier", file) == {
        "pool_name": (1, string, False),
        "device_name": (2, string, False),
    }
    assert {v.name: v.number for v in file.enum_types_by_name["HealthStatus"].values} == {
        "UNKNOWN": 0,
        "HEALTHY": 1,
        "UNHEALTHY": 2,
    }
