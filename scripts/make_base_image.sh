#!/usr/bin/env bash
# A local stand-in for `python:3.11-slim`, for machines that cannot reach Docker Hub: Debian bookworm
# from debootstrap (Python 3.11 from Debian), imported with `docker import`. Both Dockerfiles take
# it as `--build-arg BASE=latentpi-base:bookworm` (scripts/docker_build.sh does that).
#
#   scripts/make_base_image.sh [TAG]        (default TAG: latentpi-base:bookworm)
#
# Needs root, debootstrap and a running Docker engine. Idempotent: an existing TAG is kept
# (LATENTPI_REBUILD_BASE=1 makes it again). Environment: DEBIAN_MIRROR (default deb.debian.org).
set -euo pipefail

TAG="${1:-latentpi-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DOCKER="${DOCKER:-docker}"

log() { printf '[base] %s\n' "$*" >&2; }

if [ "${LATENTPI_REBUILD_BASE:-0}" != 1 ] && "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
  log "$TAG exists (LATENTPI_REBUILD_BASE=1 to make it again)"
  exit 0
fi
[ "$(id -u)" = 0 ] || { log "debootstrap needs root"; exit 1; }
command -v debootstrap >/dev/null || { log "debootstrap not installed (apt-get install debootstrap)"; exit 1; }

ROOTFS="$(mktemp -d /tmp/latentpi-base.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT
start=$SECONDS
log "debootstrap bookworm into $ROOTFS"
# python3-venv: the Dockerfiles make a throwaway venv for uv (Debian's python3 has no pip).
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || { tail -30 "$ROOTFS.log" >&2; exit 1; }
rm -f "$ROOTFS.log"

cat >"$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
# As the official images: no recommends, no caches, no docs.
cat >"$ROOTFS/etc/apt/apt.conf.d/90latentpi" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
  "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
  "$ROOTFS"/var/log/*.log "$ROOTFS"/tmp/*
log "$(chroot "$ROOTFS" python3.11 --version)"

log "docker import -> $TAG"
tar -C "$ROOTFS" --numeric-owner -c . | "$DOCKER" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$TAG" >/dev/null
log "$TAG: $("$DOCKER" image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'), $((SECONDS - start)) s"
