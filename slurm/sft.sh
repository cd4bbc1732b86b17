#!/bin/bash
# Supervised fine-tuning (cold start, rejection-sampled SFT, distillation) on a GPU cluster: one
# Python rank per GPU, started by srun. Ten minutes before the time limit, or when preempted, the
# ranks finish their step, save it, and the job requeues itself and resumes there (slurm/common.sh).
#
# Submit from the repository root; the log is <job-name>-<job-id>.out there:
#   sbatch slurm/sft.sh CONFIG [section.field=value ...]
#   sbatch --nodes=4 slurm/sft.sh conf/stages/sft_tiny.yaml checkpoint.load_hf=/models/Qwen2.5-7B sft.train_path=data/sft.jsonl
#
#SBATCH --job-name=sft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail
# shellcheck source=slurm/common.sh
source "${R1_ROOT:-${SLURM_SUBMIT_DIR:?submit with sbatch}}/slurm/common.sh"

CONFIG=${1:?usage: sbatch slurm/sft.sh CONFIG [section.field=value ...]}
shift
r1_supervise "${R1_SRUN[@]}" "$PYTHON" -m megatron_r1.cli sft "$CONFIG" "$@"
