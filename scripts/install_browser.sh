#!/usr/bin/env bash
# Install a headless Chromium from the system's packages for the page test (Playwright drives it
# with executable_path; Playwright's own browser download is never used). Skips when one is there.
set -euo pipefail
for b in chromium-headless-shell chromium chromium-browser; do
    if command -v "$b" >/dev/null 2>&1; then
        exit 0
    fi
done
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "No headless Chromium found; the browser test will be skipped." \
        "Install one as root: apt-get install -y chromium-headless-shell" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq chromium-headless-shell >/dev/null 2>&1 \
    || apt-get install -y -qq chromium >/dev/null
