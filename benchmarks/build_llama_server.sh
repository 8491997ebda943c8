#!/usr/bin/env bash
# Build llama.cpp's native `llama-server` (CPU only) from the llama.cpp sources vendored in the llama-cpp-python
# sdist: a benchmark peer for benchmarks/serving_vs_llamacpp.sh, never a runtime dependency of lmserve.
# Usage: benchmarks/build_llama_server.sh [SDIST_TAR_GZ] [BUILD_DIR]   (prints the binary's path last)
# Without SDIST_TAR_GZ it is downloaded with pip (llama-cpp-python==0.3.36, the version measured in RESULTS.md).
set -euo pipefail
SDIST="${1:-}"
BUILD_DIR="${2:-${TMPDIR:-/tmp}/llama-server-build}"
mkdir -p "$BUILD_DIR"
if [ -z "$SDIST" ]; then
  python3 -m pip download --no-deps --no-binary :all: -d "$BUILD_DIR" llama-cpp-python==0.3.36 >&2
  SDIST=$(ls "$BUILD_DIR"/llama_cpp_python-*.tar.gz | head -1)
fi
tar -xzf "$SDIST" -C "$BUILD_DIR"
SRC=$(ls -d "$BUILD_DIR"/llama_cpp_python-*/vendor/llama.cpp | head -1)
cmake -S "$SRC" -B "$BUILD_DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$BUILD_DIR/build" --target llama-server -j "$(nproc)" >&2
echo "$BUILD_DIR/build/bin/llama-server"
