# Sourced by the set-up scripts: sets UV (the uv binary, installed with pip if missing; empty if
# that fails) and FIND_LINKS (the machine's local wheel folders, which uv does not read from pip's
# configuration; without them uv downloads several GB of torch).
FIND_LINKS=()
for d in /opt/wheels /opt/pypi-more/files /opt/pypi/files; do
    [ -d "$d" ] && FIND_LINKS+=(--find-links "$d")
done
if ! command -v uv >/dev/null 2>&1; then
    "${PYTHON:-python3}" -m pip install --quiet --user uv 2>/dev/null \
        || "${PYTHON:-python3}" -m pip install --quiet uv 2>/dev/null || true
fi
UV="$(command -v uv || echo "$("${PYTHON:-python3}" -m site --user-base)/bin/uv")"
[ -x "$UV" ] || UV=""
