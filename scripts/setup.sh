#!/usr/bin/env bash
# Create the virtual environment and install devise with its dev extras.
# Uses uv with the machine's local wheel folders when they exist (torch is large), else plain pip.
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

links=()
for d in /opt/wheels /opt/pypi-more/files /opt/pypi/files; do
    [ -d "$d" ] && links+=(--find-links "$d")
done

if ! command -v uv >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet --user uv 2>/dev/null || "$PYTHON" -m pip install --quiet uv
fi
UV="$(command -v uv || echo "$("$PYTHON" -m site --user-base)/bin/uv")"

if [ -x "$UV" ]; then
    "$UV" venv --quiet --allow-existing --python "$PYTHON" "$VENV"
    "$UV" pip install --python "$VENV/bin/python" "${links[@]}" -e ".[dev]"
else
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet -e ".[dev]"
fi
bash "$(dirname "$0")/install_browser.sh"  # headless Chromium for the page test; skipped when present
"$VENV/bin/python" -c "import devise, torch, ray; print('devise', devise.__version__, '| torch', torch.__version__, '| ray', ray.__version__)"
