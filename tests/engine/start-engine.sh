#!/usr/bin/env bash
# Start a private Docker engine for the tests and print its DOCKER_HOST.
#
#   export DOCKER_HOST="$(bash tests/engine/start-engine.sh)"
#
# Idempotent: installs Debian's docker.io and busybox-static only if dockerd
# or busybox is missing, starts dockerd only if its socket does not answer,
# and imports the test image wirehub-test/busybox only if it is missing.
# Everything lives in WIREHUB_ENGINE_DIR (default: .cache/engine in the
# project). No registry is needed: the image is a busybox rootfs made here.
# Progress goes to stderr; stdout is only the DOCKER_HOST value.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="${WIREHUB_ENGINE_DIR:-$ROOT/.cache/engine}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
SOCK="$DIR/docker.sock"
if [ "${#SOCK}" -gt 100 ]; then
    # Unix socket paths are limited to 108 bytes: use a short, stable alias.
    LINK="/tmp/wirehub-engine-$(printf '%s' "$DIR" | md5sum | cut -c1-12)"
    ln -sfn "$DIR" "$LINK"
    SOCK="$LINK/docker.sock"
fi
IMAGE=wirehub-test/busybox
log() { echo "start-engine: $*" >&2; }

answers() {
    python3 - "$SOCK" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(2)
s.connect(sys.argv[1])
s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
sys.exit(0 if data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n")[0] + b" " else 1)
PY
}

if ! command -v dockerd >/dev/null || ! command -v busybox >/dev/null || ! command -v docker >/dev/null; then
    log "installing docker.io and busybox-static"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 docker.io busybox-static >&2; then
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 docker.io busybox-static >&2
    fi
fi

if ! answers; then
    if [ -f "$DIR/docker.pid" ] && kill -0 "$(cat "$DIR/docker.pid")" 2>/dev/null; then
        log "dockerd $(cat "$DIR/docker.pid") is running but not answering; waiting for it"
    else
        rm -f "$DIR/docker.pid" "$SOCK"
        log "starting dockerd in $DIR"
        # No network for containers (--bridge=none): tests run them with network_mode=none.
        # A short shutdown timeout: stopping the engine must not wait 15 s per container.
        setsid dockerd --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
            --host "unix://$SOCK" --data-root "$DIR/data" --exec-root "$DIR/exec" \
            --pidfile "$DIR/docker.pid" --shutdown-timeout 1 --log-level warn \
            </dev/null >>"$DIR/dockerd.log" 2>&1 &
    fi
    for _ in $(seq 1 300); do
        answers && break
        sleep 0.1
    done
    if ! answers; then
        log "dockerd did not answer within 30 s; its log:"
        tail -n 30 "$DIR/dockerd.log" >&2 || true
        exit 1
    fi
fi

export DOCKER_HOST="unix://$SOCK"
if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "importing $IMAGE"
    ROOTFS="$(mktemp -d)"
    trap 'rm -rf "$ROOTFS"' EXIT
    mkdir -p "$ROOTFS/bin" "$ROOTFS/tmp" "$ROOTFS/etc" "$ROOTFS/proc" "$ROOTFS/sys" "$ROOTFS/dev"
    chmod 1777 "$ROOTFS/tmp"
    cp "$(command -v busybox)" "$ROOTFS/bin/busybox"
    for applet in $("$ROOTFS/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$ROOTFS/bin/$applet"
    done
    tar -C "$ROOTFS" -c . | docker import -c 'ENV PATH=/bin' - "$IMAGE" >/dev/null
fi
echo "$DOCKER_HOST"
