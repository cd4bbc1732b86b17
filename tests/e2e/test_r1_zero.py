"""R1-Zero end to end on CPU: tiny base model -> GRPO with the colocated vLLM engine -> contract files
(resume, preemption and the non-finite stop: tests/e2e/test_stage_contract.py); and the SPMD
layouts under `torchrun --nproc-per-node 2`: every prompt sampled once, each data-parallel rank
training on its half, and the step-1 numbers of a 1-rank update on the same rollouts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, cli as _cli

STAGE = ROOT / "conf/stages/r1_zero_tiny.yaml"

# Small but complete: every phase runs, including eval, checkpoint, probe and export.
TINY_RUN = [
    "grpo.prompts_per_step=4",
    "rollout.n_samples_per_prompt=4",
    "rollout.max_response_tokens=48",
    "data.eval_size=16",
    "logging.eval_every=2",
    "logging.eval_samples=2",
    "logging.progress_bar=false",
    "checkpoint.save_every=2",
]


# Greedy held-out accuracy of an exported model through plain `vllm.LLM` with text prompts.
VLLM_TEXT_EVAL = """
import json, os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

def main():
    from vllm import LLM, SamplingParams
    from megatron_r1.config import load_config
    from megatron_r1.data.prompts import load_prompts
    from megatron_r1.rewards.reward_fn import RewardFn

    hf_dir, stage, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = load_config(stage, overrides)
    prompts = load_prompts(cfg.data, "eval").items
    llm = LLM(model=hf_dir, dtype="float32", enforce_eager=True, max_model_len=cfg.rollout.max_model_len)
    # Default decoding, as evaluation harnesses use it (skip_special_tokens=True): the tags must survive.
    params = SamplingParams(temperature=0.0, max_tokens=cfg.rollout.max_response_tokens)
    texts = [o.outputs[0].text for o in llm.generate([p.prompt for p in prompts], params, use_tqdm=False)]
    scores = RewardFn(cfg.reward)([p.prompt for p in prompts], texts, [p.as_reward_item() for p in prompts])
    probe = prompts[0].prompt + " <think> 5 + 3 = 8 </think> <answer> 1 </answer>"
    ids = list(llm.get_tokenizer().encode(probe))  # vLLM's own tokenizer, as it tokenizes text prompts
    print(json.dumps({"accuracy": float(scores.components["accuracy"].mean()), "probe": probe, "ids": ids}))

if __name__ == "__main__":
    main()
"""


def _r1_zero(run_dir: Path, base: Path, *extra: str, ranks: int = 1) -> subprocess.CompletedProcess:
    return _cli("r1-zero", str(STAGE), f"logging.run_dir={run_dir}", f"checkpoint.load_hf={base}", "checkpoint.base_stage=", *TINY_RUN, *extra, ranks=ranks)


def _rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}


def test_contract_files(base_model, tmp_path):
    run_dir = tmp_path / "run"
    out = _r1_zero(run_dir, base_model, "steps=4")
    assert "held-out accuracy" in out.stdout  # the closing table

    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("base_accuracy", "final_accuracy", "steps", "wall_seconds", "task", "prompt_template"):
        assert key in summary, key
    assert summary["steps"] == 4 and summary["task"]["name"] == "chain_sum"
    assert "{question}" in summary["prompt_template"]
    assert 0.0 <= summary["final_accuracy"] <= 1.0

    rows = _rows(run_dir)
    assert sorted(rows) == [1, 2, 3, 4]
    for key in ("reward/mean", "reward/accuracy", "response/length_mean", "train/grad_norm", "train/clip_fraction",
                "train/entropy", "time/rollout", "time/train", "time/sync", "sync/logprob_abs_diff_max"):
        assert key in rows[1], key
    # vLLM holds exactly the trained policy: the probe after the first refit (then every rollout.probe_every=10),
    # and on every step the free check of the sampled batch (weight_sync.check_sampled).
    assert [s for s in rows if "sync/logprob_abs_diff_max" in rows[s]] == [1]
    assert rows[1]["sync/logprob_abs_diff_max"] < 1e-3
    assert all(rows[s]["train/mismatch_abs_diff"] < 1e-4 for s in rows)

    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "plot.png").stat().st_size > 10_000
    assert (run_dir / "checkpoints/latest").read_text().strip() == "4"

    # The exported policy loads in transformers, with its tokenizer as trained.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_r1.data.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    tok = AutoTokenizer.from_pretrained(run_dir / "hf")
    assert model.config.vocab_size >= len(tok)
    text = summary["prompt_template"].format(question="5 + 3 - 7 =") + " <think> 5 + 3 = 8 </think> <answer> 1 </answer>"
    assert tok(text)["input_ids"] == load_tokenizer(run_dir / "hf")(text)["input_ids"]
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True).endswith("<think> 5 + 3 = 8 </think> <answer> 1 </answer>")

    # vLLM as users run it (its own tokenizer, text prompts, default SamplingParams) reproduces the
    # run's final greedy accuracy.
    out = subprocess.run([sys.executable, "-c", VLLM_TEXT_EVAL, str(run_dir / "hf"), str(STAGE), *TINY_RUN],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ids"] == load_tokenizer(run_dir / "hf")(result["probe"])["input_ids"]  # the third loader agrees
    assert result["accuracy"] == pytest.approx(summary["final_accuracy"], abs=0.02)


# --------------------------------------------------------------------------------------------
# Two ranks (SPMD): engine DP=2 x trainer DP=2, and engine TP=2 x trainer TP=2.

TWO_RANK = {
    "engine_dp2_trainer_dp2": [],
    "engine_tp2_trainer_tp2": ["rollout.engine_tensor_parallel_size=2", "parallel.tensor_model_parallel_size=2"],
}

# A 1-rank update on the rollouts a run saved: the policy from the base, the batch from the file.
REPLAY = """
import json, sys
from pathlib import Path
from megatron_r1 import distributed
from megatron_r1.config import load_config
from megatron_r1.rollout.collect import Sample
from megatron_r1.train.grpo_update import make_batch, update_phase
from megatron_r1.train.loop import build_from_hf
import torch

stage, run_dir, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
cfg = load_config(stage, overrides)
distributed.init_distributed(cfg.parallel, cfg.seed)
policy = build_from_hf(cfg, Path(cfg.checkpoint.load_hf), cfg.steps)
assert cfg.grpo.kl_beta == 0  # no reference model
rows = [json.loads(line) for line in (run_dir / "rollouts/step_000001.jsonl").read_text().splitlines()]
samples = [Sample(r["prompt_ids"], r["response_ids"], r["finish_reason"], r["prompt"], r["engine"]) for r in rows]
from megatron_r1.data.tokenizer import load_tokenizer
pad = load_tokenizer(cfg.checkpoint.load_hf).pad_token_id
batch = make_batch(samples, torch.tensor([r["advantage"] for r in rows]), pad)
out = update_phase(cfg, policy.ddp, policy.optimizer, policy.scheduler, None, batch)
print(json.dumps({"loss": out["loss"], "grad_norm": out["grad_norm"]}))
"""


# The DP layout reuses the shared 2-rank run; the TP layout is a run of its own (`make test-slow`).
@pytest.mark.parametrize("layout", [pytest.param(name, marks=[pytest.mark.slow] if TWO_RANK[name] else []) for name in TWO_RANK])
def test_two_ranks_sample_each_prompt_once_and_train_like_one(request, tmp_path, layout):
    run_dir, common = request.getfixturevalue("two_rank_run")  # the default layout: DP 2 (shared)
    if TWO_RANK[layout]:
        run_dir = tmp_path / "run"
        _cli("r1-zero", str(STAGE), f"logging.run_dir={run_dir}", *common, *TWO_RANK[layout], ranks=2)

    summary = json.loads((run_dir / "summary.json").read_text())
    dp = layout.startswith("engine_dp2")
    assert summary["layout"] == {
        "placement": "colocated", "world_size": 2, "rollout_engines": 2 if dp else 1, "engine_tensor_parallel_size": 1 if dp else 2,
        "engine_pipeline_parallel_size": 1, "data_parallel_size": 2 if dp else 1,
    }

    # Every prompt of a step sampled exactly once (G responses, by one engine); with two engines
    # each sampled its own half.
    prompts, g = 4, 4
    for step in (1, 2):
        rows = [json.loads(line) for line in (run_dir / f"rollouts/step_{step:06d}.jsonl").read_text().splitlines()]
        assert sorted(r["prompt"] for r in rows) == [p for p in range(prompts) for _ in range(g)]
        engine_of = {r["prompt"]: r["engine"] for r in rows}
        assert all(engine_of[r["prompt"]] == r["engine"] for r in rows)
        assert sorted(engine_of.items()) == ([(0, 0), (1, 0), (2, 1), (3, 1)] if dp else [(p, 0) for p in range(prompts)])

    # Each data-parallel rank trains on half the sequences; the probe passes on every engine.
    metrics = _rows(run_dir)
    assert metrics[1]["rollout/sequences"] == prompts * g
    assert metrics[1]["rollout/sequences_per_rank"] == (prompts * g / 2 if dp else prompts * g)
    assert metrics[1]["rollout/sequences_sampled_per_engine"] == (prompts * g / 2 if dp else prompts * g)
    assert metrics[1]["sync/logprob_abs_diff_max"] < 1e-3
    assert metrics[2]["train/mismatch_abs_diff"] < 1e-4  # step 2's batch: sampled by both engines after the refit

    # Step 1 equals a 1-rank update on the same rollouts.
    out = subprocess.run([sys.executable, "-c", REPLAY, str(STAGE), str(run_dir), *common],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    one_rank = json.loads(out.stdout.strip().splitlines()[-1])
    assert metrics[1]["train/loss"] == pytest.approx(one_rank["loss"], abs=1e-5)
    assert metrics[1]["train/grad_norm"] == pytest.approx(one_rank["grad_norm"], abs=1e-5)


@pytest.mark.slow  # ~1.5 minutes: two runs (`make test-slow`)
def test_start_from_a_converted_megatron_checkpoint(base_model, tmp_path):
    """HF base -> `convert from-hf` -> `r1-zero checkpoint.load_megatron=...`: the same policy as
    starting from the HF directory (same base evaluation, same first step)."""
    ckpt = tmp_path / "ckpt"
    _cli("convert", "from-hf", "--hf", str(base_model), "--stage", str(STAGE), "--out", str(ckpt))
    plain, converted = tmp_path / "plain", tmp_path / "converted"
    _r1_zero(plain, base_model, "steps=1", "logging.eval_every=0")
    out = _r1_zero(converted, base_model, "steps=1", "logging.eval_every=0", f"checkpoint.load_megatron={ckpt}")
    assert "policy weights from" in out.stderr
    a, b = _rows(plain), _rows(converted)
    for key in ("train/loss", "train/grad_norm", "reward/mean"):
        assert b[1][key] == pytest.approx(a[1][key], abs=1e-6), key
    assert b[1]["sync/logprob_abs_diff_max"] < 1e-3
