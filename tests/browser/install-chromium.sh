#!/usr/bin/env bash
# Make Debian's Chromium available for tests/test_browser_client.py and print its path.
#
#   CHROMIUM="$(bash tests/browser/install-chromium.sh)"
#
# Idempotent: installs the `chromium` package only if no chromium is on the
# PATH (as root, or through sudo without a password). Playwright drives it
# with executable_path; nothing downloads a browser of its own. Progress goes
# to stderr; stdout is only the path.
set -euo pipefail
log() { echo "install-chromium: $*" >&2; }

found="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$found" ]; then
    if [ "$(id -u)" -eq 0 ]; then sudo=(); elif sudo -n true 2>/dev/null; then sudo=(sudo -n); else
        log "chromium is missing and installing it needs root: apt-get install chromium"
        exit 1
    fi
    command -v apt-get >/dev/null || { log "chromium is missing and there is no apt-get to install it"; exit 1; }
    log "installing Debian's chromium (once; about a minute)"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >&2
    found="$(command -v chromium)"
fi
echo "$found"
