"""The training library on Megatron-Core; the commands that use it live in `megatron_r1.stages`.

* `loop`        — the one training loop: build from HF, resume, preemption, guards, eval/save cadence, export
* `optim`       — Megatron DDP + optimizer + learning-rate schedule for a GPTModel (`build_optimizer`)
* `step`        — micro-batched forward/backward, vocab-parallel log-probs, one optimizer step
                  (`Batch`, `forward_backward`, `train_step`, `compute_logprobs`, `lm_loss_fn`)
* `grpo_update` — the GRPO objective and the mini-batched policy update
* `checkpoint`  — resumable `dist_checkpointing` checkpoints (`save_checkpoint`, `load_checkpoint`), `manifest`
* `metrics`, `guards`, `preemption`, `memory` — metrics files and plots, stop conditions, signals, device memory

Submodules are imported where used; importing this package does not import Megatron.
"""
