#!/usr/bin/env bash
# Install the newest wheel in dist/ into a fresh virtual environment outside the checkout (core
# dependencies only, at the versions in constraints.txt) and use it from there: `devise --help`,
# `python -m devise --help`, then scripts/wheel_smoke.py (package files present, catalog -> embed
# --local -> search on generated images), then adds the extras (devise[all]) and imports them.
# PYTHON picks the interpreter (default python3.11); SMOKE=0 stops after the two --help runs.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
SMOKE="${SMOKE:-1}"
source "$ROOT/scripts/uv.sh"

WHEEL="$(ls -t "$ROOT"/dist/devise-*.whl 2>/dev/null | head -1)"
[ -n "$WHEEL" ] || { echo "check-wheel: no wheel in dist/; run make wheel" >&2; exit 1; }
WORK="$(mktemp -d "${TMPDIR:-/tmp}/devise-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
VENV="$WORK/venv"
start=$SECONDS

if [ -n "$UV" ]; then
    "$UV" venv --quiet --python "$PYTHON" "$VENV"
    "$UV" pip install --quiet --python "$VENV/bin/python" "${FIND_LINKS[@]}" \
        -c "$ROOT/constraints.txt" "$WHEEL"
else
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet -c "$ROOT/constraints.txt" "$WHEEL"
fi
echo "check-wheel: installed $(basename "$WHEEL") with $("$VENV/bin/python" --version) in $((SECONDS - start)) s"

# Run from the empty folder, with no PYTHONPATH: nothing can come from the checkout.
cd "$WORK"
unset PYTHONPATH
export DEVISE_HOME="$WORK/home" RAY_USAGE_STATS_ENABLED=0
t=$SECONDS
"$VENV/bin/devise" --help >"$WORK/help1.txt"
"$VENV/bin/python" -m devise --help >"$WORK/help2.txt"
t=$((SECONDS - t))
cmp -s "$WORK/help1.txt" "$WORK/help2.txt" || { echo "check-wheel: the two --help outputs differ" >&2; exit 1; }
grep -q "usage: devise" "$WORK/help1.txt"
echo "check-wheel: devise --help and python -m devise --help work ($(grep -c '^    [a-z]' "$WORK/help1.txt") commands, $t s for both)"

if [ "$SMOKE" != 0 ]; then
    git -C "$ROOT" ls-files devise | grep -v '/__pycache__/' | grep -v '\.pyc$' >"$WORK/package-files.txt"
    cp "$ROOT/scripts/wheel_smoke.py" "$WORK/"
    mkdir "$WORK/smoke" && cd "$WORK/smoke"
    "$VENV/bin/python" -I "$WORK/wheel_smoke.py" "$WORK/package-files.txt"
fi
if [ "$SMOKE" != 0 ] && [ -n "$UV" ]; then
    # The extras resolve from the wheel's metadata and their modules import.
    t=$SECONDS
    "$UV" pip install --quiet --python "$VENV/bin/python" "${FIND_LINKS[@]}" \
        -c "$ROOT/constraints.txt" "$WHEEL[all]"
    "$VENV/bin/python" -I -c "import faiss, fastapi, uvicorn, multipart, ray.serve"
    echo "check-wheel: devise[all] (serve, index) installs and imports ($((SECONDS - t)) s)"
fi
echo "check-wheel: OK in $((SECONDS - start)) s"
