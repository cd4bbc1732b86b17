"""The tiny bases: shipped in `assets/` with checksums every stage checks (a damaged copy is one line), and
rebuildable: two jobs that both find a base missing do not both pretrain it (the second waits for the first's
lock and then reuses its result), and the first says what it is doing; `tools/ship_base.py` ships a rebuilt
base and compares one with the shipped copy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_r1.checksums import read_checksums, verify_checksums
from megatron_r1.config import load_config

ROOT = Path(__file__).resolve().parents[1].parent

JOB = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from megatron_r1.stages.base_model import ensure_base_model
hf = ensure_base_model("conf/stages/pretrain_tiny.yaml", [f"logging.run_dir={sys.argv[1]}", "steps=6", "optimizer.lr_warmup_steps=0",
                       "pretrain.tokenizer_texts=1000", "pretrain.batch_size=4", "pretrain.probe_samples=0", "logging.progress_bar=false"])
print("HF", hf)
"""


def test_two_jobs_needing_the_same_missing_base_pretrain_it_once(tmp_path):
    run_dir = tmp_path / "tiny_base"
    jobs = [subprocess.Popen([sys.executable, "-c", JOB, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [job.communicate(timeout=600) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), [err[-2000:] for _, err in outputs]
    logs = "".join(err for _, err in outputs)
    assert logs.count("pretraining the base model first") == 1, logs[-3000:]  # one job trained, the other reused it
    assert all(f"HF {run_dir / 'hf'}" in out for out, _ in outputs)
    assert (run_dir / "hf/config.json").is_file() and (run_dir / "pretrain_done.json").is_file()


SHIPPED = [ROOT / "assets/tiny_base", ROOT / "assets/tiny_moe_base"]


@pytest.mark.parametrize("shipped", SHIPPED, ids=lambda p: p.name)
def test_the_shipped_bases_match_their_checksums_and_say_how_to_rebuild_them(shipped):
    sums = read_checksums(shipped)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(sums)
    verify_checksums(shipped)  # raises on a damaged file
    provenance = json.loads((shipped / "provenance.json").read_text())
    stage = provenance["rebuild"].split()[-1]
    assert provenance["rebuild"] == f"megatron-r1 pretrain {stage}" and (ROOT / stage).is_file()
    assert load_config(ROOT / stage).logging.run_dir == f"runs/{shipped.name}"  # `make tiny-base` compares like with like
    assert provenance["base_probe"]["worked_accuracy"] > provenance["base_probe"]["direct_accuracy"]
    # the stages that start from it name it, so RL starts from the same weights on every machine
    names = {"tiny_base": "r1_zero_tiny.yaml", "tiny_moe_base": "r1_zero_tiny_moe.yaml"}
    assert load_config(ROOT / "conf/stages" / names[shipped.name]).checkpoint.load_hf == f"assets/{shipped.name}"


@pytest.mark.parametrize("damage", ["flipped byte", "missing file"])
def test_a_damaged_shipped_base_is_refused_in_one_line_before_anything_runs(tmp_path, damage):
    copy = tmp_path / "tiny_base"
    shutil.copytree(ROOT / "assets/tiny_base", copy)
    weights = copy / "model.safetensors"
    if damage == "missing file":
        weights.unlink()
    else:
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "megatron_r1.cli", "--log-level", "WARNING", "r1-zero", "conf/stages/r1_zero_tiny.yaml",
                          f"checkpoint.load_hf={copy}", f"logging.run_dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in out.stderr.splitlines() if line.startswith("megatron-r1")]
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "model.safetensors" in lines[0] and "git checkout" in lines[0]
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_ship_then_compare_round_trips_and_names_a_different_base(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ROOT / "assets/tiny_base", run / "hf")
    (run / "hf/SHA256SUMS").unlink()
    (run / "hf/provenance.json").unlink()
    (run / "pretrain_done.json").write_text(json.dumps({"steps": 4000, "final_loss": 0.2, "parameters": 591232, "wall_seconds": 1.0,
                                                         "base_probe": {"worked_accuracy": 0.7, "direct_accuracy": 0.05}}))
    tool = [sys.executable, str(ROOT / "tools/ship_base.py")]
    shipped = tmp_path / "shipped"
    subprocess.run([*tool, "ship", str(run), str(shipped), "--stage", "conf/stages/pretrain_tiny.yaml"], check=True, capture_output=True)
    verify_checksums(shipped)
    same = subprocess.run([*tool, "compare", str(run), str(shipped)], capture_output=True, text=True)
    assert same.returncode == 0 and "byte-identical" in same.stdout
    (run / "hf/config.json").write_text("{}")  # a base built elsewhere
    other = subprocess.run([*tool, "compare", str(run), str(shipped)], capture_output=True, text=True)
    assert other.returncode == 1 and "differs" in other.stdout and "config.json" in other.stdout
