#!/usr/bin/env bash
# Qwen2.5-VL-72B PAPO on a GPU cluster: 8 nodes x 8 GPUs, TP8 x PP4 x DP2, one vLLM TP8 engine per
# node (docs/scaling.md). Run this script on every node (examples/slurm/papo_72b.sbatch does it
# under SLURM). Every size comes from the environment, with the 72B values as defaults, so the same
# script runs a CPU rehearsal at tiny size (tests/test_launchers.py):
#   NNODES (8), NODE_RANK (0..NNODES-1), GPUS_PER_NODE (8), MASTER_ADDR (node 0), MASTER_PORT (29500)
#   HF_DIR   the Hugging Face Qwen2.5-VL-72B-Instruct folder (tokenizer, config, safetensors)
#   CKPT     where the converted Megatron checkpoint goes (shared filesystem)
#   TP, PP   the training layout (8, 4): the checkpoint is converted for it and the run uses it
#   DTYPE    the converted checkpoint's dtype (bf16)
#   CONFIG   the run's YAML (examples/configs/papo_72b.yaml)
#   PY       the Python to run (python)
# Extra arguments are config overrides (section.key=value).
# SIGUSR1 / SIGTERM (SLURM's preemption notice) are passed to every rank: each finishes its step,
# saves a checkpoint and exits 0; rerunning the script resumes (--resume auto).
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-8}; NODE_RANK=${NODE_RANK:-0}; GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
HF_DIR=${HF_DIR:-models/Qwen2.5-VL-72B-Instruct}
CKPT=${CKPT:-checkpoints/qwen2_5_vl_72b_tp8pp4}
TP=${TP:-8}; PP=${PP:-4}; DTYPE=${DTYPE:-bf16}
CONFIG=${CONFIG:-examples/configs/papo_72b.yaml}
PY=${PY:-python}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron: ordered TP/SP communication kernels
export NCCL_ASYNC_ERROR_HANDLING=1
export TOKENIZERS_PARALLELISM=false

# 1. HF -> Megatron once, as one process (streams tensor by tensor; never holds the 145 GB model).
#    Node 0 converts; the others wait for the finished checkpoint (the tool renames it into place
#    when complete) on the shared filesystem.
if [ ! -f "$CKPT/.metadata" ]; then
  if [ "$NODE_RANK" = 0 ]; then
    "$PY" tools/convert_hf_to_megatron.py --hf-dir "$HF_DIR" --out "$CKPT" --tp "$TP" --pp "$PP" --dtype "$DTYPE"
  else
    while [ ! -f "$CKPT/.metadata" ]; do sleep 30; done
  fi
fi

# 2. Train (resumes from the newest complete checkpoint after a preemption / requeue). torchrun
#    dies of SIGUSR1 instead of passing it on: it runs with SIGUSR1 ignored (SLURM signals every
#    process of the step), and the signal goes to the ranks themselves, which set their own handler.
(trap '' USR1; exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --nproc-per-node "$GPUS_PER_NODE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m megatron_papo.train --config "$CONFIG" --resume auto \
    model.load="$CKPT" parallel.tp="$TP" parallel.pp="$PP" "$@") &
LAUNCHER=$!
forward() { pkill "-$1" -P "$LAUNCHER" || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# `wait` returns early when a trapped signal arrives: wait again until the launcher is done.
while true; do
  wait "$LAUNCHER" && status=0 || status=$?
  kill -0 "$LAUNCHER" 2>/dev/null || break
done
exit "$status"
