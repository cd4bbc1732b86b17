"""CUDA paths: Transformer Engine spec (bf16, FP8), HF parity on GPU, vLLM sleep/wake and weight sync.

Marked `gpu`; every test skips cleanly without CUDA (and the TE ones without Transformer Engine).
Run on a GPU machine with `pytest -m gpu tests/gpu`.
"""

import dataclasses

import pytest
import torch

from megatron_r1 import platform
from megatron_r1.config import ModelConfig, OptimizerConfig, ParallelConfig, RolloutConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_te = pytest.mark.skipif(not platform.has_transformer_engine(), reason="needs Transformer Engine")

TINY = ModelConfig(vocab_size=512, hidden_size=256, ffn_hidden_size=512, num_layers=2, num_attention_heads=4,
                   num_query_groups=2, kv_channels=64)


@pytest.fixture(scope="module")
def one_gpu_rank():
    from megatron_r1.distributed import init_distributed

    return init_distributed(ParallelConfig())


def _fwd_bwd(cfg: ModelConfig) -> torch.Tensor:
    from megatron_r1.models.build import build_model

    model = build_model(cfg, ParallelConfig())
    ids = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    pos = torch.arange(64, device="cuda").unsqueeze(0).expand(2, -1)
    logits = model(ids, pos, None)
    logits.float().square().mean().backward()
    assert all(p.grad is not None or p.main_grad is not None for p in model.parameters() if p.requires_grad)
    return logits


@needs_te
def test_te_spec_bf16_forward_backward(one_gpu_rank):
    logits = _fwd_bwd(dataclasses.replace(TINY, params_dtype="bfloat16"))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@needs_te
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_te_spec_fp8_forward_backward(one_gpu_rank, recipe):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs Ada/Hopper or newer")
    logits = _fwd_bwd(dataclasses.replace(TINY, params_dtype="bfloat16", fp8_recipe=recipe))
    assert torch.isfinite(logits.float()).all()


def test_hf_parity_on_cuda(one_gpu_rank, tmp_path):
    """Same check as the CPU suite: Megatron loaded from HF weights gives HF's logits (fp32)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_r1.models.build import build_model
    from megatron_r1.models.hf.base import get_adapter, load_hf

    cfg = TINY
    hf_cfg = get_adapter("qwen2").hf_config(cfg)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")}))
    hf.save_pretrained(tmp_path)
    model = build_model(cfg, ParallelConfig())
    load_hf(model, cfg, tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (1, 32))
    expected = hf.eval()(ids).logits
    got = model(ids.cuda(), torch.arange(32, device="cuda").unsqueeze(0), None).float().cpu()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)  # TF32/TE kernels on GPU


def test_engine_sleep_wake_and_sync(one_gpu_rank, tmp_path):
    """vLLM on CUDA: sleep frees memory, wake restores it, and a weight sync changes the outputs."""
    pytest.importorskip("vllm")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_r1.rollout.vllm_engine import VLLMEngine
    from megatron_r1.rollout.weight_sync import WeightSync

    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    hf.save_pretrained(tmp_path)
    # float32 (auto would pick bf16 on a GPU): the greedy tokens are compared with transformers' fp32 ones.
    engine = VLLMEngine(RolloutConfig(dtype="float32", gpu_memory_utilization=0.2, enable_sleep_mode=True), str(tmp_path))
    before = engine.generate([[1, 2, 3]], n=1, temperature=0.0, top_p=1.0, max_tokens=8)[0].response_ids
    free0 = torch.cuda.mem_get_info()[0]
    engine.sleep()
    assert torch.cuda.mem_get_info()[0] > free0  # the KV cache went back to the device
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    # The refit order of the RL loop: weights back (level 2 dropped them), new weights in, KV cache back.
    engine.wake_up(["weights"])
    WeightSync(engine, 16).sync((n, t.cuda()) for n, t in hf.state_dict().items())
    engine.wake_up(["kv_cache"])
    after = engine.generate([[1, 2, 3]], n=1, temperature=0.0, top_p=1.0, max_tokens=8)[0].response_ids
    expected = hf.cuda().generate(torch.tensor([[1, 2, 3]], device="cuda"), max_new_tokens=8, do_sample=False)[0, 3:].tolist()
    assert after == expected[: len(after)] and after != before


# ---------------------------------------------------------------------------------------------
# The memory paths the 671B recipe depends on (issue: seven defects that would stop the first GPU run).

MID = dataclasses.replace(TINY, vocab_size=4096, hidden_size=1024, ffn_hidden_size=2816, num_layers=4, num_attention_heads=8,
                          num_query_groups=2, kv_channels=128, params_dtype="bfloat16")


def _train_setup(cfg, memory):
    from megatron_r1.models.build import build_model
    from megatron_r1.train.optim import build_optimizer
    from megatron_r1.train.step import Batch

    parallel = ParallelConfig(use_distributed_optimizer=True)
    model = build_model(cfg, parallel, memory)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    ddp, optimizer, scheduler = build_optimizer(model, OptimizerConfig(lr=1e-3), parallel, 10, memory)
    tokens = torch.randint(0, cfg.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
    batch = Batch(tokens=tokens, loss_mask=torch.ones_like(tokens, dtype=torch.float32))
    return model, ddp, optimizer, scheduler, batch, before


def test_offloaded_optimizer_keeps_no_optimizer_state_on_the_gpu(one_gpu_rank):
    """The 671B recipe's optimizer: precision-aware + offload 1.0 -> Megatron's hybrid optimizer; the
    GPU holds weights and fp32 gradient buffers only, and the loss still falls."""
    from megatron_r1.config import MemoryConfig
    from megatron_r1.train.step import lm_loss_fn, train_step

    memory = MemoryConfig(precision_aware_optimizer=True, optimizer_offload_fraction=1.0)
    model, ddp, optimizer, scheduler, batch, before = _train_setup(MID, memory)
    losses = [train_step(ddp, optimizer, scheduler, batch, lm_loss_fn, 2)["loss"] for _ in range(3)]
    torch.cuda.synchronize()
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers + ddp.expert_parallel_buffers)
    on_gpu = torch.cuda.memory_allocated() - before - grads
    params = sum(p.numel() for p in model.parameters())
    assert on_gpu < 0.5 * params  # < 0.5 B/param: no fp32 master (4 B) or moments (8 B) on the GPU
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("offload", [0.0, 1.0])
def test_swap_empties_the_gpu_during_generation_and_restores_every_bit(one_gpu_rank, offload):
    """`memory.swap_during_rollout=all` on CUDA: after the update the trainer's allocations leave the
    device (pinned host copies), come back exactly, and training goes on as without the swap."""
    from megatron_r1.config import MemoryConfig
    from megatron_r1.distributed import init_distributed
    from megatron_r1.train.memory import TrainerSwap, free_for_engine
    from megatron_r1.train.step import lm_loss_fn, train_step

    memory = MemoryConfig(precision_aware_optimizer=offload > 0, optimizer_offload_fraction=offload)
    runs = []
    for mode in ("none", "all"):
        init_distributed(ParallelConfig(use_distributed_optimizer=True), seed=1234)  # re-seeds: the same weights twice
        model, ddp, optimizer, scheduler, batch, before = _train_setup(MID, memory)
        swap = TrainerSwap(mode, ddp, optimizer)
        losses = []
        for _ in range(3):
            swap.restore()
            losses.append(train_step(ddp, optimizer, scheduler, batch, lm_loss_fn, 2)["loss"])
            resident = torch.cuda.memory_allocated()
            swap.offload_state()
            swap.offload_weights()
            free_for_engine()
            if mode == "all":  # a few MiB of Megatron's own buffers at most stay: the engine gets the rest
                assert torch.cuda.memory_allocated() - (before - sum(p.numel() * p.element_size() for p in model.parameters())) < 16 * 2**20
        swap.restore()
        assert torch.cuda.memory_allocated() == resident
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
        del model, ddp, optimizer, scheduler, swap
        free_for_engine()
    (a, wa), (b, wb) = runs
    assert a == b and all(torch.equal(x, y) for x, y in zip(wa, wb))


@needs_te
def test_fp8_weight_caches_are_released_for_the_engine(one_gpu_rank):
    """TE keeps the FP8 casts of the weights after a training step; `free_for_engine` returns them."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs Ada/Hopper or newer")  # as test_te_spec_fp8_forward_backward
    from megatron_r1.config import MemoryConfig
    from megatron_r1.train.memory import free_for_engine, release_fp8_weight_caches
    from megatron_r1.train.step import lm_loss_fn, train_step

    cfg = dataclasses.replace(MID, fp8_recipe="tensorwise")
    model, ddp, optimizer, scheduler, batch, _ = _train_setup(cfg, MemoryConfig())
    train_step(ddp, optimizer, scheduler, batch, lm_loss_fn, 2)
    cached = [m for m in model.modules() if getattr(m, "_fp8_workspaces", None)]
    assert cached, "TE cached no FP8 weights: the planner's 'FP8 weight copies' would be wrong"
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    free_for_engine(model)
    assert not any(getattr(m, "_fp8_workspaces", None) for m in model.modules())
    freed = held - torch.cuda.memory_allocated()
    weights = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    assert freed >= 0.9 * weights  # at least the 1-byte casts of the linear weights
    assert release_fp8_weight_caches(model) == 0
    train_step(ddp, optimizer, scheduler, batch, lm_loss_fn, 2)  # TE rebuilds what was dropped


@pytest.mark.parametrize("async_save", [False, True])
def test_checkpoint_round_trip_with_the_offloaded_optimizer(one_gpu_rank, tmp_path, async_save):
    from megatron_r1.config import MemoryConfig
    from megatron_r1.train import checkpoint as ckpt
    from megatron_r1.train.step import lm_loss_fn, train_step

    memory = MemoryConfig(precision_aware_optimizer=True, optimizer_offload_fraction=1.0)
    model, ddp, optimizer, scheduler, batch, _ = _train_setup(MID, memory)
    train_step(ddp, optimizer, scheduler, batch, lm_loss_fn, 2)
    ckpt.save_checkpoint(tmp_path, 1, ddp, optimizer, scheduler, {"note": "gpu"}, async_save=async_save)
    ckpt.finish_pending_saves(blocking=True)
    expected = train_step(ddp, optimizer, scheduler, batch, lm_loss_fn, 2)["loss"]
    model2, ddp2, optimizer2, scheduler2, _, _ = _train_setup(MID, memory)
    assert ckpt.load_checkpoint(tmp_path, ckpt.resume_step(tmp_path), ddp2, optimizer2, scheduler2) == {"note": "gpu"}
    assert train_step(ddp2, optimizer2, scheduler2, batch, lm_loss_fn, 2)["loss"] == pytest.approx(expected, rel=1e-3)


def test_mla_engine_runs_bfloat16_on_cuda_by_default(one_gpu_rank, tmp_path):
    """rollout.dtype auto -> bf16 on CUDA, where vLLM's MLA backends have no fp32 kernels."""
    pytest.importorskip("vllm")
    from tests.unit.test_vllm_engine import tiny_deepseek_v3

    from megatron_r1.rollout.vllm_engine import VLLMEngine

    tiny_deepseek_v3(tmp_path)
    engine = VLLMEngine(RolloutConfig(gpu_memory_utilization=0.2, max_model_len=128), str(tmp_path))
    assert engine.dtype == "bfloat16"
    assert len(engine.generate([[1, 2, 3]], n=1, temperature=0.0, top_p=1.0, max_tokens=4)[0].response_ids) >= 1


# ---------------------------------------------------------------------------------------------
# MoE rollout on CUDA: routed experts for R3, FP8 engine weights (GPU-only engine options).


def test_engine_returns_routed_experts_for_r3(one_gpu_rank, tmp_path):
    """vLLM's routed experts (Model Runner V2): `[prompt + response - 1, MoE layers, top-k]` global expert
    ids, dense layers dropped, for every sample."""
    pytest.importorskip("vllm")
    from tests.unit.test_vllm_engine import tiny_deepseek_v3

    from megatron_r1.rollout.vllm_engine import VLLMEngine

    tiny_deepseek_v3(tmp_path)
    engine = VLLMEngine(RolloutConfig(gpu_memory_utilization=0.2, max_model_len=128), str(tmp_path), return_routing=True)
    out = engine.generate([[1, 2, 3, 4]], n=2, temperature=1.0, top_p=1.0, max_tokens=6)
    for r in out:
        assert r.routing.shape == (len(r.prompt_ids) + len(r.response_ids) - 1, 1, 2)
        assert int(r.routing.min()) >= 0 and int(r.routing.max()) < 8
        assert all(len(set(row.tolist())) == 2 for row in r.routing[:, 0])  # top-2 distinct experts per token


def test_fp8_engine_quantizes_at_start_and_at_every_refit(one_gpu_rank, tmp_path):
    """rollout.quantization=fp8: blockwise FP8 weights; a refit of bf16 weights is re-quantized (outputs move
    with the new weights and come back with the old), and logprobs stay near the bf16 engine's."""
    pytest.importorskip("vllm")
    from safetensors.torch import load_file

    from tests.unit.test_vllm_engine import tiny_deepseek_v3

    from megatron_r1.rollout.vllm_engine import VLLMEngine

    tiny_deepseek_v3(tmp_path)
    base = load_file(tmp_path / "model.safetensors")
    seq = [9, 8, 7, 6, 5, 4, 3, 2, 1]
    bf16 = VLLMEngine(RolloutConfig(gpu_memory_utilization=0.2, max_model_len=128), str(tmp_path))
    reference = bf16.prompt_logprobs([seq])[0]
    bf16.shutdown()
    engine = VLLMEngine(RolloutConfig(gpu_memory_utilization=0.2, max_model_len=128, quantization="fp8"), str(tmp_path))
    before = engine.prompt_logprobs([seq])[0]
    assert (before - reference).abs().mean() < 0.2  # the FP8 probe threshold
    engine.load_weights((k, (v + 0.05 * torch.randn_like(v)).to(torch.bfloat16)) for k, v in base.items())
    assert (engine.prompt_logprobs([seq])[0] - before).abs().max() > 1e-2
    engine.load_weights((k, v.to(torch.bfloat16)) for k, v in base.items())
    assert torch.allclose(engine.prompt_logprobs([seq])[0], before, atol=1e-3)
    engine.shutdown()


@needs_te
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_packed_thd_micro_batches_equal_the_padded_ones(one_gpu_rank, loss_agg):
    """The token budget on a GPU packs each micro-batch (`thd`, TE's fused attention, train/packed.py): the
    loss, the per-token logprob metrics and the gradients equal the padded bucketed micro-batches' (bf16)."""
    from megatron_r1.config import StageConfig
    from megatron_r1.models.build import build_model
    from megatron_r1.distributed import init_distributed
    from megatron_r1.train.grpo_update import grpo_loss_fn, make_batch
    from megatron_r1.train.optim import build_optimizer
    from megatron_r1.train.step import forward_backward, packs_sequences
    from tests.unit.test_token_budget import skewed_samples

    cfg = StageConfig()
    cfg.grpo.loss_agg, cfg.rollout.max_response_tokens = loss_agg, 96
    batch = make_batch(skewed_samples(24), torch.randn(24, generator=torch.Generator().manual_seed(0)), 0)
    assert packs_sequences(batch, 512)
    grads, outs = [], []
    for max_tokens in (0, 512):
        init_distributed(ParallelConfig(), seed=1234)  # the same weights for both
        ddp = build_optimizer(build_model(dataclasses.replace(TINY, params_dtype="bfloat16"), ParallelConfig()),
                              OptimizerConfig(lr=1e-3), ParallelConfig(), 10)[0]
        ddp.zero_grad_buffer()
        outs.append(forward_backward(ddp, batch, grpo_loss_fn(cfg), 4, with_entropy=True, max_tokens=max_tokens))
        grads.append(torch.cat([p.main_grad.detach().float().flatten() for p in ddp.parameters()]))
    padded, packed = outs
    assert packed["padding_share"] < 0.05 < padded["padding_share"]
    assert packed["loss"] == pytest.approx(padded["loss"], abs=2e-3, rel=2e-2)
    assert packed["entropy"] == pytest.approx(padded["entropy"], rel=2e-2)
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.999
