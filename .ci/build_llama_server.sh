#!/usr/bin/env bash
# Build llama.cpp's `llama-server` once per machine, CPU only, into the cache the tests look in
# (tests/test_remote_user.py, benchmarks/bench_batch_server.py):
#     ~/.cache/usersim_wheels/llama.cpp-build/bin/llama-server
# Why this binary: the real-server tests send token-id prompts to /v1/completions, which the
# C++ server takes and llama-cpp-python's Python server does not (string prompts only). Why from
# llama-cpp-python's sdist: PyPI is the one registry these machines reach, and the sdist vendors
# llama.cpp's whole source tree.
#
# Idempotent: a second run on the same machine finds the binary and its stamp (sdist version,
# build flags, CPU flags: GGML_NATIVE tunes it to this CPU) and returns at once. An interrupted
# build resumes where ninja left it. Fails loudly (non-zero exit) when the build fails.
#
# Env: LLAMA_CPP_PYTHON_VERSION (0.3.36), USERSIM_LLAMA_BUILD (the build dir above),
#      BUILD_JOBS (2), PYTHON (python3, whose pip downloads the sdist).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="$HOME/.cache/usersim_wheels"
BUILD="${USERSIM_LLAMA_BUILD:-$CACHE/llama.cpp-build}"
BIN="$BUILD/bin/llama-server"
JOBS="${BUILD_JOBS:-2}"
PYTHON="${PYTHON:-python3}"
# Everything the binary depends on: the stamp that says the cached build is this one.
FLAGS=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON
       -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF
       -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
       -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF)
CPU="$(grep -m1 '^flags' /proc/cpuinfo | md5sum | cut -c1-12)"
STAMP_WANT="llama-cpp-python==$VERSION ${FLAGS[*]} cpu=$CPU"
STAMP="$BUILD/usersim-build.stamp"

mkdir -p "$CACHE"
exec 9>"$CACHE/llama.cpp-build.lock"
flock 9  # two CI runs on one machine: the second waits, then reuses the first one's binary

if [[ -x "$BIN" && -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_WANT" ]] && "$BIN" --version >/dev/null 2>&1; then
  echo "llama-server: cached build $BIN ($VERSION)"
  exit 0
fi

if ! command -v cmake >/dev/null 2>&1 || ! command -v ninja >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake ninja-build g++ >/dev/null
  else
    echo "build_llama_server: cmake, ninja and g++ are needed (apt-get install cmake ninja-build g++)" >&2
    exit 1
  fi
fi

start=$(date +%s)
SRC_ROOT="$CACHE/llama_cpp_python-$VERSION"
SRC="$SRC_ROOT/vendor/llama.cpp"
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
  tmp="$(mktemp -d "$CACHE/sdist.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  echo "llama-server: downloading the llama-cpp-python $VERSION sdist from PyPI"
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
  tar xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$tmp"
  rm -rf "$SRC_ROOT"
  mv "$tmp/llama_cpp_python-$VERSION" "$SRC_ROOT"
fi

# a build tree configured for another version or other flags starts over
if [[ -f "$STAMP" && "$(cat "$STAMP")" != "$STAMP_WANT" ]]; then
  rm -rf "$BUILD"
fi
rm -f "$STAMP"
echo "llama-server: building $VERSION with $JOBS jobs (nice) into $BUILD"
nice -n 10 cmake -S "$SRC" -B "$BUILD" "${FLAGS[@]}" >"$CACHE/llama.cpp-configure.log" 2>&1 \
  || { tail -40 "$CACHE/llama.cpp-configure.log" >&2; echo "build_llama_server: cmake configure failed" >&2; exit 1; }
nice -n 10 cmake --build "$BUILD" --target llama-server -j "$JOBS" >"$CACHE/llama.cpp-build.log" 2>&1 \
  || { tail -60 "$CACHE/llama.cpp-build.log" >&2; echo "build_llama_server: build failed (log: $CACHE/llama.cpp-build.log)" >&2; exit 1; }
"$BIN" --version >/dev/null 2>&1 || { echo "build_llama_server: $BIN does not run" >&2; exit 1; }
echo "$STAMP_WANT" >"$STAMP"
echo "llama-server: built $BIN in $(( $(date +%s) - start )) s"
