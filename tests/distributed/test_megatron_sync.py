"""Megatron -> vLLM weight sync after a training step, at 1 rank and at TP=2 (dense) / EP=2 (MoE).

For each layout a job trains the Megatron policy one Adam step, streams its HF-named tensors into
every rank's own colocated vLLM worker (SPMD: with 2 ranks, two engines, vLLM data-parallel;
bucketed, in memory) and saves the same policy with `save_hf`.
The parent then checks that the engine's greedy generation equals Hugging Face `generate` on the
saved weights, token for token, and that the step changed what the model generates (so a sync
that did nothing could not pass). One spawn per layout, 1 or 2 gloo processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from megatron_r1.distributed import free_port

PROMPTS = [[11, 12, 13, 14], [200, 17, 5], [42] * 6]
NEW_TOKENS = 12
# name: (model preset, ranks, trainer layout, engine TP). On CPU a MoE model needs one engine over
# all ranks (vLLM 0.32's CPU communicator cannot run data-parallel MoE; see VLLMEngine).
LAYOUTS = {
    "dense_1rank": ("tiny_dense", 1, {}, 1),
    "moe_1rank": ("tiny_moe", 1, {}, 1),
    "dense_tp2_engine_dp2": ("tiny_dense", 2, {"tensor_model_parallel_size": 2}, 1),
    "moe_ep2_engine_tp2": ("tiny_moe", 2, {"expert_model_parallel_size": 2}, 2),
}



def _job(rank: int, world: int, port: int, preset: str, parallel: dict, engine_tp: int, out: str) -> None:
    os.environ["MEGATRON_R1_STRICT_DEVICES"] = "1"  # collectives must get device tensors (platform.py)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_LOGGING_LEVEL="ERROR")
    from megatron_r1 import distributed, platform
    from megatron_r1.config import OptimizerConfig, ParallelConfig, RolloutConfig, load_config
    from megatron_r1.models.build import build_model
    from megatron_r1.models.hf.base import export_hf_tensors, save_hf
    from megatron_r1.rollout.vllm_engine import VLLMEngine
    from megatron_r1.rollout.weight_sync import WeightSync
    from megatron_r1.train.optim import build_optimizer
    from megatron_r1.train.step import Batch, lm_loss_fn, train_step

    out_dir = Path(out)
    par = ParallelConfig(**parallel)
    distributed.init_distributed(par, seed=7)
    cfg = load_config(None, [f"model.preset={preset}"]).model
    model = build_model(cfg, par)
    save_hf(model, cfg, out_dir / "before")
    engine = VLLMEngine(RolloutConfig(max_model_len=128, cpu_kvcache_space_gb=1, engine_tensor_parallel_size=engine_tp), str(out_dir / "before"))
    platform.install_cuda_stand_ins()

    ddp, opt, sched = build_optimizer(model, OptimizerConfig(lr=3e-2), par, total_steps=10)
    tokens = torch.randint(0, cfg.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    train_step(ddp, opt, sched, Batch(tokens=tokens, loss_mask=torch.ones_like(tokens, dtype=torch.float32)), lm_loss_fn, 4)

    stats = WeightSync(engine, bucket_mb=0.25).sync(export_hf_tensors(model, cfg))
    save_hf(model, cfg, out_dir / "after")
    rollouts = engine.generate(PROMPTS, n=1, temperature=0.0, top_p=1.0, max_tokens=NEW_TOKENS)  # every engine, all prompts
    result = {"tokens": [r.response_ids for r in rollouts], "buckets": stats.buckets}
    (out_dir / f"engine{rank}.json").write_text(json.dumps(result))
    engine.shutdown()
    distributed.destroy()


def _hf_greedy(model_dir: Path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    result = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
        result.append(out[0, len(prompt):].tolist())
    return result


# The 1-rank layouts in `make test-slow`: the 2-rank ones cover the same path with the shards gathered.
@pytest.mark.parametrize("layout", [pytest.param(name, marks=[pytest.mark.slow] if LAYOUTS[name][1] == 1 else []) for name in LAYOUTS])
def test_engine_generates_what_the_trained_policy_generates(layout, tmp_path):
    preset, world, parallel, engine_tp = LAYOUTS[layout]
    mp.spawn(_job, args=(world, free_port(), preset, parallel, engine_tp, str(tmp_path)), nprocs=world, join=True)
    after = _hf_greedy(tmp_path / "after")
    for rank in range(world):  # every rank's engine holds the trained policy
        engine = json.loads((tmp_path / f"engine{rank}.json").read_text())
        assert engine["buckets"] > 1  # streamed in several buckets
        assert engine["tokens"] == after
    assert after != _hf_greedy(tmp_path / "before"), "the training step should change greedy outputs"
