"""Megatron-Core's data-parallel wrapper, optimizer and learning-rate schedule for one model.

`build_optimizer` is the one place that turns our `OptimizerConfig` into Megatron objects:

* `DistributedDataParallel` owns contiguous gradient buffers (`param.main_grad`) and reduces them
  over the data-parallel group when `finalize_model_grads` runs at the end of a forward/backward;
* `get_megatron_optimizer` picks Adam (Transformer Engine / Apex fused, else torch's AdamW),
  fp32 master weights for bf16/fp16 models, global-norm clipping and, optionally, ZeRO-1 sharding
  of the optimizer state (`ParallelConfig.use_distributed_optimizer`);
* `OptimizerParamScheduler` sets the learning rate: linear warm-up from 0, then constant, linear or
  cosine decay to `min_lr` at `total_steps`. Megatron's convention: optimizer step k (from 0) uses
  the rate of schedule step k, so with warm-up W the steps use 0, lr/W, 2·lr/W, ..., lr (at k = W).

The model's `TransformerConfig` is also wired to these objects (`finalize_model_grads_func`,
`grad_scale_func`, `no_sync_func`), because Megatron's pipeline schedules read them from there.
"""

from __future__ import annotations

import logging

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig as MegatronOptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, get_canonical_lr_for_logging
from megatron.core.utils import unwrap_model

from megatron_r1 import platform
from megatron_r1.config import ConfigError, MemoryConfig, OptimizerConfig, ParallelConfig

log = logging.getLogger(__name__)

DECAY_STYLES = ("constant", "linear", "cosine")


def build_optimizer(
    model: torch.nn.Module,
    opt_cfg: OptimizerConfig,
    parallel: ParallelConfig,
    total_steps: int,
    memory: MemoryConfig | None = None,
) -> tuple[DistributedDataParallel, MegatronOptimizer, OptimizerParamScheduler]:
    """Wrap `model` (this rank's GPTModel shard) for training; returns (ddp_model, optimizer, scheduler).

    The wrapper shares its parameters with `model`: updates made by the optimizer are visible
    through both, and either can be passed to `step.compute_logprobs` or the checkpoint functions.
    """
    if opt_cfg.lr_decay_style not in DECAY_STYLES:
        raise ConfigError(f"optimizer.lr_decay_style={opt_cfg.lr_decay_style!r}: expected one of {', '.join(DECAY_STYLES)}")
    if total_steps < 1 or opt_cfg.lr_warmup_steps >= max(total_steps, 1):
        raise ConfigError(
            f"optimizer.lr_warmup_steps={opt_cfg.lr_warmup_steps} must be smaller than the number of "
            f"training steps ({total_steps}); lower it or train longer"
        )
    if opt_cfg.min_lr > opt_cfg.lr:
        raise ConfigError(f"optimizer.min_lr={opt_cfg.min_lr} is above optimizer.lr={opt_cfg.lr}")
    memory = memory or MemoryConfig()
    # Both live in Megatron's GPU optimizer paths; there is nothing to save on a CPU. With offload,
    # the precision-aware flag selects Megatron's hybrid host/device optimizer (fp32 copies handed
    # to a torch Adam, no master copy in the distributed optimizer); without it, TE's FusedAdam.
    offload = memory.optimizer_offload_fraction > 0
    if offload and not platform.has_cuda():
        raise ConfigError("memory.optimizer_offload_fraction > 0 moves optimizer state from a GPU to the host; set it to 0 on CPU")
    if memory.precision_aware_optimizer and not offload and not platform.has_transformer_engine():
        raise ConfigError("memory.precision_aware_optimizer needs Transformer Engine on a GPU (its FusedAdam); set it to false here")

    config = model.config  # Megatron's TransformerConfig, shared by every module of the model
    ddp_config = DistributedDataParallelConfig(
        # Sum gradients in fp32 even for bf16 weights: many micro-batches and ranks add up.
        grad_reduce_in_fp32=True,
        # One synchronous reduction after the last micro-batch; overlapping needs CUDA streams to pay off.
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    ddp_model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)

    optimizer = get_megatron_optimizer(megatron_optimizer_config(opt_cfg, parallel, memory, config.params_dtype), [ddp_model])

    # What Megatron's schedules look up on the model config (Megatron-LM's training loop sets the same):
    # the gradient all-reduce after the last micro-batch, fp16 loss scaling, and the no-sync context
    # that keeps DDP from reducing after every micro-batch.
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ddp_model.no_sync

    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr,
        lr_warmup_steps=opt_cfg.lr_warmup_steps,
        lr_decay_steps=total_steps,
        lr_decay_style=opt_cfg.lr_decay_style,
        start_wd=opt_cfg.weight_decay,
        end_wd=opt_cfg.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
        # On resume the schedule continues from the checkpoint's step count, and a changed peak
        # lr/warm-up in the config wins over the saved one (so a run can be re-tuned mid-way).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    log.info(
        "optimizer: Adam lr=%g (%s, warm-up %d of %d steps), clip %g, %s optimizer",
        opt_cfg.lr,
        opt_cfg.lr_decay_style,
        opt_cfg.lr_warmup_steps,
        total_steps,
        opt_cfg.clip_grad,
        "distributed" if parallel.use_distributed_optimizer else "replicated",
    )
    return ddp_model, optimizer, scheduler


def megatron_optimizer_config(
    opt_cfg: OptimizerConfig, parallel: ParallelConfig, memory: MemoryConfig, params_dtype: torch.dtype
) -> MegatronOptimizerConfig:
    """Megatron's optimizer config for ours. Its constructor runs Megatron's own checks, so building it
    alone (no model, no GPU) validates a GPU recipe's optimizer settings."""
    return MegatronOptimizerConfig(
        optimizer="adam",
        lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr,
        weight_decay=opt_cfg.weight_decay,
        adam_beta1=opt_cfg.adam_beta1,
        adam_beta2=opt_cfg.adam_beta2,
        adam_eps=opt_cfg.adam_eps,
        clip_grad=opt_cfg.clip_grad,
        bf16=params_dtype is torch.bfloat16,
        fp16=params_dtype is torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        use_precision_aware_optimizer=memory.precision_aware_optimizer,
        exp_avg_dtype=torch.bfloat16 if memory.precision_aware_optimizer else torch.float32,
        exp_avg_sq_dtype=torch.bfloat16 if memory.precision_aware_optimizer else torch.float32,
        optimizer_cpu_offload=memory.optimizer_offload_fraction > 0,
        optimizer_offload_fraction=memory.optimizer_offload_fraction,
    )


def current_lr(optimizer: MegatronOptimizer) -> float:
    """The learning rate the next `optimizer.step()` will use (the default parameter groups')."""
    lr = get_canonical_lr_for_logging(optimizer.param_groups)
    return float(optimizer.param_groups[0]["lr"] if lr is None else lr)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside Megatron's DDP (or FSDP / Float16Module) wrappers."""
    return unwrap_model(model)
