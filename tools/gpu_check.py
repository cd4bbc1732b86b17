"""What the CUDA allocator really holds, next to what `megatron-r1 plan` counts: one GPU, one command.

`make gpu-check` runs the `gpu`-marked tests and then this script. It builds a ~0.5B-parameter
dense model (bf16, random weights: no download) on one GPU in the optimizer set-ups the recipes use,
trains two steps of 4 x 2,048 random tokens (micro-batches of 2), and prints per component the
bytes measured (`torch.cuda.memory_allocated` deltas; activations as the step's peak above the
resident state) beside the planner's figure for the same config (`planner.memory`, one GPU):

* `gpu-adam`: Megatron's distributed Adam on the GPU (fp32 master + fp32 moments);
* `offload`: the precision-aware optimizer held fully on the host (the 671B recipe's set-up);
* `fp8` (Transformer Engine and an FP8-capable GPU only): TE's FP8 weight caches after a training
  step, and what `train.memory.free_for_engine` gives back before the engine would wake.

In each set-up the trainer is then swapped out (`memory.swap_during_rollout` except_weights and all,
with a reference model beside the policy): `torch.cuda.memory_allocated` before, during generation and
after, the leftover against the planner's, the host-copy rate against its assumption, and the weights
restored bit for bit.

The planner must err safe: exit 1 when a measured figure exceeds the planner's by more than
`--tolerance` (default 10 %), 0 otherwise. Without CUDA it says so and exits 0.

    python tools/gpu_check.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GiB = 1024**3
MODEL = [  # ~0.5B parameters, Qwen2-like, head dim 128
    "model.arch=qwen2", "model.vocab_size=32768", "model.hidden_size=2048", "model.ffn_hidden_size=5632",
    "model.num_layers=8", "model.num_attention_heads=16", "model.num_query_groups=4", "model.kv_channels=128",
    "model.max_position_embeddings=4096", "model.tie_embeddings=false", "model.params_dtype=bfloat16",
]
SHAPE = ["rollout.max_model_len=2048", "data.max_prompt_tokens=1024", "rollout.max_response_tokens=1024",
         "grpo.micro_batch_size=2", "grpo.prompts_per_step=1", "rollout.n_samples_per_prompt=4", "grpo.kl_beta=0"]
SETUPS = {
    "gpu-adam": ["parallel.use_distributed_optimizer=true"],
    "offload": ["parallel.use_distributed_optimizer=true", "memory.precision_aware_optimizer=true",
                "memory.optimizer_offload_fraction=1.0"],
    "fp8": ["parallel.use_distributed_optimizer=true", "model.fp8_recipe=tensorwise"],
}


def _allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def measure(name: str, overrides: list[str]) -> dict:
    """Build, train two steps and measure one set-up; returns {component: (planned, measured)} bytes."""
    from megatron_r1.config import load_config
    from megatron_r1.models.build import build_model
    from megatron_r1.planner.memory import _stage_memory
    from megatron_r1.planner.params import count_parameters
    from megatron_r1.train.memory import free_for_engine, release_fp8_weight_caches, tensor_bytes
    from megatron_r1.train.optim import build_optimizer
    from megatron_r1.train.step import Batch, lm_loss_fn, train_step

    cfg = load_config(None, MODEL + SHAPE + overrides)
    planned = _stage_memory(cfg, count_parameters(cfg.model), world=1, stage=0, flash=True)

    start = _allocated()
    model = build_model(cfg.model, cfg.parallel, cfg.memory)
    weights = _allocated() - start
    before_opt = _allocated()
    ddp, optimizer, scheduler = build_optimizer(model, cfg.optimizer, cfg.parallel, 10, cfg.memory)
    gradients = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers + ddp.expert_parallel_buffers)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 2048), generator=torch.Generator().manual_seed(0))
    batch = Batch(tokens=tokens, loss_mask=torch.ones_like(tokens, dtype=torch.float32))
    losses = [train_step(ddp, optimizer, scheduler, batch, lm_loss_fn, 2)["loss"]]  # Adam's state is made here
    resident = _allocated()
    fp8_cached = release_probe = 0
    if cfg.model.fp8_recipe:
        fp8_cached = sum(  # what TE holds now, read without dropping it
            tensor_bytes(w) for m in model.modules() for w in (getattr(m, "_fp8_workspaces", None) or {}).values()
        )
    optimizer_bytes = resident - before_opt - gradients - fp8_cached
    torch.cuda.reset_peak_memory_stats()
    losses.append(train_step(ddp, optimizer, scheduler, batch, lm_loss_fn, 2)["loss"])
    activations = torch.cuda.max_memory_allocated() - resident
    if cfg.model.fp8_recipe:
        held = _allocated()
        release_probe = release_fp8_weight_caches(model)
        free_for_engine(model)
        fp8_freed = held - _allocated()
    swap = swap_round_trip(cfg, ddp, optimizer, planned)
    rows = {
        "weights": (planned["weights"], weights),
        "gradients": (planned["gradients"], gradients),
        "optimizer (GPU)": (planned["optimizer"], optimizer_bytes),
        "activations + loss": (planned["activations"] + planned["loss"], activations),
    }
    rows.update(swap)
    if cfg.model.fp8_recipe:
        rows["FP8 weight caches"] = (planned.get("fp8_weight_copies", 0), fp8_cached)
        rows["FP8 freed for the engine"] = (planned.get("fp8_weight_copies", 0), fp8_freed)
    del ddp, optimizer, scheduler, model
    free_for_engine()
    print(f"{name}: losses {losses[0]:.3f} -> {losses[1]:.3f}; release_fp8_weight_caches reported {release_probe / GiB:.2f} GiB")
    return {k: (int(p), int(m)) for k, (p, m) in rows.items()}


def swap_round_trip(cfg, ddp, optimizer, planned: dict) -> dict:
    """`memory.swap_during_rollout` on CUDA with a reference model beside the policy: allocated bytes
    before, during (what the engine would find) and after, against the planner's leftover; the copy
    rate against the planner's host-link assumption. Exact restore is checked on the weights."""
    import time

    from megatron_r1.models.build import build_model
    from megatron_r1.planner.gpus import GPUS
    from megatron_r1.planner.memory import leftover_bytes
    from megatron_r1.planner.timing import EFFICIENCY
    from megatron_r1.train.memory import TrainerSwap, free_for_engine

    reference = build_model(cfg.model, cfg.parallel, cfg.memory).eval().requires_grad_(False)
    parts = {**planned, "reference": planned["weights"]}
    rows = {}
    for mode in ("except_weights", "all"):
        free_for_engine(ddp, reference)
        snapshot = [p.detach().clone().cpu() for p in list(ddp.parameters())[:4]]
        swap = TrainerSwap(mode, ddp, optimizer, reference)
        before = _allocated()
        t0 = time.perf_counter()
        moved = swap.offload_state() + swap.offload_weights()
        out_seconds = time.perf_counter() - t0
        free_for_engine()
        during = _allocated()
        t0 = time.perf_counter()
        swap.restore()
        back_seconds = time.perf_counter() - t0
        after = _allocated()
        exact = all(torch.equal(a, p.detach().cpu()) for a, p in zip(snapshot, ddp.parameters()))
        copied = moved - swap.moved_bytes["gradients"]  # gradients are released, not copied
        print(f"swap {mode}: allocated {before / GiB:.2f} -> {during / GiB:.2f} (during generation) -> {after / GiB:.2f} GiB; "
              f"out {copied / max(out_seconds, 1e-9) / 1e9:.1f} GB/s, back {copied / max(back_seconds, 1e-9) / 1e9:.1f} GB/s "
              f"(planner assumes {GPUS['h100'].host_link_gb_s * EFFICIENCY.host_link:.0f}); weights restored exactly: {exact}")
        if not exact or after < before:
            raise SystemExit(f"gpu_check: swap {mode} did not restore the trainer's state")
        rows[f"left during rollout ({mode})"] = (leftover_bytes(parts, mode), during)
    del reference
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerance", type=float, default=0.10, help="measured may exceed planned by this share")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to measure (run it on a GPU node)")
        return 0
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from megatron_r1 import distributed, platform
    from megatron_r1.config import ParallelConfig

    distributed.init_distributed(ParallelConfig(use_distributed_optimizer=True), seed=1)
    print(f"device: {platform.describe()}, torch {torch.__version__}")
    setups = {k: v for k, v in SETUPS.items() if k != "fp8" or (platform.has_transformer_engine() and torch.cuda.get_device_capability() >= (8, 9))}
    results, over = {}, []
    for name, overrides in setups.items():
        results[name] = measure(name, overrides)
    print(f"\n{'set-up':<10} {'component':<26} {'planned GiB':>12} {'measured GiB':>13} {'measured/planned':>17}")
    for name, rows in results.items():
        for component, (planned, measured) in rows.items():
            ratio = measured / planned if planned else float("nan") if measured else 1.0
            print(f"{name:<10} {component:<26} {planned / GiB:12.2f} {measured / GiB:13.2f} {ratio:17.2f}")
            if measured > planned * (1 + args.tolerance) + 64 * 2**20:  # 64 MiB: allocator granularity, workspaces
                over.append(f"{name} {component}: measured {measured / GiB:.2f} GiB > planned {planned / GiB:.2f} GiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    distributed.destroy()
    for line in over:
        print(f"planner under-counts: {line}")
    print("gpu_check: " + ("the planner errs safe on every component" if not over else f"{len(over)} component(s) under-counted"))
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
