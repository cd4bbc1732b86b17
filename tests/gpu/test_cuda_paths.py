"""CUDA paths: Transformer Engine spec (bf16, FP8), HF parity on GPU, vLLM sleep/wake and weight sync.

Marked `gpu`; every test skips cleanly without CUDA (and the TE ones without Transformer Engine).
Run on a GPU machine with `pytest -m gpu tests/gpu`.
"""

import dataclasses

import pytest
import torch

from megatron_r1 import platform
from megatron_r1.config import ModelConfig, ParallelConfig, RolloutConfig

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
    engine = VLLMEngine(RolloutConfig(gpu_memory_utilization=0.2, enable_sleep_mode=True), str(tmp_path))
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
