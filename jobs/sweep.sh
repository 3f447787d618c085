#!/usr/bin/env bash
# Ray job: sweep the (t, r) sampling distribution (jobs/configs/sweep_space.toml) with Ray Tune, ASHA stopping weak
# trials early and Optuna drawing the next, on the proxy recipe jobs/configs/sweep_gpu.toml: 16 one-GPU trials,
# 8 at a time (the cluster's elastic maximum of GPUs).
#   ray job submit --address http://HEAD:8265 --runtime-env jobs/runtime_env.yaml -- bash jobs/sweep.sh [section.key=value ...]
# example: bash jobs/sweep.sh train.steps=2000
set -euo pipefail
cd "$(dirname "$0")/.."
exec tim-ray tune --space jobs/configs/sweep_space.toml --num-samples 16 --scheduler asha --search optuna --max-concurrent 8 jobs/configs/sweep_gpu.toml "$@"
