"""Uneven pipeline stages (what DeepSeek-V3's 61 layers need) against one process.

Five decoder layers split 3 + 2 over two gloo processes (`parallel.num_layers_in_first_pipeline_stage`,
Megatron's own uneven split) must train like the same model on one process: same log-probabilities,
losses and gradient norms over three Adam steps (within 1e-5), and a Hugging Face export with the
same tensors, which transformers loads and runs. Each stage must also hold exactly the parameters
`megatron-r1 plan` counts for it. The two ranks run with `MEGATRON_R1_STRICT_DEVICES=1`: every
collective of the package must send tensors made on the compute device, as NCCL will demand.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from megatron_r1.config import ModelConfig, OptimizerConfig, ParallelConfig
from megatron_r1.distributed import free_port

CFG = ModelConfig(
    arch="llama", vocab_size=256, hidden_size=128, ffn_hidden_size=192, num_layers=5, num_attention_heads=2,
    num_query_groups=2, kv_channels=64, max_position_embeddings=64, add_qkv_bias=False, tie_embeddings=True,
)
UNEVEN = ParallelConfig(pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=3, num_layers_in_last_pipeline_stage=2)
OPTIMIZER = OptimizerConfig(lr=1e-3)


def _batch():
    from megatron_r1.train.step import Batch

    tokens = torch.randint(1, CFG.vocab_size, (4, 24), generator=torch.Generator().manual_seed(3))
    return Batch(tokens=tokens, loss_mask=torch.ones_like(tokens, dtype=torch.float32))


def _train(parallel: ParallelConfig, hf_in: str, hf_out: str) -> dict:
    from megatron_r1.convert import global_parameter_count
    from megatron_r1.models.build import build_model, num_parameters
    from megatron_r1.models.hf.base import load_hf, save_hf
    from megatron_r1.planner.params import count_parameters, rank_parameters
    from megatron_r1.train.optim import build_optimizer
    from megatron_r1.train.step import compute_logprobs, lm_loss_fn, train_step
    from megatron_r1.distributed import init_model_parallel
    from megatron.core import parallel_state

    model = build_model(CFG, parallel)
    load_hf(model, CFG, hf_in)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    held = num_parameters(model)
    whole = global_parameter_count(model)  # all-reduced over the pipeline group
    ddp, optimizer, scheduler = build_optimizer(model, OPTIMIZER, parallel, 10)
    batch = _batch()
    logprobs = compute_logprobs(ddp, batch.tokens, 2)
    steps = [train_step(ddp, optimizer, scheduler, batch, lm_loss_fn, 2) for _ in range(3)]
    save_hf(model, CFG, hf_out)
    init_model_parallel(ParallelConfig())  # the planner counts on a 1-rank probe
    planned = rank_parameters(count_parameters(CFG), parallel, stage).total
    return {
        "stage": stage, "layers": len(model.decoder.layers), "held": held, "planned": planned, "whole": whole,
        "logprobs": logprobs, "loss": [s["loss"] for s in steps], "grad_norm": [s["grad_norm"] for s in steps],
    }


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ["MEGATRON_R1_STRICT_DEVICES"] = "1"  # host tensors in collectives raise
    torch.set_num_threads(1)
    from megatron_r1.distributed import destroy, init_distributed

    try:
        init_distributed(UNEVEN, seed=5)
        out = _train(UNEVEN, str(Path(tmp) / "hf"), str(Path(tmp) / "pp2"))
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
    finally:
        destroy()


def make_causal_lm(out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_r1.models.hf import get_adapter

    torch.manual_seed(0)
    hf_cfg = dict(get_adapter(CFG.arch).hf_config(CFG))
    config = AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_rank):
    tmp = tmp_path_factory.mktemp("uneven_pp")
    make_causal_lm(tmp / "hf")
    mp.spawn(_worker, args=(free_port(), str(tmp)), nprocs=2, join=True)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    from megatron_r1.distributed import init_model_parallel

    init_model_parallel(ParallelConfig(), seed=5)
    single = _train(ParallelConfig(), str(tmp / "hf"), str(tmp / "pp1"))
    return tmp, ranks, single


def test_stages_hold_three_and_two_layers_as_planned(runs):
    _, ranks, single = runs
    assert [r["layers"] for r in ranks] == [3, 2]
    for r in ranks + [single]:
        assert r["held"] == r["planned"], r
    # The tied embedding lives on both ends, so the two stages hold more than the one-process model.
    assert sum(r["held"] for r in ranks) == single["held"] + CFG.vocab_size * CFG.hidden_size


def test_whole_model_count_over_the_pipeline_group(runs):
    """`convert`'s count (an all-reduce over the pipeline group, a device tensor in strict mode)."""
    _, ranks, single = runs
    assert [r["whole"] for r in ranks] == [single["held"]] * 2 == [single["whole"]] * 2


def test_uneven_pp2_trains_like_pp1(runs):
    _, ranks, single = runs
    for r in ranks:  # the last stage's numbers reach both stages
        torch.testing.assert_close(r["logprobs"], single["logprobs"], atol=1e-5, rtol=0)
        assert r["loss"] == pytest.approx(single["loss"], abs=1e-5)
        assert r["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)
    assert single["loss"][-1] < single["loss"][0]


def test_uneven_pp2_export_equals_pp1_export(runs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tmp, _, _ = runs
    pp2 = {k: v for f in sorted((tmp / "pp2").glob("*.safetensors")) for k, v in load_file(f).items()}
    pp1 = {k: v for f in sorted((tmp / "pp1").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert pp2.keys() == pp1.keys() and any("layers.4." in k for k in pp2)
    for name in pp1:
        torch.testing.assert_close(pp2[name], pp1[name], atol=1e-5, rtol=0, msg=name)
    tokens = _batch().tokens
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp / "pp2", dtype=torch.float32)(tokens).logits
        b = AutoModelForCausalLM.from_pretrained(tmp / "pp1", dtype=torch.float32)(tokens).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
