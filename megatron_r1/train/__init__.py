"""Training on Megatron-Core: the shared step, optimizer and checkpoints, and the stage drivers.

* `optim`      — Megatron DDP + optimizer + learning-rate schedule for a GPTModel (`build_optimizer`)
* `step`       — micro-batched forward/backward, vocab-parallel log-probs, one optimizer step
                 (`Batch`, `forward_backward`, `train_step`, `compute_logprobs`, `lm_loss_fn`)
* `checkpoint` — resumable `dist_checkpointing` checkpoints (`save_checkpoint`, `load_checkpoint`)

Beside them live the stage drivers (`rl`, `pretrain`, ...), evaluation and metrics. Submodules are
imported where used; importing this package does not import Megatron.
"""
