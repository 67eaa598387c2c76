#!/usr/bin/env bash
# Install Debian's Chromium for the browser test (tests/test_browser.py drives it with Playwright).
# Idempotent: does nothing when a `chromium` binary is already on PATH.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(command -v chromium)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
command -v chromium >/dev/null 2>&1 || { echo "chromium was not installed" >&2; exit 1; }
echo "installed chromium: $(command -v chromium)"
