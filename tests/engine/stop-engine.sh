#!/usr/bin/env bash
# Stop the engine start-engine.sh started (same WIREHUB_ENGINE_DIR); its data stays.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="${WIREHUB_ENGINE_DIR:-$ROOT/.cache/engine}"
[ -d "$DIR" ] || exit 0
DIR="$(cd "$DIR" && pwd)"
PIDFILE="$DIR/docker.pid"
if [ -f "$PIDFILE" ]; then
    PID="$(cat "$PIDFILE")"
    if kill -0 "$PID" 2>/dev/null; then
        kill -TERM "$PID"
        for _ in $(seq 1 200); do
            kill -0 "$PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$PID" 2>/dev/null; then
            echo "stop-engine: dockerd $PID did not stop within 20 s; killing it" >&2
            kill -KILL "$PID" 2>/dev/null || true
        fi
    fi
    rm -f "$PIDFILE"
fi
# dockerd bind-mounts its data root; a daemon that died early may leave that behind.
for mount in $(grep -o " $DIR/[^ ]*" /proc/mounts 2>/dev/null | sort -r || true); do
    umount "$mount" 2>/dev/null || true
done
