#!/usr/bin/env bash
# Docker for the deployment checks on a Debian machine (CI, these development machines).
#
#   scripts/docker_engine.sh tools   docker-compose (Debian's 1.29) for `docker-compose config` in
#                                    `make test`; installed when root and missing, else a note
#   scripts/docker_engine.sh start   + docker.io and debootstrap; start dockerd unless an engine
#                                    answers (overlay2, falling back to vfs)
#   scripts/docker_engine.sh stop    stop the dockerd that `start` started (nothing else)
#
# LATENTPI_SKIP_APT=1: never call apt-get (as scripts/install.sh).
set -euo pipefail

PIDFILE=/run/latentpi-dockerd.pid
LOG=/tmp/latentpi-dockerd.log
DOCKER=/usr/bin/docker   # Debian's client (its `docker build` needs no buildx plugin)
[ -x "$DOCKER" ] || DOCKER=docker

log() { printf '[docker] %s\n' "$*" >&2; }

apt_install() {  # apt_install COMMAND PACKAGE...: install PACKAGEs unless COMMAND exists
  local command="$1"; shift
  command -v "$command" >/dev/null 2>&1 && return 0
  if [ "${LATENTPI_SKIP_APT:-0}" = 1 ] || [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    log "$command missing and not installed here (needs root and apt-get): $*"
    return 1
  fi
  log "apt-get install $*"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

engine_answers() { "$DOCKER" info >/dev/null 2>&1; }

start() {
  apt_install dockerd docker.io
  apt_install docker-compose docker-compose
  apt_install debootstrap debootstrap
  if engine_answers; then log "an engine is running"; return; fi
  local driver
  for driver in overlay2 vfs; do
    log "starting dockerd ($driver), log $LOG"
    dockerd --storage-driver "$driver" >"$LOG" 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 60); do
      engine_answers && { log "dockerd $(cat "$PIDFILE") up ($driver)"; return; }
      kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break
      sleep 1
    done
    log "dockerd did not come up with $driver:"; tail -5 "$LOG" >&2
    kill "$(cat "$PIDFILE")" 2>/dev/null || true
    rm -f "$PIDFILE"
  done
  exit 1
}

stop() {
  [ -f "$PIDFILE" ] || { log "no dockerd started by this script"; return; }
  local pid; pid="$(cat "$PIDFILE")"
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping dockerd $pid"
    kill "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  fi
  rm -f "$PIDFILE"
}

case "${1:-}" in
  tools) apt_install docker-compose docker-compose || true ;;
  start) start ;;
  stop) stop ;;
  *) log "usage: $0 tools|start|stop"; exit 2 ;;
esac
