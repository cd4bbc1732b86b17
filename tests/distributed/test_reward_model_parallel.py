"""The reward model under model parallelism, two gloo processes on the CPU, against one process.

A random `LlamaForSequenceClassification` (the format `megatron-r1 reward-model` exports) is loaded
into the Megatron reward model with TP=2 (the value head replicated on both ranks) and with PP=2 (the
head on the last stage). In both layouts every rank must give the scores transformers gives, and one
Bradley-Terry training step must give the loss and gradient norm of the same step on one process: a
head counted twice in the norm, or lost on a pipeline stage, would change it. (Sequence parallelism
needs Transformer Engine's norms, so the head's gather under it runs on GPUs only.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from megatron_r1.config import ModelConfig, OptimizerConfig, ParallelConfig
from megatron_r1.distributed import free_port

WORLD = 2
CFG = ModelConfig(
    arch="llama", vocab_size=256, hidden_size=128, ffn_hidden_size=192, num_layers=2, num_attention_heads=2,
    num_query_groups=2, kv_channels=64, max_position_embeddings=64, add_qkv_bias=False, tie_embeddings=False,
)
OPTIMIZER = OptimizerConfig(lr=1e-3, clip_grad=1e9)  # no clipping: the step's norm is the raw gradient's
LAYOUTS = {
    "tp2": ParallelConfig(tensor_model_parallel_size=2),
    "pp2": ParallelConfig(pipeline_model_parallel_size=2),
}


def sequences() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(1, CFG.vocab_size, (int(n),), generator=g).tolist() for n in (11, 7, 14, 9, 5, 12, 10, 8)]


def make_classifier(out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from megatron_r1.models.hf import get_adapter

    torch.manual_seed(0)
    hf_cfg = dict(get_adapter(CFG.arch).hf_config(CFG))
    model_type = hf_cfg.pop("model_type")
    hf_cfg.pop("architectures")
    config = AutoConfig.for_model(model_type, **hf_cfg, num_labels=1, pad_token_id=0,
                                  architectures=["LlamaForSequenceClassification"])
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def _step(parallel: ParallelConfig, hf_dir: str) -> dict:
    """Scores of `sequences()` and one Bradley-Terry step on them as 4 pairs, in this layout."""
    from megatron_r1.models.hf.base import load_hf
    from megatron_r1.models.reward_model import build_reward_model
    from megatron_r1.rewards.reward_model import score_sequences
    from megatron_r1.train.optim import build_optimizer
    from megatron_r1.stages.reward_model import EncodedPair, bradley_terry_loss_fn, pair_batch
    from megatron_r1.train.step import train_step

    model = build_reward_model(CFG, parallel)
    load_hf(model, CFG, hf_dir, head="score")
    ddp, optimizer, scheduler = build_optimizer(model, OPTIMIZER, parallel, 1)
    seqs = sequences()
    scores = score_sequences(ddp, seqs, pad_id=0, micro_batch_size=4)
    pairs = [EncodedPair(seqs[i], seqs[i + 1], "test") for i in range(0, len(seqs), 2)]
    out = train_step(ddp, optimizer, scheduler, pair_batch(pairs, pad_id=0), bradley_terry_loss_fn, 4, head="value")
    return {"scores": scores, "loss": out["loss"], "grad_norm": out["grad_norm"], "accuracy": out["accuracy"]}


def _worker(rank: int, port: int, hf_dir: str, out_dir: str) -> None:
    os.environ["MEGATRON_R1_STRICT_DEVICES"] = "1"  # collectives must get device tensors (platform.py)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from megatron_r1.distributed import destroy, init_distributed, init_model_parallel

    results = {}
    try:
        for i, (name, parallel) in enumerate(LAYOUTS.items()):
            init_distributed(parallel) if i == 0 else init_model_parallel(parallel)
            results[name] = _step(parallel, hf_dir)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        destroy()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm_parallel")
    hf_dir = make_classifier(tmp / "rm")
    mp.spawn(_worker, args=(free_port(), str(hf_dir), str(tmp)), nprocs=WORLD, join=True)
    return hf_dir, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(one_rank, run):
    hf_dir, _ = run
    return _step(ParallelConfig(), str(hf_dir))


def test_one_process_scores_like_transformers(run, single):
    from transformers import AutoModelForSequenceClassification

    hf_dir, _ = run
    hf = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.stack([hf(torch.tensor([s])).logits[0, 0] for s in sequences()])
    torch.testing.assert_close(single["scores"], expected, rtol=1e-4, atol=1e-4)
    margins = expected[0::2] - expected[1::2]
    assert single["loss"] == pytest.approx(float(-torch.nn.functional.logsigmoid(margins).mean()), abs=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layouts_score_and_train_like_one_process(run, single, layout):
    _, ranks = run
    for rank in ranks:
        got = rank[layout]
        torch.testing.assert_close(got["scores"], single["scores"], rtol=0, atol=1e-5)
        assert got["loss"] == pytest.approx(single["loss"], abs=1e-5)
        assert got["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)
        assert got["accuracy"] == pytest.approx(single["accuracy"])
