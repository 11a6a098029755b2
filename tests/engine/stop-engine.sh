#!/usr/bin/env bash
# Stop the engine start-engine.sh started (same WIREHUB_ENGINE_DIR); its data stays.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="${WIREHUB_ENGINE_DIR:-$ROOT/.cache/engine}"
PIDFILE="$DIR/docker.pid"
[ -f "$PIDFILE" ] || exit 0
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
