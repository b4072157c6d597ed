#!/usr/bin/env bash
# Regenerates the committed protobuf/gRPC modules from every api.proto of the
# kubelet APIs the agent speaks (device plugin, plugin registration, DRA,
# DRA device health).
# Usage: ci/gen-proto.sh [OUT_DIR]   (default: in place, inside the package)
# The check in tests/agent/test_proto_gen.py generates into a temp dir and
# compares, so a hand edit or a generator bump without regenerating fails CI.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
src=agent/src
out=${1:-$src}
# The mypy stub plugins live next to the interpreter (the venv's bin).
bin=$(dirname "$python")
"$python" -m grpc_tools.protoc -I "$src" \
  --plugin=protoc-gen-mypy="$bin/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$bin/protoc-gen-mypy_grpc" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  stc_npu_agent/v1beta1/api.proto \
  stc_npu_agent/pluginregistration/api.proto \
  stc_npu_agent/dra/api.proto \
  stc_npu_agent/drahealth/api.proto
