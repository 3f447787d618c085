#!/usr/bin/env bash
# Ray job: score a checkpoint at 1, 2, 4 and 8 sampling steps (its config travels inside the checkpoint).
#   ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml -- bash jobs/eval.sh CHECKPOINT
# example: bash jobs/eval.sh /mnt/tim/runs/tim-b4-256/checkpoint_00400000
set -euo pipefail
cd "$(dirname "$0")/.."
exec tim-ray eval --nfe 1,2,4,8 --num-samples 1000 "$@"
