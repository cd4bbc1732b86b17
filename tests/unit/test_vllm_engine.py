"""The colocated vLLM engine on CPU: layout, sampling, logprobs, scoring, sleep, in-memory weights, SPMD.

Real vLLM and real transformers on tiny random models; one engine per model for the whole module.
"""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
import torch.multiprocessing as mp

from megatron_r1.config import ConfigError, RolloutConfig
from megatron_r1.distributed import free_port
from megatron_r1.rollout.layout import EngineLayout, even_bounds
from megatron_r1.rollout.vllm_engine import VLLMEngine

transformers = pytest.importorskip("transformers")
pytest.importorskip("vllm")


# --------------------------------------------------------------------------------------------
# Layout (pure functions).


def test_engines_are_consecutive_blocks_of_tp_x_pp_ranks():
    # 8 GPUs, engine TP 1: one engine per rank, each its own vLLM data-parallel rank.
    assert [EngineLayout(8, r).engine_index for r in range(8)] == list(range(8))
    assert EngineLayout(8, 5).num_engines == 8 and EngineLayout(8, 5).engine_ranks() == [5]
    # Engine TP 4 over 2 nodes x 8 GPUs: four engines; ranks 12..15 form the last one.
    last = EngineLayout(16, 13, tensor_parallel_size=4)
    assert (last.num_engines, last.engine_index, last.rank_in_engine) == (4, 3, 1)
    assert last.engine_ranks() == [12, 13, 14, 15] and not last.is_engine_leader
    # One engine spanning both nodes (TP 8 x PP 2): every rank serves engine 0.
    wide = EngineLayout(16, 11, tensor_parallel_size=8, pipeline_parallel_size=2)
    assert (wide.num_engines, wide.engine_index, wide.engine_ranks()) == (1, 0, list(range(16)))
    with pytest.raises(ConfigError, match="does not divide the 12 ranks"):
        EngineLayout(12, 0, tensor_parallel_size=8)


def test_shards_cover_every_prompt_once_in_order():
    prompts = list(range(10))
    for engines in (1, 2, 3, 4, 10):
        shards = [EngineLayout(engines, r).shard(prompts) for r in range(engines)]
        assert [p for s in shards for p in s] == prompts
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert even_bounds(10, 4, 0) == (0, 3) and even_bounds(10, 4, 3) == (8, 10)
    # Ranks of the same engine get the same share.
    assert EngineLayout(4, 2, tensor_parallel_size=2).shard(prompts) == EngineLayout(4, 3, tensor_parallel_size=2).shard(prompts) == prompts[5:]


# --------------------------------------------------------------------------------------------
# A tiny Qwen2 shared by the module.


def tiny_qwen2(path, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, tie_word_embeddings=True, max_position_embeddings=512,
        torch_dtype="float32",
    )
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def hf_logprobs(model, seq: list[int]) -> torch.Tensor:
    """log p(seq[j] | seq[:j]) for j >= 1 under a Hugging Face model."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(seq[1:])[:, None]).flatten().float()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    return tiny_qwen2(path), str(path)


@pytest.fixture(scope="module")
def engine(qwen):
    threads = torch.get_num_threads()
    engine = VLLMEngine(RolloutConfig(max_model_len=256), qwen[1])
    engine.threads_before = threads
    yield engine
    engine.shutdown()


PROMPTS = [[5, 17, 42], [7, 7, 300, 12, 99, 4], [1]]


def test_start_gives_the_trainer_its_threads_back(engine):
    assert torch.get_num_threads() == engine.threads_before
    torch.set_num_threads(1)  # vLLM replaces this with a no-op; the engine puts the real one back
    assert torch.get_num_threads() == 1
    torch.set_num_threads(engine.threads_before)


def test_generate_is_prompt_major_with_raw_logprobs(engine, qwen):
    n = 3
    out = engine.generate(PROMPTS, n=n, temperature=1.0, top_p=1.0, max_tokens=8)
    assert len(out) == n * len(PROMPTS)
    for k, r in enumerate(out):
        assert r.prompt_index == k // n
        assert r.prompt_ids == PROMPTS[k // n]
        assert r.finish_reason == "length" and len(r.response_ids) == 8
        assert len(r.logprobs) == len(r.response_ids)
        # At temperature 1 the sampler's logprobs are the model's: compare with transformers.
        ref = hf_logprobs(qwen[0], r.prompt_ids + r.response_ids)[len(r.prompt_ids) - 1 :]
        assert torch.allclose(torch.tensor(r.logprobs), ref, atol=1e-4), (r.logprobs, ref)


def test_logprobs_stay_raw_under_temperature_and_top_p(engine, qwen):
    out = engine.generate(PROMPTS[:1], n=2, temperature=0.7, top_p=0.9, max_tokens=6)
    for r in out:
        ref = hf_logprobs(qwen[0], r.prompt_ids + r.response_ids)[len(r.prompt_ids) - 1 :]
        assert torch.allclose(torch.tensor(r.logprobs), ref, atol=1e-4)


def test_stop_token_ends_a_response_and_is_kept(engine):
    greedy = engine.generate(PROMPTS[:1], n=1, temperature=0.0, top_p=1.0, max_tokens=12)[0].response_ids
    stop = greedy[4]
    cut = greedy.index(stop)
    out = engine.generate(PROMPTS[:1], n=1, temperature=0.0, top_p=1.0, max_tokens=12, stop_token_ids=[stop])[0]
    assert out.finish_reason == "stop"
    assert out.response_ids == greedy[: cut + 1]


def test_min_tokens_holds_the_stop_token_back(engine):
    # rollout.min_response_tokens: the stop token the greedy response ends on at token 5 is ignored until
    # token 9, and a response cannot stop before then (what peer_trl.py relies on for equal work).
    greedy = engine.generate(PROMPTS[:1], n=1, temperature=0.0, top_p=1.0, max_tokens=12)[0].response_ids
    stop = greedy[4]
    out = engine.generate(PROMPTS[:1], n=1, temperature=0.0, top_p=1.0, max_tokens=12, stop_token_ids=[stop], min_tokens=9)[0]
    assert len(out.response_ids) >= 9
    assert stop not in out.response_ids[:8]
    sampled = engine.generate(PROMPTS, n=2, temperature=1.0, top_p=1.0, max_tokens=7, stop_token_ids=list(range(64)), min_tokens=7)
    assert [len(r.response_ids) for r in sampled] == [7] * 2 * len(PROMPTS)


def test_the_benchmark_length_plan_gives_both_call_styles_the_same_lengths(engine, monkeypatch):
    # benchmarks/length_plan.py, which peer_trl.py installs in both trainers: our engine asks for n samples per
    # prompt, TRL's repeats each prompt n times; both must get the plan's lengths, in the same places, with
    # the engine's log-probs, while greedy calls (evaluation, the parity probe) pass through untouched.
    from pathlib import Path

    from vllm import LLM

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import length_plan

    monkeypatch.setattr(LLM, "generate", LLM.generate)  # restored after the test
    greedy = engine.generate(PROMPTS, n=1, temperature=0.0, top_p=1.0, max_tokens=20)
    length_plan.install(cap=20, seed=7)
    expected = length_plan.plan(7, 0, 3 * len(PROMPTS), 20)
    ours = engine.generate(PROMPTS, n=3, temperature=1.0, top_p=1.0, max_tokens=20)
    assert [len(r.response_ids) for r in ours] == expected
    assert all(len(r.logprobs) == len(r.response_ids) for r in ours)
    assert [r.prompt_ids for r in ours] == [p for p in PROMPTS for _ in range(3)]
    repeated = engine.generate([p for p in PROMPTS for _ in range(3)], n=1, temperature=1.0, top_p=1.0, max_tokens=20)
    assert [len(r.response_ids) for r in repeated] == length_plan.plan(7, 1, 3 * len(PROMPTS), 20)
    assert [r.response_ids for r in engine.generate(PROMPTS, n=1, temperature=0.0, top_p=1.0, max_tokens=20)] == [
        r.response_ids for r in greedy]
    lengths = length_plan.plan(1234, 0, 10_000, 256)
    assert min(lengths) >= 5 and max(lengths) <= 256
    assert 0.65 < sum(n <= 256 // 3 for n in lengths) / len(lengths) < 0.75  # R1-Zero's: seven in ten short


def test_sampling_follows_torch_seed(engine):
    def sample():
        return [r.response_ids for r in engine.generate(PROMPTS, n=2, temperature=1.0, top_p=1.0, max_tokens=10)]

    torch.manual_seed(123)
    first = sample()
    torch.manual_seed(123)
    assert sample() == first
    torch.manual_seed(124)
    assert sample() != first


def test_prompt_logprobs_match_transformers(engine, qwen):
    seqs = [[3, 9, 27, 81, 243, 100, 7], [11, 12]]
    out = engine.prompt_logprobs(seqs)
    for seq, lp in zip(seqs, out):
        assert lp.shape == (len(seq) - 1,)
        assert torch.allclose(lp, hf_logprobs(qwen[0], seq), atol=1e-4)
    tail = engine.prompt_logprobs(seqs[:1], prompt_lens=[4])[0]
    assert torch.allclose(tail, out[0][3:])


def test_sleep_and_wake_are_logged_no_ops_on_cpu(engine, caplog):
    with caplog.at_level(logging.INFO, logger="megatron_r1.rollout.vllm_engine"):
        engine.sleep()
        engine.wake_up()
        engine.sleep()
    notes = [r for r in caplog.records if "no-ops" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO  # once per engine
    assert engine.generate(PROMPTS[:1], n=1, temperature=0.0, top_p=1.0, max_tokens=2)


def test_load_weights_swaps_in_memory(engine, qwen):
    model = qwen[0]
    seq = [3, 1, 4, 1, 5, 9, 2, 6]
    before = engine.prompt_logprobs([seq])[0]
    new = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    engine.load_weights(iter(new.items()))
    changed = engine.prompt_logprobs([seq])[0]
    assert (changed - before).abs().max() > 1e-2
    swapped = copy.deepcopy(model)
    swapped.load_state_dict(new, strict=False)  # the head is tied to the embedding
    assert torch.allclose(changed, hf_logprobs(swapped, seq), atol=1e-4)
    engine.load_weights(model.state_dict().items())  # back to the module's weights
    assert torch.allclose(engine.prompt_logprobs([seq])[0], before, atol=1e-6)


# --------------------------------------------------------------------------------------------
# DeepSeek-V3 (MLA + MoE) on the CPU engine.


def tiny_deepseek_v3(path, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=None,
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64,  # CPU MLA: 512 + 64
        topk_method="noaux_tc", scoring_func="sigmoid", max_position_embeddings=512,
        tie_word_embeddings=False, num_nextn_predict_layers=0, torch_dtype="float32",
    )
    transformers.DeepseekV3ForCausalLM(config).save_pretrained(path)


def test_deepseek_v3_loads_generates_and_hot_swaps(tmp_path):
    from safetensors.torch import load_file

    tiny_deepseek_v3(tmp_path)
    base = load_file(tmp_path / "model.safetensors")  # checkpoint names: experts one by one
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in base
    engine = VLLMEngine(RolloutConfig(max_model_len=256), str(tmp_path))
    out = engine.generate([[1, 2, 3]], n=2, temperature=1.0, top_p=1.0, max_tokens=6)
    assert [len(r.response_ids) for r in out] == [6, 6]
    assert all(0 <= t < 512 for r in out for t in r.response_ids)

    seq = [9, 8, 7, 6, 5, 4, 3, 2, 1]
    before = engine.prompt_logprobs([seq])[0]
    engine.load_weights((k, v + 0.05 * torch.randn_like(v)) for k, v in base.items())
    assert (engine.prompt_logprobs([seq])[0] - before).abs().max() > 1e-2
    # The router's expert bias is loaded too (it moves with Megatron's aux-loss-free balancing).
    biased = {k: (v + 1.0 * torch.arange(8) if k.endswith("e_score_correction_bias") else v) for k, v in base.items()}
    engine.load_weights(biased.items())
    assert (engine.prompt_logprobs([seq])[0] - before).abs().max() > 1e-3
    engine.load_weights(base.items())
    assert torch.allclose(engine.prompt_logprobs([seq])[0], before, atol=1e-6)
    engine.shutdown()


# --------------------------------------------------------------------------------------------
# Two gloo ranks, SPMD: one vLLM worker per rank in the trainer's own world.


def _spmd_worker(rank: int, port: int, model_dir: str, engine_tp: int, results) -> None:
    import torch.distributed as dist

    from megatron_r1 import platform

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    platform.setup()  # as in training: the CPU adaptation is active while vLLM runs
    dist.init_process_group("gloo", rank=rank, world_size=2)
    before = dist.new_group([0, 1])
    engine = VLLMEngine(RolloutConfig(max_model_len=128, engine_tensor_parallel_size=engine_tp), model_dir)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    mine = engine.layout.shard(prompts)
    torch.manual_seed(engine.layout.engine_index)
    out = engine.generate(mine, n=2, temperature=1.0, top_p=1.0, max_tokens=4)
    gathered = engine.groups.gather([(r.prompt_ids, r.response_ids) for r in out])
    logprobs = engine.prompt_logprobs([[1, 2, 3, 4, 5, 6]])[0].tolist()
    engine.shutdown()
    # The trainer's world is intact: same size, groups made before and after the engine work.
    after = dist.new_group([0, 1])
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total, group=before)
    dist.all_reduce(total, group=after)
    results.put((rank, {"world": dist.get_world_size(), "total": float(total), "mine": [p for p, _ in [(r.prompt_ids, 0) for r in out]],
                        "gathered": gathered, "engine": engine.layout.engine_index, "logprobs": logprobs}))
    dist.barrier()
    dist.destroy_process_group()


# Both layouts in `make test-slow`: the 2-rank R1-Zero runs of `make test` cover the SPMD engines end to end.
@pytest.mark.parametrize("engine_tp", [pytest.param(1, id="engine_dp2"), pytest.param(2, id="engine_tp2")])
@pytest.mark.slow
def test_spmd_engines_share_the_prompts_and_keep_the_trainer_world(qwen, engine_tp):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_spmd_worker, args=(r, port, qwen[1], engine_tp, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    r0, r1 = got[0], got[1]
    assert r0["world"] == r1["world"] == 2 and r0["total"] == r1["total"] == 6.0
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    # Every prompt sampled once, by one engine; every rank ends up with all of them, in order.
    assert [p for p, _ in r0["gathered"]] == [p for p in prompts for _ in range(2)]
    assert r0["gathered"] == r1["gathered"]
    if engine_tp == 1:  # two engines: each sampled its own share
        assert (r0["engine"], r1["engine"]) == (0, 1)
        assert r0["mine"] == [prompts[0]] * 2 + [prompts[1]] * 2 and r1["mine"] == [prompts[2]] * 2
    else:  # one engine over both ranks: both ran the same requests
        assert r0["engine"] == r1["engine"] == 0 and r0["mine"] == r1["mine"]
    # Both layouts compute what transformers computes.
    reference = hf_logprobs(qwen[0], [1, 2, 3, 4, 5, 6])
    for r in (r0, r1):
        assert torch.allclose(torch.tensor(r["logprobs"]), reference, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Stop strings, as R1-Zero on a real base model needs them (stop at "</answer>").


def test_stop_strings_end_responses_and_stay_in_them(tmp_path):
    from megatron_r1.data.tiny_corpus import tokenizer_training_texts
    from megatron_r1.data.tokenizer import train_tokenizer
    from megatron_r1.data.tokenizer import stop_conditions

    tok = train_tokenizer(tokenizer_training_texts(300, seed=3), vocab_size=512, out_dir=tmp_path)
    tiny_qwen2(tmp_path, seed=4)  # a model beside the tokenizer, as in an exported directory
    # A one-token stop string becomes a stop id (exact); a longer one stays a string for vLLM.
    ids, strings = stop_conditions(tok, ["</answer>", "Assistant:"])
    assert ids == [tok.eos_token_id, tok.convert_tokens_to_ids("</answer>")]
    assert strings == ["Assistant:"] and len(tok.encode("Assistant:", add_special_tokens=False)) > 1

    prompt = tok.encode("5 + 3 = 8", add_special_tokens=False)
    plain = VLLMEngine(RolloutConfig(max_model_len=128), str(tmp_path))
    full = plain.generate([prompt], n=1, temperature=0.0, top_p=1.0, max_tokens=24)[0].response_ids
    plain.shutdown()
    text = tok.decode(full, skip_special_tokens=False)
    cut = len(tok.decode(full[:6], skip_special_tokens=False))
    stop = text[cut - 2 : cut]  # two characters the greedy response contains
    engine = VLLMEngine(RolloutConfig(max_model_len=128, stop=[stop]), str(tmp_path))
    out = engine.generate([prompt], n=1, temperature=0.0, top_p=1.0, max_tokens=24, stop=[stop])[0]
    engine.shutdown()
    got = tok.decode(out.response_ids, skip_special_tokens=False)
    assert out.finish_reason == "stop" and len(out.response_ids) < len(full)
    assert stop in got and text.startswith(got)  # stopped at the first occurrence, the stop string kept
