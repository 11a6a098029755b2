#!/usr/bin/env bash
# Start a private Docker engine for the tests and print its DOCKER_HOST.
#
#   export DOCKER_HOST="$(bash tests/engine/start-engine.sh)"
#
# Idempotent: installs Debian's docker.io and busybox-static only if dockerd,
# docker or busybox is missing, starts dockerd only if its socket does not
# answer, and imports the test image wirehub-test/busybox only if it is
# missing. The engine's data lives in WIREHUB_ENGINE_DIR (default:
# .cache/engine in the project); its sockets live in a short directory under
# /tmp named after it (unix socket paths are limited to about 104 bytes, and
# dockerd puts containerd's sockets there too). No registry is needed: the
# image is a busybox rootfs made here, and containers run without network.
# Progress goes to stderr; stdout is only the DOCKER_HOST value.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="${WIREHUB_ENGINE_DIR:-$ROOT/.cache/engine}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
RUN="/tmp/wirehub-engine-$(printf '%s' "$DIR" | md5sum | cut -c1-12)"
mkdir -p "$RUN"
SOCK="$RUN/docker.sock"
ln -sfn "$SOCK" "$DIR/docker.sock"   # where the tests look for "the scripts' engine"
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
status = data.split(b"\r\n", 1)[0].split(b" ")
sys.exit(0 if len(status) > 1 and status[1] == b"200" else 1)
PY
}

if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null || ! command -v busybox >/dev/null; then
    log "installing docker.io and busybox-static"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 docker.io busybox-static >&2; then
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 docker.io busybox-static >&2
    fi
fi

if ! answers; then
    PID=""
    if [ -f "$DIR/docker.pid" ] && kill -0 "$(cat "$DIR/docker.pid")" 2>/dev/null; then
        PID="$(cat "$DIR/docker.pid")"
        log "dockerd $PID is running but not answering yet; waiting for it"
    else
        rm -f "$DIR/docker.pid" "$SOCK"
        log "starting dockerd (data in $DIR, sockets in $RUN)"
        # No network for containers (--bridge=none): tests run them with network_mode=none.
        # A short shutdown timeout: stopping the engine must not wait 15 s per container.
        setsid dockerd --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
            --host "unix://$SOCK" --data-root "$DIR/data" --exec-root "$RUN/exec" \
            --pidfile "$DIR/docker.pid" --shutdown-timeout 1 --log-level warn \
            </dev/null >>"$DIR/dockerd.log" 2>&1 &
        PID=$!
    fi
    deadline=$((SECONDS + 30))
    until answers; do
        if ! kill -0 "$PID" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
            log "dockerd did not start (see $DIR/dockerd.log); its last lines:"
            tail -n 15 "$DIR/dockerd.log" | cut -c1-300 >&2 || true
            kill "$PID" 2>/dev/null || true
            exit 1
        fi
        sleep 0.1
    done
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
