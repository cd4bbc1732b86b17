"""slurm/r1_zero.sh as Slurm runs it, on this machine (tools/slurm_local/: stand-ins for sbatch,
srun, scontrol, scancel): SIGUSR1 to the batch shell mid-step -> srun -> both ranks finish the step,
save it and exit 75 -> the script requeues -> the requeued job resumes and its next step has the
loss of an uninterrupted 2-rank run of the same config (the shared one of the SPMD test)."""

import json
import subprocess
import sys

from tests.e2e.conftest import ROOT


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
