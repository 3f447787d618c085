#!/usr/bin/env bash
# Ray job: the CPU quickstart (configs/quickstart.toml) on a running Ray cluster.
#   ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml -- bash jobs/quickstart.sh [section.key=value ...]
# On a multi-node cluster pass train.output_dir=/mnt/tim/runs (the shared volume), or the run is split across pods.
# example: bash jobs/quickstart.sh train.output_dir=/mnt/tim/runs
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root (the uploaded working_dir, or /opt/tim-ray in the images)
exec tim-ray train configs/quickstart.toml "$@"
