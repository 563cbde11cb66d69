#!/usr/bin/env bash
# Create the virtual environment and install devise with every extra (serve, index, dev), at the
# exact versions in constraints.txt (the ones the project is tested with).
# Uses uv with the machine's local wheel folders when they exist (torch is large), else plain pip.
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/uv.sh"
CONSTRAINTS="$(cd "$HERE/.." && pwd)/constraints.txt"

echo "Installing devise with every extra into $VENV at the versions in constraints.txt" \
    "(a few minutes the first time)"
if [ -n "$UV" ]; then
    "$UV" venv --quiet --allow-existing --python "$PYTHON" "$VENV"
    "$UV" pip install --quiet --python "$VENV/bin/python" "${FIND_LINKS[@]}" -c "$CONSTRAINTS" \
        -e ".[dev,serve,index]"
else
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet -c "$CONSTRAINTS" -e ".[dev,serve,index]"
fi
bash "$(dirname "$0")/install_browser.sh"  # headless Chromium for the page test; skipped when present
"$VENV/bin/python" -c "import devise, torch, ray; print('devise', devise.__version__, '| torch', torch.__version__, '| ray', ray.__version__)"
