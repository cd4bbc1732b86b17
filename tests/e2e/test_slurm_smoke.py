"""slurm/r1_zero.sh as Slurm runs it, on this machine (tools/slurm_local/: stand-ins for sbatch,
srun, scontrol, scancel): SIGUSR1 to the batch shell mid-step -> srun -> both ranks finish the step,
save it and exit 75 -> the script requeues -> the requeued job resumes and its next step has the
loss of an uninterrupted 2-rank run of the same config (the shared one of the SPMD test)."""

import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT


@pytest.mark.slow  # ~1.5 minutes: a 2-rank job preempted, requeued, resumed (`make test-slow`)
def test_preempted_job_saves_requeues_and_resumes_exactly(two_rank_run, tmp_path):
    straight, overrides = two_rank_run
    out = subprocess.run([sys.executable, "tools/slurm_local/smoke.py", "--workdir", str(tmp_path), "--straight", str(straight), *overrides],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    result = json.loads((tmp_path / "smoke.json").read_text()) if (tmp_path / "smoke.json").exists() else {}
    log = open(result["log"]).read()[-4000:] if result else ""
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}\n{log}"
    assert all(result["checks"].values()) and len(result["checks"]) >= 9
    after = [row for row in result["steps"] if row["after_resume"]]
    assert after and all(row["max_abs_diff"] <= 1e-5 for row in after)


def test_submitted_from_another_directory_with_r1_root(tmp_path):
    """`export R1_ROOT=...; sbatch /path/to/slurm/r1_zero.sh` from outside the repository: the script
    finds slurm/common.sh and the configs there; a bad override ends the job with the one-line error
    in the log, and the job fails without a requeue. (Its status is srun's, the highest of the ranks':
    a rank that srun stopped after another's error reports 143.)"""
    import os

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PATH": f"{ROOT / 'tools/slurm_local/bin'}:{os.environ['PATH']}", "R1_ROOT": str(ROOT),
           "SLURM_LOCAL_STATE": str(tmp_path / "slurm_state"), "PYTHON": sys.executable}
    out = subprocess.run(["sbatch", "--wait", "--job-name=elsewhere", "--ntasks-per-node=2", str(ROOT / "slurm/r1_zero.sh"),
                          "conf/stages/r1_zero_tiny.yaml", "steps=-5"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    logs = list(elsewhere.glob("elsewhere-*.out"))
    log = logs[0].read_text() if logs else ""
    assert out.returncode in (2, 143), f"{out.stdout}\n{out.stderr}\n{log[-3000:]}"
    assert "steps=-5 must be >= 1" in log and "common.sh" not in log and "requeueing" not in log


@pytest.mark.slow  # ~1 minute
def test_a_disaggregated_job_runs_under_the_slurm_script(base_model, tmp_path):
    """The same script with `placement=disaggregated`: srun's last task becomes the rollout rank, the
    first the trainer (Slurm's task ids, no torchrun; rank 0 hosts the job's store), one step stale."""
    import os

    from tests.e2e.test_r1_zero import TINY_RUN

    run_dir = tmp_path / "run"
    env = {**os.environ, "PATH": f"{ROOT / 'tools/slurm_local/bin'}:{os.environ['PATH']}", "R1_ROOT": str(ROOT),
           "SLURM_LOCAL_STATE": str(tmp_path / "slurm_state"), "PYTHON": sys.executable}
    out = subprocess.run(["sbatch", "--wait", "--job-name=apart", "--ntasks-per-node=2", str(ROOT / "slurm/r1_zero.sh"),
                          "conf/stages/r1_zero_tiny.yaml", f"checkpoint.load_hf={base_model}", "checkpoint.base_stage=", *TINY_RUN,
                          "steps=3", f"logging.run_dir={run_dir}", "placement=disaggregated", "async.max_staleness=1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    logs = list(tmp_path.glob("apart-*.out"))
    log = logs[0].read_text() if logs else ""
    assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{log[-4000:]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["layout"]["placement"], summary["layout"]["rollout_ranks"], summary["layout"]["max_staleness"]) == ("disaggregated", 1, 1)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["async/staleness_max"] for r in rows if "train/loss" in r] == [0.0, 1.0, 1.0]
