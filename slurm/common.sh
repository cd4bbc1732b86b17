# shellcheck shell=bash
# Sourced by the sbatch scripts beside it: environment, rendezvous, and a launch that turns a
# preemption warning into a saved step and a requeue.
#
# How a signal travels:
#   Slurm --(SIGUSR1, `--signal=B:USR1@<s>`: the batch shell only)--> this shell's trap
#         --(kill -USR1)--> srun --(srun forwards the signals it receives to its tasks)--> every Python rank
# srun starts the ranks itself (megatron_r1/distributed.py reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
# and the first host of the node list): torchrun in between would not forward SIGUSR1 (its default
# action would kill torchrun). Each rank finishes its step, all agree at the step boundary, save that
# step and exit with REQUEUE_EXIT_CODE; then this shell runs `scontrol requeue`, and the requeued job
# (same id, SLURM_RESTART_COUNT+1) resumes from the checkpoint: runs resume by default.
# On preemption Slurm itself sends SIGTERM to every process of the job; the ranks treat it like
# SIGUSR1 (they must finish the step within the partition's GraceTime). A bash shell runs its traps
# only between commands, hence the launch in the background and `wait`.
#
# To try it on a running job: scancel --batch --signal=USR1 <jobid>   (the local stand-ins in
# tools/slurm_local/ do the same on one machine: `make slurm-smoke`).

REQUEUE_EXIT_CODE=75  # megatron_r1/train/preemption.py REQUEUE_EXIT_CODE (EX_TEMPFAIL)

# Slurm runs a copy of the batch script from its spool directory, so paths come from the submit
# directory: submit from the repository root, or export R1_ROOT=/path/to/megatron-r1 before sbatch
# (every script reads this file from there too).
#
# Site settings go on the sbatch line; they override the #SBATCH defaults of each script:
#   sbatch --partition=gpu --account=myproj --time=12:00:00 --cpus-per-task=16 slurm/r1_zero.sh ...
# --cpus-per-task: the defaults assume 96 CPU cores per 8-GPU node (12 per rank); give your node's
# cores / 8. --time: a run longer than the limit saves and requeues itself, so any limit works.
R1_ROOT=${R1_ROOT:-${SLURM_SUBMIT_DIR:?run this with sbatch}}
cd "$R1_ROOT" || exit 2
PYTHON=${PYTHON:-$R1_ROOT/.venv/bin/python}
if ! command -v "$PYTHON" >/dev/null; then
  echo "no Python at $PYTHON: run 'make setup' in $R1_ROOT, or export PYTHON=/path/to/python before sbatch" >&2
  exit 2
fi
# One rank per GPU: srun starts this many tasks on every node (sbatch --ntasks-per-node sets it).
RANKS_PER_NODE=${RANKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}

# Rendezvous: the first node of the allocation, on a port derived from the job id (jobs that share a
# node do not collide; a requeued job gets the same one).
R1_HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${R1_HOSTS%%$'\n'*}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

# Megatron-Core: one CUDA connection keeps tensor-parallel communication and compute in issue order.
export CUDA_DEVICE_MAX_CONNECTIONS=1
# A failed or timed-out NCCL collective aborts the process instead of hanging the job (the current
# name of NCCL_ASYNC_ERROR_HANDLING).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_AVOID_RECORD_STREAMS=1  # frees collective buffers without recordStream: lower peak memory
# InfiniBand retransmit timeout, 4.096 us * 2^22 ~ 17 s: rides out short fabric hiccups on large jobs.
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
# Site-specific, exported before sbatch when needed (sbatch passes the submit environment on):
# NCCL_IB_HCA (which HCAs, e.g. mlx5), NCCL_SOCKET_IFNAME (bootstrap interface), NCCL_DEBUG=WARN|INFO.
# vLLM runs in-process beside the trainer (colocated), not as a separate engine process.
export VLLM_ENABLE_V1_MULTIPROCESSING=0
export PYTHONUNBUFFERED=1

echo "$(date +%T) job ${SLURM_JOB_ID} attempt $((${SLURM_RESTART_COUNT:-0} + 1)) on ${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}} node(s) x ${RANKS_PER_NODE} rank(s); rendezvous ${MASTER_ADDR}:${MASTER_PORT}"

# The ranks, started by srun (a job step over the whole allocation); used by the sourcing scripts.
# shellcheck disable=SC2034
R1_SRUN=(srun --kill-on-bad-exit=1 --ntasks-per-node="$RANKS_PER_NODE")

r1_forward() {  # r1_forward SIGNAL: pass a signal this shell received on to the running child
  echo "$(date +%T) SIG$1 received: passed on; every rank finishes its step, saves it and exits ${REQUEUE_EXIT_CODE}"
  kill -s "$1" "$R1_CHILD" 2>/dev/null || true
}

r1_supervise() {  # r1_supervise CMD...: run CMD, forward USR1/TERM to it, requeue on REQUEUE_EXIT_CODE
  "$@" &
  R1_CHILD=$!
  trap 'r1_forward USR1' USR1
  trap 'r1_forward TERM' TERM
  # A trapped signal cuts `wait` short: wait until the child is gone; bash keeps its exit status.
  while kill -0 "$R1_CHILD" 2>/dev/null; do wait "$R1_CHILD" || true; done
  local status=0
  wait "$R1_CHILD" || status=$?
  trap - USR1 TERM
  if ((status == REQUEUE_EXIT_CODE)); then
    echo "$(date +%T) checkpoint saved; requeueing job ${SLURM_JOB_ID}: it resumes from there"
    # Slurm ends this job and queues it again; nothing after this line is guaranteed to run.
    scontrol requeue "$SLURM_JOB_ID" || echo "scontrol requeue failed: resubmit the same command to resume" >&2
  fi
  return "$status"
}
