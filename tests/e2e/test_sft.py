"""`megatron-r1 sft` end to end on CPU, as users run it: jsonl conversations (some malformed) -> packed
SFT of the tiny base model -> held-out loss falls, the exported model fits the responses better under
plain transformers, SIGTERM stops it at a step boundary
with a checkpoint and the requeue status, and 2 ranks (DP or TP) train like 1."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_r1.data.tiny_corpus import CorpusStream, completion
from megatron_r1.train.preemption import REQUEUE_EXIT_CODE
from tests.e2e.conftest import ROOT, cli

STAGE = ROOT / "conf/stages/sft_tiny.yaml"


def _conversations(n: int, seed: int) -> list[dict]:
    """Worked chain sums in prompt/response form (what a cold-start set looks like for this task)."""
    stream = CorpusStream(seed=seed, worked_share_start=1.0, worked_share_end=1.0, total_examples=n)
    return [{"prompt": stream.entry(i)["question"], "response": completion(stream.entry(i), worked=True).strip()} for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sft_data")
    train = [json.dumps(r) for r in _conversations(96, seed=31)]
    train[10:10] = ["{broken", json.dumps({"prompt": "no response"}), json.dumps({"messages": "nope"})]
    (d / "train.jsonl").write_text("\n".join(train) + "\n")
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _conversations(16, seed=32)))
    return {"train": d / "train.jsonl", "eval": d / "eval.jsonl"}


def _sft_args(run_dir: Path, base: Path, data: dict) -> list[str]:
    return ["sft", str(STAGE), f"logging.run_dir={run_dir}", f"checkpoint.load_hf={base}", "checkpoint.base_stage=",
            f"sft.train_path={data['train']}", f"sft.eval_path={data['eval']}", "sft.batch_size=4", "sft.micro_batch_size=2",
            "sft.epochs=2", "sft.max_steps=6", "sft.eval_every=3", "optimizer.lr=3e-4", "optimizer.lr_warmup_steps=0",
            "checkpoint.save_every=2", "checkpoint.keep_last=0", "logging.progress_bar=false"]


def _sft(run_dir: Path, base: Path, data: dict, *extra: str, ranks: int = 1):
    return cli(*_sft_args(run_dir, base, data), *extra, ranks=ranks)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _response_nll(hf_dir: Path, rows: list[dict]) -> float:
    """Token-mean NLL of the responses under plain transformers, the R1-Zero prompt around each question."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_r1.data.templates import render_prompt

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    total, count = 0.0, 0
    for r in rows:
        prompt = tok(render_prompt("r1_zero", r["prompt"]))["input_ids"]
        response = tok(" " + r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        total += -float(logp[len(prompt) - 1 :].sum())
        count += len(response)
    return total / count


@pytest.fixture(scope="module")
def one_rank_run(base_model, data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sft_run")
    out = _sft(run_dir, base_model, data)
    assert "SFT finished" in out.stdout
    return run_dir


def test_sft_learns_the_responses_and_exports_a_standard_model(one_rank_run, base_model, data):
    summary = json.loads((one_rank_run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["train_conversations"] == 96
    assert summary["skipped"] == {"not_json": 1, "missing_prompt_or_response": 1, "bad_messages": 1}
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]
    assert (one_rank_run / "plot.png").is_file() and (one_rank_run / "tb").is_dir()
    held_out = [json.loads(line) for line in data["eval"].read_text().splitlines()]
    before, after = _response_nll(base_model, held_out), _response_nll(one_rank_run / "hf", held_out)
    assert after < before
    # Our eval loss and transformers' agree on the fine-tuned model (same template, same tokens).
    assert after == pytest.approx(summary["final_eval_loss"], rel=1e-3)


def test_sigterm_saves_the_step_in_progress_and_exits_for_requeue(one_rank_run, base_model, data, tmp_path):
    """What a preempted Slurm job gets: the step finishes, is saved, the exit status asks for a requeue
    (resuming from a checkpoint: tests/e2e/test_stage_contract.py)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_r1.cli", *_sft_args(run_dir, base_model, data)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and '"step": 1,' in metrics.read_text()):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    saved = int((run_dir / "checkpoints/latest").read_text())
    logged = _losses(run_dir)
    assert 2 <= saved < 6 and sorted(logged) == list(range(1, saved + 1))  # stopped at a boundary, mid-run
    assert f"saving step {saved} and exiting for requeue" in err
    full = _losses(one_rank_run)
    assert all(logged[step] == pytest.approx(full[step], rel=1e-5) for step in logged)


@pytest.mark.parametrize("layout", [pytest.param([], id="dp2"), pytest.param(["parallel.tensor_model_parallel_size=2"], id="tp2", marks=pytest.mark.slow)])
def test_two_ranks_train_like_one(one_rank_run, base_model, data, tmp_path, layout):
    """Data parallel (rows split, global denominators) and tensor parallel (packed masks and
    vocab-parallel losses over sharded heads) give the 1-rank losses at every step."""
    two = tmp_path / "two_ranks"
    _sft(two, base_model, data, "checkpoint.save_every=0", *layout, ranks=2)
    one, dp2 = _losses(one_rank_run), _losses(two)
    assert sorted(dp2) == sorted(one)
    for step in one:
        assert dp2[step] == pytest.approx(one[step], rel=1e-4), step
