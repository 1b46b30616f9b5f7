#!/usr/bin/env bash
# The main job (`make demo`): PAPO on the tiny Qwen2.5-VL flavor and the built-in synthetic shapes
# task, on this CPU machine. Extra arguments are passed on as config overrides, e.g.
#   NPROC=2 bash examples/papo_tiny.sh steps=10 parallel.tp=2
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NPROC=${NPROC:-1}            # 1 rank is fastest on a 2-core machine; TP2xPP2 needs NPROC=4
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export TOKENIZERS_PARALLELISM=false
"$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megatron_papo.train \
    --config examples/configs/papo_tiny.yaml --resume auto "$@"
