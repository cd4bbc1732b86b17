"""HF conversion under model parallelism, two gloo processes on the CPU.

One `torch.multiprocessing.spawn` runs every layout (importing Megatron dominates the cost); each
rank saves its results to a file and the tests assert in the parent, against a single-process
model loaded from the same HF weights:

* TP=2: `load_hf` slices every tensor (GLU fc1 as [gate_r; up_r] per rank), the gathered
  vocab-parallel logits equal TP=1, and `export_hf_tensors` gives the HF tensors back on every
  rank. Two configs: 2 key/value heads (one per rank), and 1 key/value head (fewer groups than
  ranks, where Megatron splits the fused qkv rows mid-group);
* PP=2: each stage loads only its own layers under global layer numbers, and the export brings
  both stages' tensors to both ranks (tied embeddings: the last stage's copy loads from the
  embedding and is not exported twice);
* EP=2 (DeepSeek-V3 MoE): routed experts gathered over the expert-parallel group under global
  expert numbers, the router's `expert_bias` buffer included.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from megatron_r1.config import ModelConfig, ParallelConfig, load_config
from megatron_r1.distributed import free_port

WORLD = 2
CONFIGS = {
    "qwen2_gqa_untied": ModelConfig(
        arch="qwen2", vocab_size=256, hidden_size=128, ffn_hidden_size=192, num_layers=2,
        num_attention_heads=4, num_query_groups=2, kv_channels=32, max_position_embeddings=64,
        add_qkv_bias=True, tie_embeddings=False,
    ),
    "llama_one_kv_head_tied": ModelConfig(
        arch="llama", vocab_size=256, hidden_size=128, ffn_hidden_size=192, num_layers=2,
        num_attention_heads=2, num_query_groups=1, kv_channels=64, max_position_embeddings=64,
        add_qkv_bias=False, tie_embeddings=True,
    ),
}


def moe_config() -> ModelConfig:
    return load_config(None, ["model=tiny_moe"]).model


def tokens(cfg: ModelConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))


def make_hf_checkpoint(cfg: ModelConfig, out: Path, seed: int) -> Path:
    """Random HF model of `cfg` with every tensor (biases, norms, router bias) randomised."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_r1.models.hf import get_adapter

    torch.manual_seed(seed)
    hf_cfg = dict(get_adapter(cfg.arch).hf_config(cfg))
    model_type = hf_cfg.pop("model_type")
    hf_cfg.pop("architectures")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf_cfg))
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and "rotary" not in name:
                t.copy_(1.0 + 0.1 * torch.randn_like(t) if "norm" in name else 0.1 * torch.randn_like(t))
    model.save_pretrained(out)
    return out


def megatron_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), attention_mask=None)
        return gather_from_tensor_model_parallel_region(logits)  # vocab-parallel -> full vocabulary


def _loaded(cfg: ModelConfig, parallel: ParallelConfig, hf_dir: str) -> torch.nn.Module:
    from megatron_r1.models.build import build_model
    from megatron_r1.models.hf import load_hf

    model = build_model(cfg, parallel).eval()
    load_hf(model, cfg, hf_dir)
    return model


def _export(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from megatron_r1.models.hf import export_hf_tensors

    return {name: t.clone() for name, t in export_hf_tensors(model, cfg)}


def _held(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _worker(rank: int, port: int, hf_dirs: dict[str, str], out_dir: str) -> None:
    os.environ["MEGATRON_R1_STRICT_DEVICES"] = "1"  # collectives must get device tensors (platform.py)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share two cores
    from megatron_r1.distributed import destroy, init_distributed, init_model_parallel

    results: dict = {}
    try:
        tp = ParallelConfig(tensor_model_parallel_size=WORLD)
        init_distributed(tp)
        for key, cfg in CONFIGS.items():
            model = _loaded(cfg, tp, hf_dirs[key])
            results[f"tp2/{key}"] = {"logits": megatron_logits(model, tokens(cfg)), "export": _export(model, cfg), "held": _held(model)}

        pp = ParallelConfig(pipeline_model_parallel_size=WORLD)
        init_model_parallel(pp)
        for key, cfg in CONFIGS.items():
            model = _loaded(cfg, pp, hf_dirs[key])
            output_layer = getattr(model, "output_layer", None)  # last stage only
            results[f"pp2/{key}"] = {
                "export": _export(model, cfg),
                "local_layers": [layer.layer_number for layer in model.decoder.layers],
                "output_layer": None if output_layer is None else output_layer.weight.detach().clone(),
                "held": _held(model),
            }

        moe = moe_config()
        ep = ParallelConfig(expert_model_parallel_size=WORLD)
        init_model_parallel(ep)
        model = _loaded(moe, ep, hf_dirs["moe"])
        results["ep2/moe"] = {"export": _export(model, moe), "held": _held(model)}

        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        destroy()



@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """HF checkpoints, then every 2-rank layout; returns (hf dirs, per-rank results)."""
    tmp = tmp_path_factory.mktemp("tp_dense")
    configs = {**CONFIGS, "moe": moe_config()}
    hf_dirs = {key: str(make_hf_checkpoint(cfg, tmp / key, seed=i)) for i, (key, cfg) in enumerate(configs.items())}
    mp.spawn(_worker, args=(free_port(), hf_dirs, str(tmp)), nprocs=WORLD, join=True)
    return hf_dirs, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference(one_rank, run):
    """Single-process logits and export of each dense config."""
    hf_dirs, _ = run
    out = {}
    for key, cfg in CONFIGS.items():
        model = _loaded(cfg, ParallelConfig(), hf_dirs[key])
        out[key] = {"logits": megatron_logits(model, tokens(cfg)), "export": _export(model, cfg)}
    return out


@pytest.mark.parametrize("key", list(CONFIGS))
def test_tp2_logits_equal_single_process(run, reference, key):
    _, ranks = run
    for rank in ranks:
        torch.testing.assert_close(rank[f"tp2/{key}"]["logits"], reference[key]["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_tp2_export_equals_single_process_and_checkpoint(run, reference, key):
    hf_dirs, ranks = run
    checkpoint = load_file(Path(hf_dirs[key]) / "model.safetensors")
    expected = reference[key]["export"]
    assert sorted(expected) == sorted(checkpoint)
    for rank in ranks:
        got = rank[f"tp2/{key}"]["export"]
        assert sorted(got) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), name
            assert torch.equal(tensor, checkpoint[name]), name


@pytest.mark.parametrize("key", list(CONFIGS))
def test_pp2_stages_load_their_layers_and_export_the_whole_model(run, key):
    hf_dirs, ranks = run
    checkpoint = load_file(Path(hf_dirs[key]) / "model.safetensors")
    assert [rank[f"pp2/{key}"]["local_layers"] for rank in ranks] == [[1], [2]]  # one layer per stage
    for rank in ranks:
        got = rank[f"pp2/{key}"]["export"]
        assert sorted(got) == sorted(checkpoint)
        for name, tensor in checkpoint.items():
            assert torch.equal(got[name], tensor), name
    last = ranks[-1][f"pp2/{key}"]["output_layer"]
    source = "model.embed_tokens.weight" if CONFIGS[key].tie_embeddings else "lm_head.weight"
    assert torch.equal(last, checkpoint[source])


def test_ep2_export_gathers_experts_and_router_bias(run):
    hf_dirs, ranks = run
    checkpoint = load_file(Path(hf_dirs["moe"]) / "model.safetensors")
    assert any(name.endswith("e_score_correction_bias") for name in checkpoint)
    for rank in ranks:
        got = rank["ep2/moe"]["export"]
        assert sorted(got) == sorted(checkpoint)
        for name, tensor in checkpoint.items():
            assert torch.equal(got[name], tensor), name


def test_each_rank_holds_what_the_planner_counts(run, one_rank):
    """`megatron-r1 plan` derives every rank's parameters from one 1-rank probe; the real shards agree."""
    from megatron_r1.planner.params import count_parameters, rank_parameters

    _, ranks = run
    layouts = {
        "tp2": ParallelConfig(tensor_model_parallel_size=WORLD),
        "pp2": ParallelConfig(pipeline_model_parallel_size=WORLD),
        "ep2": ParallelConfig(expert_model_parallel_size=WORLD),
    }
    checked = 0
    for rank, result in enumerate(ranks):
        for key, held in ((k, v["held"]) for k, v in result.items()):
            layout, name = key.split("/")
            cfg = moe_config() if name == "moe" else CONFIGS[name]
            stage = rank if layout == "pp2" else 0
            assert rank_parameters(count_parameters(cfg), layouts[layout], stage).total == held, (key, rank)
            checked += 1
    assert checked == WORLD * (2 * len(CONFIGS) + 1)
