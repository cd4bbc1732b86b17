"""Preemption: a signal makes a run finish its step, save it, and exit with a status that asks for a requeue.

Slurm warns a job before its time limit (`#SBATCH --signal=B:USR1@<seconds>`, forwarded to the
ranks by `slurm/common.sh`) and sends SIGTERM on preemption (SIGKILL follows after the partition's
GraceTime). Dying mid-step would lose the step; instead every rank notes the signal and carries on
to the step boundary, where all ranks agree (all-reduce MAX: the signal reaches ranks at slightly
different times, and the checkpoint save is collective) to save that step and exit with
`REQUEUE_EXIT_CODE`. The batch script then runs `scontrol requeue`, and the requeued job resumes
from that checkpoint like any restarted run: no extra flags.

Outside Slurm the same works by hand: `kill -USR1 <pid of every rank>`.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h ("temporary failure; retry later"). Distinct from what `megatron-r1`
# otherwise returns (0 done, 1 failure, 2 config error), from 128+N (killed by signal N) and from
# Slurm's and bash's reserved statuses (126, 127, 253), so the batch script can requeue on exactly it.
REQUEUE_EXIT_CODE = 75

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Raised once the work so far is saved (on every rank); `megatron-r1` turns it into exit
    status REQUEUE_EXIT_CODE. The message says what was saved."""


class PreemptionWatch:
    """Notes SIGUSR1/SIGTERM while a loop runs; `stop_requested` (collective) tells every rank at a
    step boundary whether any rank got one. A context manager: the previous handlers come back on exit."""

    def __init__(self, signals: tuple[int, ...] = SIGNALS, restart_syscalls: bool = True) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            # Python delivers signals to the main thread only; a loop run elsewhere (a notebook
            # worker thread) keeps the default actions.
            log.warning("not in the main thread: preemption signals will not be caught")
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._note)
            # Restarted system calls (the default for a trainer): a signal must not make a blocking
            # call in a C++ library (gloo, NCCL's host side, vLLM) fail with EINTR; the handler only
            # sets a flag, read at the step boundary, so it may run late.
            signal.siginterrupt(sig, not restart_syscalls)

    def _note(self, signum: int, frame) -> None:
        self.received = signum  # nothing else: logging from a signal handler can deadlock

    def stop_requested(self, step: int) -> bool:
        """Whether any rank received a signal; every rank must call it at the same step boundary.
        Logs the decision once (rank 0)."""
        import torch  # here, not at the top: the pipeline driver uses this module without torch
        import torch.distributed as dist

        from megatron_r1 import platform

        flag = torch.tensor([float(self.received is not None)], device=platform.device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
        if stop and (not dist.is_initialized() or dist.get_rank() == 0):
            log.warning("preemption signal received; saving step %d and exiting for requeue (exit status %d)", step, REQUEUE_EXIT_CODE)
        return stop

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> PreemptionWatch:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Preempted: keep noting signals until the process is gone. `srun --kill-on-bad-exit` sends
        # SIGTERM to the ranks still tearing down once the first one has exited with our status;
        # with the default action back they would die of it (143) and hide the requeue status.
        if exc_type is not Preempted:
            self.close()


class ForwardingWatch(PreemptionWatch):
    """For a driver whose work runs in a child process (`megatron-r1 pipeline`): a signal is noted
    and passed on to the running child, which saves and exits with REQUEUE_EXIT_CODE itself."""

    def __init__(self) -> None:
        # No restarted system calls here: the driver sits in waitpid() on its child, and the
        # handler (which forwards) only runs once that call returns to Python with EINTR.
        super().__init__(restart_syscalls=False)
        self.child = None  # the running subprocess.Popen, if any

    def _note(self, signum: int, frame) -> None:
        super()._note(signum, frame)
        if self.child is not None:
            self.child.send_signal(signum)  # a no-op once the child has exited
