#!/usr/bin/env bash
# Regenerate exdrop/proto/caffe_descriptor.bin (a serialized FileDescriptorSet)
# from exdrop/proto/caffe.proto.  Needs `protoc` (Debian: protobuf-compiler) or,
# failing that, grpcio-tools in the Python given by $PYTHON (default: python3).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/exdrop/proto/caffe_descriptor.bin}"
args=(--proto_path="$root/exdrop/proto" --descriptor_set_out="$out" caffe.proto)
if command -v protoc >/dev/null 2>&1; then
  protoc "${args[@]}"
elif "${PYTHON:-python3}" -c "import grpc_tools.protoc" >/dev/null 2>&1; then
  "${PYTHON:-python3}" -m grpc_tools.protoc "${args[@]}"
else
  echo "gen_proto.sh: no protoc found (apt-get install protobuf-compiler, or pip install grpcio-tools)" >&2
  exit 2
fi
echo "wrote $out"
