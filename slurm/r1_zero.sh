#!/bin/bash
# R1-Zero GRPO on an H100 cluster: one torchrun per node, 8 GPUs each; Megatron-Core trains and a
# vLLM engine colocated on the same GPUs samples rollouts (weights synced in memory every step).
#
#   sbatch slurm/r1_zero.sh                                    # Qwen2.5-7B recipe, 1 node
#   sbatch --nodes=32 slurm/r1_zero.sh conf/stages/r1_zero_deepseek_v3.yaml
#   sbatch slurm/r1_zero.sh conf/stages/r1_zero_qwen2.5_7b.yaml optimizer.lr=5e-7   # overrides
#
#SBATCH --job-name=r1-zero
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
CONFIG=${1:-conf/stages/r1_zero_qwen2.5_7b.yaml}
shift || true
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
mkdir -p logs

# Rendezvous on the first node of the allocation.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}

# NCCL over InfiniBand / NVLink; Megatron wants one CUDA connection for TP overlap ordering.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_IB_TIMEOUT=22
export NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_AVOID_RECORD_STREAMS=1
# vLLM runs in-process beside the trainer (colocated), not as a separate engine process.
export VLLM_ENABLE_V1_MULTIPROCESSING=0
export PYTHONUNBUFFERED=1

VENV=${VENV:-.venv}
srun --kill-on-bad-exit=1 bash -c "
  source $VENV/bin/activate
  torchrun --nnodes=$SLURM_NNODES --node_rank=\$SLURM_NODEID --nproc_per_node=$GPUS_PER_NODE \
           --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT \
           -m megatron_r1.cli r1-zero $CONFIG $*
"
