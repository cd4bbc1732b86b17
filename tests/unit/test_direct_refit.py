"""The direct refit (`rollout.weight_loading: direct`, rollout/direct_refit.py) against vLLM's layer-wise reload on
CPU: after the same trained weights, both engines give the same log-probabilities (and transformers' within
fp32 rounding), a tied LM head follows the new embedding, a refit that leaves a tensor out is refused naming it,
and the choice of path follows the model (quantized, MoE and MLA engines keep the reload)."""

from __future__ import annotations

import pytest
import torch

from megatron_r1.config import ConfigError, RolloutConfig
from megatron_r1.rollout.vllm_engine import VLLMEngine, _direct_refit
from megatron_r1.rollout.weight_sync import WeightSync
from tests.unit.test_weight_sync import checkpoint_tensors, sgd_steps, tiny_qwen2, trainer_logprobs

PROBE = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [7, 7, 300, 12, 99, 4, 8, 8]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    model = tiny_qwen2(path)
    sgd_steps(model, steps=3)
    return path, model


def logprobs_after_two_refits(path, model, mode: str) -> tuple[list[torch.Tensor], list[torch.Tensor], VLLMEngine]:
    engine = VLLMEngine(RolloutConfig(max_model_len=128, weight_loading=mode), str(path))
    first = engine.prompt_logprobs(PROBE)  # the checkpoint on disk, as the engine started
    WeightSync(engine, bucket_mb=0.1).sync(iter(checkpoint_tensors(model)))  # q/k/v, gate/up split over buckets
    WeightSync(engine, bucket_mb=0.1).sync(iter(checkpoint_tensors(model)))  # twice: the staging pool is reused
    return first, engine.prompt_logprobs(PROBE), engine


def test_direct_refit_equals_the_reload_and_transformers(in_process_vllm, trained):
    path, model = trained
    expected = trainer_logprobs(model)(PROBE)
    reload_first, reloaded, engine = logprobs_after_two_refits(path, model, "reload")
    assert not engine.direct_refit
    engine.shutdown()
    _, direct, engine = logprobs_after_two_refits(path, model, "direct")
    assert engine.direct_refit
    try:
        for r, d, e, before in zip(reloaded, direct, expected, reload_first):
            assert (r - before).abs().max() > 1e-2  # the refit did change the weights
            torch.testing.assert_close(d, r, rtol=0, atol=1e-6)  # the same numbers as vLLM's own reload
            torch.testing.assert_close(d, e, rtol=0, atol=1e-4)  # and as transformers (the tied head included)

        stale = "model.layers.1.mlp.down_proj.weight"
        with pytest.raises(Exception, match="down_proj.weight was not sent in full"):
            WeightSync(engine, bucket_mb=0.1).sync((k, v) for k, v in checkpoint_tensors(model) if k != stale)
    finally:
        engine.shutdown()


def test_the_path_follows_the_model(tmp_path):
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text('{"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}')
    assert _direct_refit(RolloutConfig(), str(dense))
    assert not _direct_refit(RolloutConfig(weight_loading="reload"), str(dense))
    assert not _direct_refit(RolloutConfig(quantization="fp8"), str(dense))  # the reload re-quantizes
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text('{"model_type": "deepseek_v3", "n_routed_experts": 8, "kv_lora_rank": 32}')
    assert not _direct_refit(RolloutConfig(), str(moe))
    with pytest.raises(ConfigError, match="weight_loading=direct loads unquantized dense models only"):
        _direct_refit(RolloutConfig(weight_loading="direct"), str(moe))
