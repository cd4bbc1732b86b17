"""Mistakes a user can make end in one line naming the fix, exit status 2, no traceback.

Through the CLI as users run it (in this process, one gloo rank), each case stopping before any
model is built: a misspelt reasoning-gym task, prompts that all get filtered out, a missing
dataset file, a layout the world size does not divide, an HF directory of an unsupported
`model_type` or with a tokenizer larger than its vocabulary. (A Megatron checkpoint of another
shape: tests/unit/test_checkpoint.py; several ranks printing one line: tests/distributed/test_user_errors_2rank.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_r1.cli import main
from megatron_r1.config import ModelConfig
from megatron_r1.models.hf.base import get_adapter

SMALL = ["data.train_size=40", "data.eval_size=8"]


def make_hf_dir(out: Path, vocab_size: int = 512, model_type: str | None = None) -> Path:
    """config.json and tokenizer files, which is all the stages read before building the model."""
    from megatron_r1.data.tokenizer import train_tokenizer

    train_tokenizer(["1 + 2 = 3", "<think>a b</think><answer>4</answer>"] * 20, 300, out)
    config = get_adapter("llama").hf_config(ModelConfig(vocab_size=vocab_size))
    if model_type:
        config["model_type"] = model_type
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_hf_dir(tmp_path_factory.mktemp("hf"))


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit status and the one `megatron-r1` line on stderr (asserting there is exactly one)."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("megatron-r1")]
    assert len(lines) == 1, err
    return code, lines[0]


def evaluate(capsys, hf_dir: Path, tmp_path: Path, *overrides: str) -> tuple[int, str]:
    return run_cli(capsys, "--log-level", "WARNING", "evaluate", "r1_zero_tiny", f"checkpoint.load_hf={hf_dir}", f"logging.run_dir={tmp_path}", *SMALL, *overrides)


def test_a_misspelt_task_lists_close_matches(capsys, hf_dir, tmp_path):
    code, line = evaluate(capsys, hf_dir, tmp_path, "data.task=chain_sun")
    assert code == 2 and "data.task='chain_sun' is not a reasoning-gym dataset; did you mean chain_sum" in line


def test_no_usable_prompts_counts_the_reasons_and_names_the_setting(capsys, hf_dir, tmp_path):
    code, line = evaluate(capsys, hf_dir, tmp_path, "data.max_prompt_tokens=4")
    assert code == 2 and "no usable eval prompts (skipped too_long: 8)" in line and "raise data.max_prompt_tokens (now 4)" in line


def test_a_jsonl_without_usable_rows_says_how_to_fix_them(capsys, hf_dir, tmp_path):
    rows = tmp_path / "eval.jsonl"
    rows.write_text('{"question": "1+1?"}\n{"prompt": ""}\nnot json\n')
    code, line = evaluate(capsys, hf_dir, tmp_path, "data.source=jsonl", f"data.eval_path={rows}")
    assert code == 2 and "missing_answer: 1" in line and "bad_json: 1" in line and "fix the rows of the jsonl file" in line


def test_a_missing_dataset_file_is_named(capsys, hf_dir, tmp_path):
    code, line = evaluate(capsys, hf_dir, tmp_path, "data.source=jsonl", f"data.eval_path={tmp_path}/nope.jsonl")
    assert code == 2 and "data.eval_path: no such file" in line and "nope.jsonl" in line


def test_a_world_size_the_layout_does_not_divide(capsys, hf_dir, tmp_path):
    code, line = evaluate(capsys, hf_dir, tmp_path, "parallel.pipeline_model_parallel_size=2")
    assert code == 2 and "world size 1 is not divisible by TP x PP x CP = 2" in line and "launch a multiple of 2" in line


def test_an_unsupported_model_type_names_the_supported_ones(capsys, tmp_path):
    hf = make_hf_dir(tmp_path / "hf", model_type="mistral")
    code, line = run_cli(capsys, "convert", "from-hf", "--hf", str(hf), "--stage", "r1_zero_tiny", "--out", str(tmp_path / "out"))
    assert code == 2 and "model_type 'mistral'; supported: deepseek_v3, llama, qwen2" in line


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(capsys, tmp_path):
    hf = make_hf_dir(tmp_path / "hf", vocab_size=256)
    code, line = run_cli(capsys, "convert", "from-hf", "--hf", str(hf), "--stage", "r1_zero_tiny", "--out", str(tmp_path / "out"))
    assert code == 2 and "tokenizer has 270 tokens but config.json's vocab_size is 256" in line  # BPE stops at 270 on this corpus


def test_a_model_section_that_is_not_the_model_in_load_hf_is_refused(capsys, hf_dir, tmp_path):
    """`model: qwen2.5_7b` with a tiny checkpoint: the run would train the checkpoint while `plan` sized the
    7B model. Refused before anything is built; without a model: section the checkpoint decides."""
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "1 + 2", "response": "<think>1 + 2 = 3</think> <answer>3</answer>"}) + "\n")
    args = ["sft", "sft_tiny", f"checkpoint.load_hf={hf_dir}", "checkpoint.base_stage=", f"sft.train_path={data}",
            f"logging.run_dir={tmp_path / 'run'}"]
    code, line = run_cli(capsys, *args, "model=qwen2.5_7b")
    assert code == 2 and "the model: section (arch=qwen2, num_layers=28" in line and f"checkpoint.load_hf={hf_dir}" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("case", ["missing_checkpoint_dir", "out_is_a_file", "out_is_not_empty"])
def test_convert_refuses_a_bad_checkpoint_or_output_path_in_one_line_writing_nothing(capsys, tmp_path, case):
    ckpt, out = tmp_path / "checkpoints", tmp_path / "out"
    if case != "missing_checkpoint_dir":
        ckpt.mkdir()
    if case == "out_is_a_file":
        out.write_text("keep me")
    elif case == "out_is_not_empty":
        out.mkdir()
        (out / "earlier.txt").write_text("keep me")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, line = run_cli(capsys, "convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(out))
    expected = {"missing_checkpoint_dir": "no such directory", "out_is_a_file": "is a file", "out_is_not_empty": "is not empty"}[case]
    assert code == 2 and expected in line
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_section_the_command_does_not_read_is_warned_about_once(caplog):
    """`grpo:` in an SFT run changes nothing: one warning says so and who reads it; the sections every
    stage shares, and the commands that borrow a stage config (evaluate), are not warned about."""
    from megatron_r1.cli import load_config, unread_sections

    assert unread_sections("sft", load_config("sft_tiny", ["grpo.kl_beta=0.1", "rollout.temperature=0.5"])) == ["rollout", "grpo"]
    assert unread_sections("sft", load_config("sft_tiny", ["data.languages=[en]", "reward.format_weight=0.5"])) == []
    assert unread_sections("r1-zero", load_config("r1_zero_tiny", [])) == []
    assert unread_sections("evaluate", load_config("r1_zero_tiny", ["sft.epochs=3"])) == []
    for stage in sorted((Path(__file__).resolve().parents[2] / "conf/stages").glob("*.yaml")):  # every shipped config, for the command it is for
        cfg = load_config(stage, [])
        command = {"r1_zero": "r1-zero", "reasoning_rl": "grpo", "final_rl": "grpo", "sft": "sft", "cold_start_sft": "sft",
                   "distill": "sft", "reward_model": "reward-model", "pretrain": "pretrain", "rejection_sampling": "rejection-sample"}[cfg.name]
        assert unread_sections(command, cfg) == [], stage


def test_the_warning_is_logged_once_before_the_run(capsys, caplog, hf_dir, tmp_path):
    code, line = run_cli(capsys, "sft", "sft_tiny", f"checkpoint.load_hf={hf_dir}", "checkpoint.base_stage=", "grpo.kl_beta=0.1",
                         f"logging.run_dir={tmp_path}")  # no sft.train_path: stops after the warning
    warnings = [r.getMessage() for r in caplog.records if "no effect on this command" in r.getMessage()]
    assert warnings == ["sft: the config's grpo section has no effect on this command (read by: grpo by r1-zero, grpo)"]
    assert code == 2


@pytest.mark.parametrize("override, expected", [
    ("rollout.quantization=fp8", "rollout.quantization=fp8 runs on GPU engines only"),
    ("grpo.routing_replay=r3", "grpo.routing_replay=r3 needs the engine's routed experts"),
])
def test_gpu_only_engine_options_are_refused_on_cpu_before_anything_loads(capsys, tmp_path, override, expected):
    """Nothing exists at checkpoint.load_hf: the refusal comes before the base model is looked for."""
    code, line = run_cli(capsys, "--log-level", "WARNING", "r1-zero", "r1_zero_tiny_moe", f"checkpoint.load_hf={tmp_path / 'absent'}",
                         "checkpoint.base_stage=", f"logging.run_dir={tmp_path}", override)
    assert code == 2 and expected in line
    assert not (tmp_path / "absent").exists()


def test_routing_replay_on_a_dense_model_is_refused(capsys, hf_dir, tmp_path):
    code, line = run_cli(capsys, "--log-level", "WARNING", "r1-zero", "r1_zero_tiny", f"checkpoint.load_hf={hf_dir}", f"logging.run_dir={tmp_path}",
                         *SMALL, "grpo.routing_replay=r2")
    assert code == 2 and "grpo.routing_replay=r2 replays MoE routing" in line and "dense model" in line


@pytest.mark.parametrize("command, overrides, expected", [
    ("r1-zero", [], "leaves no trainer rank in a job of 1: launch more processes (e.g. torchrun --nproc-per-node 2)"),
    ("r1-zero", ["data.general_share=0.3"], "set data.general_share=0 or placement=colocated"),
    ("sft", [], "only the GRPO stages (r1-zero, grpo) have; set placement=colocated for sft"),
])
def test_a_disaggregated_run_that_cannot_work_is_refused_before_anything_starts(capsys, hf_dir, tmp_path, command, overrides, expected):
    stage = {"r1-zero": "r1_zero_tiny", "sft": "sft_tiny"}[command]
    code, line = run_cli(capsys, "--log-level", "WARNING", command, stage, f"checkpoint.load_hf={hf_dir}", f"logging.run_dir={tmp_path}",
                         "placement=disaggregated", *overrides)
    assert code == 2 and expected in line, line
