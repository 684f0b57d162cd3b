#!/usr/bin/env bash
# Create the process work pool and register the deployments of prefect.yaml on the server in PREFECT_API_URL.
#
#   PREFECT_API_URL=http://127.0.0.1:4200/api IMIX2MIX_COLLECTION=/data/photos IMIX2MIX_OUTPUT=/data/edits \
#     deployments/setup_pool.sh
#   PREFECT_WORKER_QUERY_SECONDS=2 prefect worker start --pool imix2mix-process   # then run the work
#
# Stop a worker with Ctrl-C twice (the first SIGINT only asks it to finish).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${PREFECT_API_URL:?set PREFECT_API_URL to the server, e.g. http://127.0.0.1:4200/api}"
: "${IMIX2MIX_COLLECTION:?set IMIX2MIX_COLLECTION to the collection root edited nightly}"
export IMIX2MIX_REPO="$repo"
export IMIX2MIX_OUTPUT="${IMIX2MIX_OUTPUT:-$repo/outputs}"
export IMIX2MIX_PRESET="${IMIX2MIX_PRESET:-full}"  # full: the official weights; tiny: random-weight models that only exercise the pipeline
pool="imix2mix-process"  # the name prefect.yaml uses

cd "$repo"
if prefect work-pool inspect "$pool" >/dev/null 2>&1; then
    echo "work pool $pool exists"
else
    prefect work-pool create "$pool" --type process
fi
prefect --no-prompt deploy --all
echo "deployed with preset $IMIX2MIX_PRESET; start a worker with: prefect worker start --pool $pool"
