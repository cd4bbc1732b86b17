#!/bin/bash
# R1-Zero GRPO on a GPU cluster: srun starts one Python rank per GPU (8 per node); Megatron-Core
# trains and a vLLM engine colocated on the same GPUs samples rollouts (weights synced in memory
# every step). Ten minutes before the time limit, or when preempted, the ranks finish their step,
# save it, and the job requeues itself and resumes there (slurm/common.sh).
#
# Submit from the repository root; the log is <job-name>-<job-id>.out there:
#   sbatch slurm/r1_zero.sh                                    # Qwen2.5-7B recipe, 1 node
#   sbatch --nodes=32 slurm/r1_zero.sh conf/stages/r1_zero_deepseek_v3.yaml
#   sbatch slurm/r1_zero.sh conf/stages/r1_zero_qwen2.5_7b.yaml optimizer.lr=5e-7   # overrides
#   sbatch --nodes=2 slurm/r1_zero.sh conf/stages/r1_zero_qwen2.5_7b.yaml placement=disaggregated \
#       parallel.rollout_ranks=8 async.max_staleness=1 rollout.gpu_memory_utilization=0.9
#     (the last node's 8 ranks only generate, the first node's only train, one step stale; README,
#      "Rollout ranks apart from the trainer")
#
#SBATCH --job-name=r1-zero
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# (--signal: SIGUSR1 to the batch shell 600 s before the limit, time for a step and a checkpoint;
#  --open-mode=append: a requeued run adds to the log instead of truncating it;
#  --output: relative to the submit directory, which exists when Slurm opens it.)

set -euo pipefail
# shellcheck source=slurm/common.sh
source "${R1_ROOT:-${SLURM_SUBMIT_DIR:?submit with sbatch}}/slurm/common.sh"

CONFIG=${1:-conf/stages/r1_zero_qwen2.5_7b.yaml}
(($# == 0)) || shift
r1_supervise "${R1_SRUN[@]}" "$PYTHON" -m megatron_r1.cli r1-zero "$CONFIG" "$@"
