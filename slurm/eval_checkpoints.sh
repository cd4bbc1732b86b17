#!/bin/bash
# Every checkpoint of an R1-Zero run evaluated on the held-out set (megatron-r1 eval-checkpoints):
# the same ranks and layout as the training job, one engine start for all checkpoints, rows in
# <run_dir>/checkpoint_eval.jsonl. Steps already evaluated are skipped, so a requeued job resumes.
# examples/rl_time_scaling/study.py --slurm submits it after each training run.
#
# Submit from the repository root with the training run's config and overrides:
#   sbatch slurm/eval_checkpoints.sh conf/stages/r1_zero_qwen2.5_7b.yaml logging.run_dir=runs/r1_zero_qwen
#
#SBATCH --job-name=r1-eval-ckpts
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=04:00:00
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
r1_supervise "${R1_SRUN[@]}" "$PYTHON" -m megatron_r1.cli eval-checkpoints "$CONFIG" "$@"
