"""The walkthroughs under examples/, run the way their READMEs say, shortened to a few steps:
your own jsonl prompts, a custom reward, and convert + chat through vLLM."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, cli

pytestmark = pytest.mark.slow  # the walkthroughs as written, ~2.5 minutes (`make test-slow`)

EXAMPLES = ROOT / "examples"

# The READMEs' runs, cut to seconds: every phase still runs (evaluation, checkpoint, export).
SHORT = [
    "steps=2",
    "grpo.prompts_per_step=4",
    "rollout.n_samples_per_prompt=4",
    "rollout.max_response_tokens=48",
    "logging.eval_every=0",
    "logging.eval_samples=2",
    "logging.progress_bar=false",
    "checkpoint.save_every=2",
]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def own_prompts_run(base_model, tmp_path_factory) -> Path:
    """examples/own_prompts: make_data.py writes the jsonl files, r1-zero trains on them."""
    tmp = tmp_path_factory.mktemp("own_prompts")
    subprocess.run([sys.executable, str(EXAMPLES / "own_prompts/make_data.py"), "--out-dir", str(tmp), "--train", "64", "--eval", "8"],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    run_dir = tmp / "run"
    cli("r1-zero", "examples/own_prompts/r1_zero_jsonl.yaml", f"logging.run_dir={run_dir}",
        f"checkpoint.load_hf={base_model}", "checkpoint.base_stage=",
        f"data.train_path={tmp / 'train.jsonl'}", f"data.eval_path={tmp / 'eval.jsonl'}", *SHORT)
    return run_dir


def test_own_prompts_trains_and_evaluates_on_the_jsonl_files(own_prompts_run):
    rows = _metrics(own_prompts_run)
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2]  # the base model, then the final policy
    for r in evals:
        assert 0.0 <= r["eval/accuracy"] <= 1.0 and 0.0 <= r["eval/format_rate"] <= 1.0
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    summary = json.loads((own_prompts_run / "summary.json").read_text())
    assert summary["task"]["name"] == "jsonl" and summary["eval_size"] == 8  # the rows of eval.jsonl, not data.eval_size
    assert summary["final_accuracy"] == pytest.approx(evals[-1]["eval/accuracy"])


def test_custom_reward_is_logged_and_weighted(base_model, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, ["examples/custom_reward", os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "megatron_r1.cli", "r1-zero", "examples/custom_reward/r1_zero_closeness.yaml",
           f"logging.run_dir={run_dir}", f"checkpoint.load_hf={base_model}", "checkpoint.base_stage=", "data.eval_size=8", *SHORT]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}"

    train = [r for r in _metrics(run_dir) if "train/loss" in r]
    assert len(train) == 2
    for r in train:
        closeness = r["reward/my_rewards:closeness"]
        assert 0.0 <= closeness <= 1.0
        assert r["reward/failures"] == 0
        # The logged components are unweighted; the reward is their sum with the YAML's weights.
        assert r["reward/mean"] == pytest.approx(r["reward/accuracy"] + 0.1 * r["reward/format"] + 0.5 * closeness, abs=1e-5)


def test_convert_the_checkpoint_and_chat_with_it(own_prompts_run, tmp_path):
    hf = tmp_path / "hf"
    cli("convert", "to-hf", "--checkpoint", str(own_prompts_run / "checkpoints"), "--out", str(hf))

    # The latest checkpoint is the final policy: the same weights the run exported itself.
    from safetensors.torch import load_file

    converted, exported = load_file(hf / "model.safetensors"), load_file(own_prompts_run / "hf/model.safetensors")
    assert converted.keys() == exported.keys()
    assert all(converted[k].equal(exported[k]) for k in converted)

    question = "State the final answer to the following arithmetic problem: 4 + 1 + 7 - 7 + 7 - 6 ="
    out = subprocess.run([sys.executable, "examples/convert_and_chat/chat.py", str(hf), question],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-5000:]
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines() if line.startswith(("question:", "response:", "answer:")))
    assert lines["question"].strip() == question
    assert "<think>" in lines["response"] and "<answer>" in lines["response"]  # special tokens kept in the text
    int(lines["answer"].strip())  # the tiny model answers chain sums with an integer
