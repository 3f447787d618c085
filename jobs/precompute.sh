#!/usr/bin/env bash
# Ray job: encode the training data of jobs/configs/train_gpu.toml once (text features + SD-VAE latents, on GPUs)
# into parquet shards on the shared volume; then train on them with data.precomputed=/mnt/tim/latents/train_gpu.
# The output directory must not hold a precompute already (pass --out DIR to write elsewhere).
#   ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml -- bash jobs/precompute.sh [section.key=value ...]
# example: bash jobs/precompute.sh data.max_samples=100000
set -euo pipefail
cd "$(dirname "$0")/.."
# Options before the config: tim-ray reads section.key=value overrides only after CONFIG, never after an option.
exec tim-ray precompute --out /mnt/tim/latents/train_gpu jobs/configs/train_gpu.toml data.encode_gpus=1 data.encode_actors=4 "$@"
