#!/usr/bin/env bash
# Create or update vaeft's Prefect work pools from the base job templates beside this script.
# Idempotent: --overwrite updates an existing pool in place (its queues and deployments stay).
#
#   infra/pools.sh                   # every pool below
#   infra/pools.sh vaeft-gpu ...     # only the named ones
#
# Needs the Prefect API the workers use (PREFECT_API_URL, plus PREFECT_API_KEY for Prefect Cloud),
# set in the environment or the active profile. Creating a pool needs no cloud access, so the ECS
# pool can exist unused beside the Kubernetes ones.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# name|worker type|base job template|concurrency limit (flow runs at once; GPU pools cap spend)
pools=(
  "vaeft-gpu|kubernetes|k8s/base-job-template.json|${VAEFT_GPU_POOL_LIMIT:-2}"
  "vaeft-cpu|kubernetes|k8s/cpu-base-job-template.json|"
  "vaeft-gpu-ecs|ecs|ecs/base-job-template.json|${VAEFT_GPU_POOL_LIMIT:-2}"
)

if ! command -v prefect >/dev/null 2>&1; then
  echo "error: prefect is not on PATH (activate the project's virtualenv)" >&2
  exit 1
fi
# Without an API URL the CLI starts a throwaway local server and the pools would vanish with it.
if ! prefect config view --hide-sources 2>/dev/null | grep -q '^PREFECT_API_URL='; then
  echo "error: PREFECT_API_URL is not set (export it or 'prefect config set PREFECT_API_URL=...')" >&2
  exit 1
fi

wanted=("$@")
is_wanted() {
  local name=$1 w
  [ "${#wanted[@]}" -eq 0 ] && return 0
  for w in "${wanted[@]}"; do
    [ "$w" = "$name" ] && return 0
  done
  return 1
}

for entry in "${pools[@]}"; do
  IFS='|' read -r name type template limit <<<"$entry"
  is_wanted "$name" || continue
  echo "pool $name ($type, $template)"
  prefect work-pool create "$name" --type "$type" \
    --base-job-template "$here/$template" --overwrite
  if [ -n "$limit" ]; then
    prefect work-pool set-concurrency-limit "$name" "$limit"
  fi
done
