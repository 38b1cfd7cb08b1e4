#!/usr/bin/env bash
# One node of a multi-node training stage (infra/k8s/multinode-train.yaml), run from the clone.
# Rank 0 runs the stage through DVC (pull its inputs, repro, push outputs and run-cache); the other
# ranks run the stage's command directly and join its torchrun rendezvous.
#
#   infra/k8s/train-node.sh STAGE
#
# Reads VAEFT_NODE_RANK and VAEFT_DVC_REMOTE_URL (the launch variables VAEFT_NNODES,
# VAEFT_NPROC_PER_NODE and VAEFT_RDZV_ENDPOINT are read by vaeft itself).
#
# A stage that reads a pinned remote dataset (`vaeft data pin` + `vaeft data use`: its --data and
# dep are the pin file, tracked in git) runs through DVC as usual, but every rank pulls only the
# stage's own inputs (the init model, data/crops), never the upstream data/curated, and trains
# from the pinned URL, each rank fetching only the shards its samples fall in. dvc.lock records
# the pin, so the run is reproducible from the commit.
#
# With VAEFT_DATA_URL (a curated dataset's URL, s3://BUCKET/PREFIX) the same happens for a stage
# that still reads data/curated, but outside DVC: nothing records which data the run read, and
# the model is left in the stage's output folder. Prefer a pin.
set -euo pipefail

stage=${1:?usage: train-node.sh STAGE}
rank=${VAEFT_NODE_RANK:?VAEFT_NODE_RANK is not set}
remote=storage

dvc remote add --local --force "$remote" "${VAEFT_DVC_REMOTE_URL:?VAEFT_DVC_REMOTE_URL is not set}"
# Resumable state on the shared volume, so every rank of a rerun finds the same checkpoint.
mkdir -p .vaeft
ln -sfn "${VAEFT_STATE_DIR:-/home/vaeft/state}" .vaeft/state

# The stage's deps that other stages write, less the dataset itself; first, whether it reads a
# pin (no data/curated among its deps) or the local dataset.
mapfile -t inputs < <(python - "$stage" <<'EOF'
import sys
import yaml
stages = yaml.safe_load(open("dvc.yaml", encoding="utf-8"))["stages"]
outs = {o if isinstance(o, str) else next(iter(o)) for s in stages.values() for o in s.get("outs", [])}
deps = stages[sys.argv[1]].get("deps", [])
print("local" if "data/curated" in deps else "pinned")
for d in deps:
    if d in outs and d != "data/curated":
        print(d)
EOF
)
data_mode=${inputs[0]}
inputs=("${inputs[@]:1}")

if [ -n "${VAEFT_DATA_URL:-}" ] && [ "$data_mode" = local ]; then
  if [ "${#inputs[@]}" -gt 0 ]; then
    dvc pull -r "$remote" --allow-missing "${inputs[@]}"
  fi
  exec python -m vaeft stage exec "$stage" --data "$VAEFT_DATA_URL"
fi

if [ "$data_mode" = pinned ]; then
  # The stage's own inputs and outputs only: --with-deps would pull data/curated for the
  # upstream stages.
  dvc pull -r "$remote" --allow-missing "$stage" "${inputs[@]}"
else
  # The stage's own outputs come too: if the remote already has them, the stage is current.
  dvc pull -r "$remote" --allow-missing --with-deps "$stage"
fi
if [ -f weights.dvc ]; then
  dvc pull -r "$remote" weights.dvc
fi

# Every rank decides from the same commit and the same remote, so all agree; were rank 0 alone to
# skip, the others would wait at the rendezvous until the deadline.
if [ "$(dvc status --json "$stage" | tr -d '{}[:space:]')" = "" ]; then
  echo "stage $stage is up to date; nothing to train"
  exit 0
fi

if [ "$rank" = "0" ]; then
  dvc repro --single-item "$stage"
  dvc push -r "$remote" --run-cache
else
  python -m vaeft stage exec "$stage"
fi
