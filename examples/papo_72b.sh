#!/usr/bin/env bash
# Qwen2.5-VL-72B PAPO on a GPU cluster: 8 nodes x 8 GPUs, TP8 x PP4 x DP2 (docs/scaling.md).
# Run this script on every node (examples/slurm/papo_72b.sbatch does it under SLURM), with:
#   NNODES (8), NODE_RANK (0..7), MASTER_ADDR (node 0), MASTER_PORT (29500)
#   HF_DIR   the Hugging Face Qwen2.5-VL-72B-Instruct folder (tokenizer, config, safetensors)
#   CKPT     where the converted Megatron checkpoint goes (shared filesystem)
# Extra arguments are config overrides (section.key=value).
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-8}; NODE_RANK=${NODE_RANK:-0}; GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
HF_DIR=${HF_DIR:-models/Qwen2.5-VL-72B-Instruct}
CKPT=${CKPT:-checkpoints/qwen2_5_vl_72b_tp8pp4}
PY=${PY:-python}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron: ordered TP/SP communication kernels
export NCCL_ASYNC_ERROR_HANDLING=1
export TOKENIZERS_PARALLELISM=false

# 1. HF -> Megatron once (streams tensor by tensor; never holds the 145 GB model in memory).
#    Node 0 converts; the others wait for the checkpoint's completion marker on the shared filesystem.
if [ ! -f "$CKPT/.metadata" ]; then
  if [ "$NODE_RANK" = 0 ]; then
    "$PY" tools/convert_hf_to_megatron.py --hf-dir "$HF_DIR" --out "$CKPT" --tp 8 --pp 4 --dtype bf16
  else
    while [ ! -f "$CKPT/.metadata" ]; do sleep 30; done
  fi
fi

# 2. Train (resumes from the newest complete checkpoint after a preemption / requeue).
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --nproc-per-node "$GPUS_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m megatron_papo.train --config examples/configs/papo_72b.yaml --resume auto \
    model.load="$CKPT" model.tokenizer_dir="$HF_DIR" "$@"
