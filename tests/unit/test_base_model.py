"""The tiny base model is made once: two jobs that both find it missing do not both pretrain it (the
second waits for the first's lock and then reuses its result), and the first says what it is doing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
