#!/usr/bin/env bash
# Ray job: sweep the (t, r) sampling distribution of jobs/configs/train_gpu.toml with Ray Tune (ASHA + Optuna) over
# shorter 4-GPU runs, two trials at a time (8 GPUs: the cluster's elastic maximum).
#   ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml -- bash jobs/sweep.sh [section.key=value ...]
# example: bash jobs/sweep.sh train.steps=10000
set -euo pipefail
cd "$(dirname "$0")/.."
exec tim-ray tune --space jobs/configs/sweep_space.toml --num-samples 16 --scheduler asha --search optuna --max-concurrent 2 jobs/configs/train_gpu.toml train.name=tim-b4-256-sweep train.steps=20000 ray.num_workers=4 ray.min_workers=0 "$@"
