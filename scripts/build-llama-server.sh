#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (CPU only) for `scripts/serve-bench.sh`: the sources
# vendored in llama-cpp-sys-2 lack tools/server, so they come from the llama-cpp-python 0.3.36
# source distribution (the full llama.cpp tree), fetched with pip and sha256-checked.
# About 10 minutes on 2 cores; prints the binary's path. A benchmark peer, never a runtime
# dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/llama-server}
sha=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
bin="$out/build/bin/llama-server"
if [ ! -x "$bin" ]; then
  mkdir -p "$out"
  tgz="$out/llama_cpp_python-0.3.36.tar.gz"
  if [ ! -f "$tgz" ]; then
    python3 -m pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d "$out" >&2
  fi
  echo "$sha  $tgz" | sha256sum -c --quiet - >&2 || { echo "$tgz: sha256 mismatch" >&2; exit 1; }
  [ -d "$out/src" ] || { mkdir -p "$out/src" && tar -xzf "$tgz" -C "$out/src" --strip-components=1; }
  cmake -S "$out/src/vendor/llama.cpp" -B "$out/build" -DCMAKE_BUILD_TYPE=Release \
      -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON \
      -DBUILD_SHARED_LIBS=OFF >&2
  cmake --build "$out/build" --target llama-server -j "$(nproc)" >&2
fi
echo "$bin"
