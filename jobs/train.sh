#!/usr/bin/env bash
# Ray job: train the GPU recipe jobs/configs/train_gpu.toml (elastic workers on spot GPUs, checkpoints on the shared
# volume, metrics in the cluster's MLflow). Submitting it again with the same train.name resumes from the latest
# checkpoint (tim-ray train --resume auto is the default).
#   ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml -- bash jobs/train.sh [section.key=value ...]
# example: bash jobs/train.sh train.name=tim-b4-256-run2 data.precomputed=/mnt/tim/latents/train_gpu
set -euo pipefail
cd "$(dirname "$0")/.."
exec tim-ray train jobs/configs/train_gpu.toml "$@"
