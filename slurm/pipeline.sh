#!/bin/bash
# The R1 stages in order (`megatron-r1 pipeline`, conf/pipelines/) on a GPU cluster. The pipeline
# driver runs here in the batch shell, one process; it launches every stage command as its own
# srun job step over the whole allocation (one rank per GPU). Signals reach the driver, which passes
# them to the running step; a preempted stage saves, the pipeline exits with the requeue status, and
# the requeued job skips the finished stages and resumes the interrupted one (slurm/common.sh).
#
# Submit from the repository root; the log is <job-name>-<job-id>.out there:
#   sbatch slurm/pipeline.sh PIPELINE.yaml [run_dir=DIR] [name=NAME]
#
#SBATCH --job-name=r1-pipeline
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

set -euo pipefail
# shellcheck source=slurm/common.sh
source "${R1_ROOT:-${SLURM_SUBMIT_DIR:?submit with sbatch}}/slurm/common.sh"

PIPELINE=${1:?usage: sbatch slurm/pipeline.sh PIPELINE.yaml [run_dir=DIR] [name=NAME]}
shift
# The pipeline splits `launcher` like a shell; %q keeps paths with spaces whole.
LAUNCHER=$(printf '%q ' "${R1_SRUN[@]}" "$PYTHON")
r1_supervise "$PYTHON" -m megatron_r1.cli pipeline "$PIPELINE" "launcher=$LAUNCHER" "$@"
