"""MoE routing replay (R2/R3) and router health on the tiny DeepSeek-V3 (MLA + aux-loss-free MoE).

R2: the trainer records its old-logprob pass's routing and replays it in the update: the first
update's per-token ratio is exactly 1 even after the routing has moved (the aux-loss-free bias
changes after every optimizer step); without replay it is not.
R3, trainer half: routing recorded from an independent implementation (Hugging Face
`DeepseekV3ForCausalLM`, forward hooks on its gates, the same weights) replayed into Megatron gives
Hugging Face's logprobs, even where Megatron's own routers would choose otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_r1.config import ParallelConfig, load_config
from megatron_r1.distributed import init_distributed
from megatron_r1.models.build import build_model, moe_layers
from megatron_r1.models.hf import load_hf
from megatron_r1.rollout.vllm_engine import engine_routing_to_layers
from megatron_r1.train import moe_routing
from megatron_r1.train.optim import build_optimizer
from megatron_r1.train.step import Batch, compute_logprobs, padding_after_last_target, train_step
from tests.unit.test_hf_deepseek_v3 import make_hf_checkpoint

PARALLEL = ParallelConfig()


@pytest.fixture(scope="module", autouse=True)
def one_rank():
    init_distributed(PARALLEL)


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, ["model=tiny_moe", "optimizer.lr=1e-3"])


@pytest.fixture(scope="module")
def hf_dir(cfg, tmp_path_factory) -> Path:
    return make_hf_checkpoint(cfg.model, tmp_path_factory.mktemp("dsv3_routing"), seed=3)


def _tokens(seed: int = 0, batch: int = 4, width: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (batch, width), generator=g)


def _megatron(cfg, hf_dir):
    model = build_model(cfg.model, PARALLEL)
    load_hf(model, cfg.model, hf_dir)
    return model


def _move_routing(model, seed: int = 0, scale: float = 0.3) -> None:
    """Shift every router's aux-loss-free bias, as the bias updates of later steps do (in bigger
    steps), so the routers' own top-k changes for many tokens."""
    g = torch.Generator().manual_seed(seed)
    for _, router in moe_routing.moe_routers(model):
        router.expert_bias.add_(scale * torch.randn(router.expert_bias.shape, generator=g))


def test_routers_are_found_in_layer_order(cfg, hf_dir):
    model = _megatron(cfg, hf_dir)
    numbers = [n for n, _ in moe_routing.moe_routers(model)]
    assert numbers == [i for i, moe in enumerate(moe_layers(cfg.model)) if moe]
    assert all(r.router_replay is not None for _, r in moe_routing.moe_routers(model))


def test_recorded_routing_replayed_gives_the_same_logprobs_after_the_routers_moved(cfg, hf_dir):
    model = _megatron(cfg, hf_dir)
    tokens = _tokens()
    old, routing = compute_logprobs(model, tokens, 2, record_routing=True)
    assert routing.shape == (4, 24, 1, cfg.model.moe_router_topk)
    assert int(routing.min()) >= 0 and int(routing.max()) < cfg.model.num_experts
    _move_routing(model)
    _, moved = compute_logprobs(model, tokens, 2, record_routing=True)
    assert (moved.sort(-1).values != routing.sort(-1).values).any(-1).float().mean() > 0.2  # the choice really moved
    own = compute_logprobs(model, tokens, 2)
    replayed = compute_logprobs(model, tokens, 2, routing=routing)
    assert (own - old).abs().max() > 1e-3
    assert torch.equal(replayed, old)  # bit-exact: same experts, same (bias-free) gate weights
    assert all(r.router_replay.router_replay_action is None for _, r in moe_routing.moe_routers(model))  # cleared


@pytest.mark.parametrize("replay", [True, False])
def test_r2_first_update_ratio_is_exactly_one(cfg, hf_dir, replay):
    """The update's own forward + backward (train_step), with Megatron's optimizer: the ratio
    new/old over every response token at the first iteration."""
    model = _megatron(cfg, hf_dir)
    ddp, optimizer, scheduler = build_optimizer(model, cfg.optimizer, PARALLEL, 10, cfg.memory)
    tokens = _tokens(1)
    mask = torch.zeros_like(tokens, dtype=torch.float32)
    mask[:, 8:20] = 1.0  # a "response" in the middle, right padding after it
    old, routing = compute_logprobs(ddp, tokens, 2, record_routing=True)
    _move_routing(model, seed=1)
    seen = {}

    def loss_fn(logprobs, entropy, micro):
        ratio = (logprobs.detach() - micro.old_logprobs).exp()
        seen["dev"] = max(seen.get("dev", 0.0), float(((ratio - 1).abs() * micro.mask).max()))
        return -(logprobs * micro.mask).sum() / micro.num_tokens, {}

    batch = Batch(tokens=tokens, loss_mask=mask, advantages=torch.ones(4), old_logprobs=old, routing=routing if replay else None)
    train_step(ddp, optimizer, scheduler, batch, loss_fn, 2)
    if replay:
        assert seen["dev"] <= 1e-6
    else:
        assert seen["dev"] > 1e-3


def _hf_with_routing(hf_dir: Path, tokens: torch.Tensor):
    """Hugging Face's logprobs of `tokens` and the top-k its gates chose, `[B, S, L_moe, k]`."""
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    chosen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, out: chosen.append(out[2].detach()))
             for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        logits = model(tokens).logits
    for h in hooks:
        h.remove()
    logprobs = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
    B, S = tokens.shape
    return logprobs, torch.stack([c.view(B, S, -1) for c in chosen], dim=2).to(torch.int16)


def test_r3_trainer_replays_another_implementations_routing(cfg, hf_dir):
    """The engine half cannot run on CPU; its contract is routing from another implementation.
    Megatron, with its own routers moved away, replays Hugging Face's routing and gets its logprobs."""
    tokens = _tokens(2)
    hf_logprobs, hf_routing = _hf_with_routing(hf_dir, tokens)
    model = _megatron(cfg, hf_dir)
    assert torch.allclose(compute_logprobs(model, tokens, 4), hf_logprobs, atol=2e-4)  # same weights, same routing
    _move_routing(model, seed=2)
    own = compute_logprobs(model, tokens, 4)
    assert (own - hf_logprobs).abs().max() > 1e-3  # Megatron's own routing now differs
    replayed = compute_logprobs(model, tokens, 4, routing=hf_routing)
    assert torch.allclose(replayed, hf_logprobs, atol=2e-4)


def test_engine_routing_maps_to_the_trainers_layers():
    moe = [1, 3]  # a 4-layer model: layers 0 and 2 dense
    every_layer = torch.arange(5 * 4 * 2).view(5, 4, 2)
    assert torch.equal(engine_routing_to_layers(every_layer, 4, moe), every_layer[:, [1, 3]])
    only_moe = every_layer[:, [1, 3]]
    assert torch.equal(engine_routing_to_layers(only_moe, 4, moe), only_moe)
    with pytest.raises(ValueError, match="reported routing for 3 layers; the model has 4 layers, 2 of them MoE"):
        engine_routing_to_layers(every_layer[:, :3], 4, moe)
    # Pipeline stages: the second stage holds layer 3 only.
    batch = only_moe.unsqueeze(0)  # [1, T, L_moe, k]
    assert torch.equal(batch[:, :, moe_routing.stage_moe_indices(moe, [3])], batch[:, :, [1]])


def test_padding_is_what_follows_the_last_trained_token():
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert padding_after_last_target(mask).tolist() == [[False, False, False, True, True], [False] * 5, [False] * 5]


def test_health_reports_expert_load_bias_and_disagreement(cfg, hf_dir):
    model = _megatron(cfg, hf_dir)
    ddp, optimizer, scheduler = build_optimizer(model, cfg.optimizer, PARALLEL, 10, cfg.memory)
    health = moe_routing.RouterHealth(ddp)
    config = model.config
    config.finalize_model_grads_func = health.wrap_finalize(config.finalize_model_grads_func)
    tokens = _tokens(4)
    mask = torch.zeros_like(tokens, dtype=torch.float32)
    mask[:, 4:14] = 1.0  # 14 real positions per row, 10 padding
    health.begin_step()
    _, routing = compute_logprobs(ddp, tokens, 2, record_routing=True)
    _move_routing(model, seed=4)
    batch = Batch(tokens=tokens, loss_mask=mask, advantages=torch.ones(4), routing=routing)
    with health.comparing():
        train_step(ddp, optimizer, scheduler, batch, lambda lp, e, m: (-(lp * m.mask).sum() / m.num_tokens, {}), 2)
    counted = sum(load.sum().item() for load in health._load)
    assert counted == 4 * 14 * cfg.model.moe_router_topk  # padding excluded from the load the bias balances
    metrics = health.metrics()
    assert metrics["moe/layer1/load_max_over_mean"] >= 1.0
    assert metrics["moe/layer1/bias_norm"] > 0 and metrics["moe/layer1/bias_change"] > 0
    assert 0.0 < metrics["moe/routing_mismatch"] <= 1.0  # the routers moved: their own choice differs from the replayed
    assert metrics["moe/load_max_over_mean"] == metrics["moe/layer1/load_max_over_mean"]
    health.begin_step()
    assert health.metrics() == {}  # a step without an update reports nothing


def test_engine_routing_becomes_the_batch_routing():
    """R3's batch: each sample's engine routing (prompt + response - 1 positions), this stage's MoE
    layers, pad routes where the engine never ran a token."""
    from megatron_r1.rollout.collect import Sample
    from megatron_r1.train.grpo_update import make_batch

    def sample(prompt, response, seed):
        g = torch.Generator().manual_seed(seed)
        routing = torch.randint(0, 8, (prompt + response - 1, 3, 2), generator=g, dtype=torch.int16)
        return Sample(list(range(1, prompt + 1)), list(range(50, 50 + response)), "stop", 0, 0, [0.0] * response, routing)

    samples = [sample(4, 3, 0), sample(2, 6, 1)]
    batch = make_batch(samples, torch.zeros(2), 0, routing_layers=[0, 2])
    assert batch.routing.shape == (2, 8, 2, 2)
    assert torch.equal(batch.routing[0, :6], samples[0].routing[:, [0, 2]])
    assert torch.equal(batch.routing[1, :7], samples[1].routing[:, [0, 2]])
    pad = moe_routing.pad_routes(2)
    assert all(torch.equal(batch.routing[0, t, j], pad) for t in (6, 7) for j in range(2))  # last token + padding
    assert make_batch([sample(4, 3, 0), Sample([1, 2], [3], "stop", 0, 0, [0.0])], torch.zeros(2), 0).routing is None
