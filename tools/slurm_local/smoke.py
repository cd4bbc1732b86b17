"""`make slurm-smoke`: the real slurm/r1_zero.sh under the local Slurm stand-ins (bin/), 1 node x 2 ranks.

1. A straight run: `sbatch --wait slurm/r1_zero.sh` (tiny R1-Zero, 2 steps), unless `--straight`
   names an uninterrupted run of the same overrides and layout made already (the e2e tests share one).
2. The same job again, sent `scancel --batch --signal=USR1` (what `--signal=B:USR1@<s>` does) while
   step 1 runs: the batch shell forwards it to srun, srun to both ranks; they finish the step, save
   it, exit 75; the script requeues; the requeued job resumes at the next step.
3. Checks: the job ran twice (statuses 75 then 0), the first attempt saved exactly the signalled
   step and logged why, the second resumed from it, every step is logged once, and each step after
   the resume has the straight run's loss, grad norm and mean reward within 1e-5.

Prints a table and writes <workdir>/smoke.json; exits 1 on a failed check.
    python tools/slurm_local/smoke.py [--base HF_DIR] [--workdir DIR] [--straight RUN_DIR OVERRIDE ...]
Without --base it starts from the shipped tiny base (assets/tiny_base).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(__file__).resolve().parent / "bin"
STAGE = "conf/stages/r1_zero_tiny.yaml"
SIGNAL_STEP, RANKS = 1, 2
REQUEUE_EXIT_CODE = 75  # megatron_r1/train/preemption.py
# Short but whole: rollout, reward, update, sync and parity probe, evaluation, checkpoint, export.
TINY = ["grpo.prompts_per_step=4", "rollout.n_samples_per_prompt=4", "rollout.max_response_tokens=48",
        "data.eval_size=8", "logging.eval_every=0", "logging.eval_samples=1", "logging.progress_bar=false",
        "checkpoint.base_stage=", "steps=2"]
KEYS = ("train/loss", "train/grad_norm", "reward/mean")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit(env: dict, workdir: Path, name: str, run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    """`sbatch --wait` of the real script, from the repository root (the submit directory)."""
    argv = ["sbatch", "--wait", f"--job-name={name}", f"--ntasks-per-node={RANKS}", f"--output={workdir}/%x-%j.out",
            "slurm/r1_zero.sh", STAGE, *overrides, f"logging.run_dir={run_dir}"]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def job_id(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()  # "Submitted batch job N", printed before the job runs
    if not line.startswith("Submitted batch job"):
        raise SystemExit(f"sbatch said {line!r}")
    return line.split()[-1]


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl, in order (a step twice would be a resume bug: kept, to be caught)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]]  # a line being written has no newline yet


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, help="tiny base model (HF directory); default: the shipped assets/tiny_base")
    p.add_argument("--workdir", type=Path, help="where runs, logs and Slurm state go (default: a fresh temporary directory)")
    p.add_argument("--straight", type=Path, help="an uninterrupted 2-rank run of OVERRIDES to compare with, instead of a straight job")
    p.add_argument("overrides", nargs="*", help=f"{STAGE} overrides, checkpoint.load_hf included (default: the base and a 2-step tiny run)")
    args = p.parse_args()
    if args.straight and not args.overrides:
        p.error("--straight needs the OVERRIDES that made that run")
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="slurm_smoke_"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = args.overrides
    if not overrides:
        base = args.base or ROOT / "assets/tiny_base"
        overrides = [f"checkpoint.load_hf={base.resolve()}", *TINY]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "SLURM_LOCAL_STATE": str(workdir / "slurm_state"),
           "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}
    t0 = time.perf_counter()

    straight, preempted = args.straight or workdir / "straight", workdir / "preempted"
    if not args.straight:
        job = submit(env, workdir, "straight", straight, overrides)
        straight_id = job_id(job)
        if job.wait() != 0:
            raise SystemExit(f"the straight run failed: see {workdir}/straight-{straight_id}.out")
    straight_seconds = time.perf_counter() - t0

    # The same job; the signal goes to the batch shell once step SIGNAL_STEP has started (the row
    # before it is logged just as the step begins).
    job = submit(env, workdir, "preempted", preempted, overrides)
    jid = job_id(job)
    while all(r["step"] != SIGNAL_STEP - 1 for r in rows(preempted)) and job.poll() is None:
        time.sleep(0.05)
    subprocess.run(["scancel", "--batch", "--signal=USR1", jid], env=env, check=True)
    signalled_at = time.perf_counter()
    status = job.wait()
    total_seconds = time.perf_counter() - t0

    log = (workdir / f"preempted-{jid}.out").read_text()
    attempts = (workdir / "slurm_state" / f"job{jid}" / "attempts").read_text().split()
    logged = [r["step"] for r in rows(preempted)]
    a, b = ({r["step"]: r for r in rows(d) if "train/loss" in r} for d in (straight, preempted))
    after = [step for step in sorted(a) if step > SIGNAL_STEP]
    checks = {
        "job ran twice: requeue status, then done": attempts == [str(REQUEUE_EXIT_CODE), "0"] and status == 0,
        "signal forwarded by the batch shell": "SIGUSR1 received: passed on" in log,
        f"saved step {SIGNAL_STEP}, the step in progress": f"saving step {SIGNAL_STEP} and exiting for requeue" in log,
        "requeued by the script": "requeueing job" in log and "attempt 2" in log,
        f"resumed at step {SIGNAL_STEP}": f"at step {SIGNAL_STEP}" in log and "resumed from" in log,
        "every step logged once": sorted(logged) == sorted(r["step"] for r in rows(straight)),
        "finished": (preempted / "summary.json").exists(),
        "a step after the resume to compare": bool(after),
    }
    table = []
    for step in sorted(a):
        diff = max(abs(a[step][k] - b[step][k]) for k in KEYS) if step in b else float("inf")
        table.append({"step": step, "straight_loss": a[step]["train/loss"], "preempted_loss": b.get(step, {}).get("train/loss", float("nan")),
                      "max_abs_diff": diff, "after_resume": step in after})
        if step in after:
            checks[f"step {step} (after the resume) matches the straight run within 1e-5"] = diff <= 1e-5
    result = {"checks": checks, "steps": table, "seconds": {"straight_job": round(straight_seconds, 1), "total": round(total_seconds, 1),
              "signal_to_end": round(total_seconds - (signalled_at - t0), 1)}, "log": str(workdir / f"preempted-{jid}.out")}
    (workdir / "smoke.json").write_text(json.dumps(result, indent=2))

    print(f"\nslurm smoke: slurm/r1_zero.sh, 1 node x {RANKS} ranks, SIGUSR1 to the batch shell during step {SIGNAL_STEP}")
    print(f"  {'step':>4} | {'straight loss':>14} | {'preempted+requeued':>18} | max |diff| ({', '.join(KEYS)})")
    for r in table:
        print(f"  {r['step']:>4} | {r['straight_loss']:>14.8f} | {r['preempted_loss']:>18.8f} | {r['max_abs_diff']:.1e}"
              + ("  (after resume)" if r["after_resume"] else ""))
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    print(f"  {result['seconds']['total']:.0f} s in all; job log {result['log']}\n", flush=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
