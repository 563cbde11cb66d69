#!/usr/bin/env bash
# Incremental re-embedding for cron on a machine with a Ray head (see cluster/README.md):
#   */30 * * * * cd /path/to/devise && cluster/reembed.sh /data/runs/devise/model /data/images /data/embeddings >> /var/log/devise-reembed.log 2>&1
# Overlapping runs are safe: the embed job takes a lock on the output folder, so a second run
# waits or exits, and readers switch to a new version only when it is complete.
set -euo pipefail
MODEL="$1" IMAGES="$2" OUT="$3"
cd "$(dirname "$0")/.."
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
exec .venv/bin/ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
    python jobs/embed.py --model "$MODEL" --images "$IMAGES" --out "$OUT" --incremental \
    --num-workers "${DEVISE_EMBED_WORKERS:-2}"
