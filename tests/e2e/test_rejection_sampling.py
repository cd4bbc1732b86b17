"""`megatron-r1 rejection-sample` end to end on CPU: k samples per prompt from the tiny model with the
colocated vLLM engine(s), every kept row re-verified independently, counts that add up, a finished run
not redone, 2 engines under torchrun, and the output trained on by `megatron-r1 sft` as it is."""

import json

import pytest

from megatron_r1.config import RewardConfig
from megatron_r1.rewards.reward_fn import RewardFn
from megatron_r1.data.templates import render_prompt
from tests.e2e.conftest import ROOT, cli

STAGE = ROOT / "conf/stages/rejection_sampling_tiny.yaml"


def _sample(run_dir, base, *extra, ranks=1):
    return cli("rejection-sample", str(STAGE), f"logging.run_dir={run_dir}", f"checkpoint.load_hf={base}",
               "rejection.max_prompts=24", "rollout.max_response_tokens=48", "logging.progress_bar=false", *extra, ranks=ranks)


def _check(run_dir, prompts: int, k: int) -> list[dict]:
    stats = json.loads((run_dir / "stats.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "data.jsonl").read_text().splitlines()]
    assert stats["prompts"] == prompts and stats["samples"] == prompts * k
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["samples"]
    assert len(rows) == stats["kept"] > 0
    # Every kept response is correct and well formed by an independent scoring of the row as written.
    fn = RewardFn(RewardConfig())
    scored = fn([render_prompt("r1_zero", r["prompt"]) for r in rows], [r["response"] for r in rows],
                [{"question": r["prompt"], "answer": r["answer"], "entry": None} for r in rows])
    assert scored.components["accuracy"].tolist() == [1.0] * len(rows)
    assert scored.components["format"].tolist() == [1.0] * len(rows)
    assert len({r["provenance"]["index"] for r in rows}) == len(rows)  # keep_per_prompt=1
    assert [r["provenance"]["index"] for r in rows] == sorted(r["provenance"]["index"] for r in rows)  # prompt order
    return rows


def test_rejection_sampling_keeps_only_verified_samples_and_feeds_sft(base_model, tmp_path):
    run_dir = tmp_path / "rs"
    out = _sample(run_dir, base_model)
    assert "rejection sampling finished" in out.stdout
    _check(run_dir, prompts=24, k=4)
    before = (run_dir / "data.jsonl").stat().st_mtime_ns
    again = _sample(run_dir, base_model)
    assert "already done" in again.stderr and (run_dir / "data.jsonl").stat().st_mtime_ns == before
    # The set is an SFT dataset as written.
    sft = cli("sft", str(ROOT / "conf/stages/sft_tiny.yaml"), f"logging.run_dir={tmp_path / 'sft'}", f"checkpoint.load_hf={base_model}",
              "checkpoint.base_stage=", f"sft.train_path={run_dir / 'data.jsonl'}", "sft.epochs=1", "optimizer.lr_warmup_steps=0",
              "logging.progress_bar=false")
    assert "SFT finished" in sft.stdout and (tmp_path / "sft/hf/config.json").is_file()


@pytest.mark.slow  # a 2-rank run (`make test-slow`); the RL 2-rank tests cover the engines' split
def test_two_engines_sample_each_prompt_once(base_model, tmp_path):
    run_dir = tmp_path / "rs2"
    _sample(run_dir, base_model, "rejection.samples_per_prompt=8", ranks=2)
    rows = _check(run_dir, prompts=24, k=8)
    assert json.loads((run_dir / "stats.json").read_text())["prompts_with_a_kept_response"] == len(rows)
