"""Stop a run that has stopped learning for a reason no later step will fix.

Two signals, each tolerated for a few steps in a row and then fatal (the state before is saved):

* non-finite updates: `step.train_step` skips an update whose loss or gradient is inf/nan on any
  rank (the weights stay as they were); ``optimizer.max_nonfinite_steps`` such steps in a row mean
  the data or the model is broken, not unlucky;
* failing rewards: a reward function that raises scores 0 and is counted (`reward/failures`); a
  failure share above ``reward.max_failure_rate`` for ``reward.failure_patience`` steps in a row
  means the rewards are noise (a missing sandbox, a broken custom reward), and training on them
  only does harm.
"""

from __future__ import annotations

from dataclasses import dataclass


class TrainingHalted(RuntimeError):
    """The run stopped on purpose; the message says why and where the last good state is."""


@dataclass
class RunGuard:
    max_nonfinite_steps: int  # 0: never stop for non-finite updates
    max_failure_rate: float  # share of sequences whose reward raised; 1.0: never stop
    failure_patience: int
    nonfinite_in_a_row: int = 0
    failing_in_a_row: int = 0
    nonfinite_total: int = 0

    def update(self, nonfinite_updates: float, reward_failures: float, sequences: int) -> str | None:
        """Record one step; the reason to stop, or None."""
        if nonfinite_updates > 0:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
        else:
            self.nonfinite_in_a_row = 0
        rate = reward_failures / max(sequences, 1)
        self.failing_in_a_row = self.failing_in_a_row + 1 if rate > self.max_failure_rate else 0
        if self.max_nonfinite_steps and self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            return (f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (updates skipped); "
                    "lower optimizer.lr, check the data, or raise optimizer.max_nonfinite_steps")
        if self.failing_in_a_row >= self.failure_patience:
            return (f"the reward failed on {rate:.0%} of the sequences for {self.failing_in_a_row} steps in a row "
                    f"(reward.max_failure_rate={self.max_failure_rate}); see the reward errors in the log")
        return None
