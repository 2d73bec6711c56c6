#!/usr/bin/env bash
# Regenerate the agent API stubs (protocol/agent_pb2{,_grpc}.py, agent_pb2.pyi) from
# protocol/agent.proto. Usage: scripts/gen_proto.sh [OUT_DIR]   (default: protocol/)
#
# Needs grpcio-tools==1.81.1, a dev-only dependency: it bundles protoc for protobuf 6.33.5,
# so the generated code asks for a protobuf runtime >= 6.33.5, < 7 (newer grpcio-tools pull
# protobuf 7). PYTHON picks the interpreter (default: python on PATH, e.g. the .venv's).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/protocol}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$root"
"${PYTHON:-python}" -m grpc_tools.protoc -I protocol --python_out="$out" --pyi_out="$out" \
    --grpc_python_out="$out" protocol/agent.proto
# protoc writes a bare `import agent_pb2`; the module lives in the fedpref.protocol package.
sed -i 's/^import agent_pb2 as /from fedpref.protocol import agent_pb2 as /' "$out/agent_pb2_grpc.py"
