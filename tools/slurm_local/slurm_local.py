#!/usr/bin/env python3
"""Stand-ins for `sbatch`, `srun`, `scontrol` and `scancel` that run a batch script on this machine,
one node, as Slurm would: enough to exercise slurm/*.sh (signals, requeue, rank environment)
without a cluster. Put tools/slurm_local/bin first on PATH; each name there links to this file.

What each does, and how far it goes:

* `sbatch [--wait] [OPTIONS] SCRIPT [ARGS]`: reads the script's `#SBATCH` lines (command-line
  options win), gives the job an id, runs a copy of the script from a spool directory (as slurmd
  does, so `$0` is not in the repository) with cwd and SLURM_SUBMIT_DIR the submit directory,
  output to `--output` (%x job name, %j job id; default slurm-%j.out; `--open-mode`). A job that
  called `scontrol requeue` runs again with the same id and SLURM_RESTART_COUNT+1. Without
  `--wait` it returns at once, like sbatch. `--time` and `--signal` are not timed: send the signal
  with `scancel --signal`. Only `--nodes=1`.
* `srun [--ntasks-per-node=N] [--kill-on-bad-exit[=0|1]] CMD ...`: N tasks with SLURM_PROCID,
  SLURM_LOCALID, SLURM_NTASKS, SLURM_NODEID, SLURM_STEP_ID; the signals srun receives (USR1, USR2,
  TERM, INT, HUP, QUIT) go to every task; with kill-on-bad-exit a task's non-zero exit ends the
  others (SIGTERM, then SIGKILL after SLURM_LOCAL_KILL_WAIT seconds, default 30: Slurm's KillWait).
  Exit status: the highest task status, 128+N for a task killed by signal N.
* `scontrol show hostnames [LIST]` (bracket ranges expanded), `scontrol requeue JOBID`.
* `scancel [--signal=SIG] [--batch | --full] JOBID`: a signal to the batch shell only (--batch),
  to every task of every running step (default), or both (--full); without --signal, SIGTERM to all
  of them and no requeue.

State (job ids, pids, requeue marks) lives in $SLURM_LOCAL_STATE (default /tmp/slurm_local-$UID).
Stdlib only: it runs under any python3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
MAX_RESTARTS = 10  # a job that requeues itself forever is a bug in it; stop there


def fail(message: str) -> None:
    print(f"{Path(sys.argv[0]).name} (local stand-in): {message}", file=sys.stderr)
    sys.exit(1)


def state_dir() -> Path:
    path = Path(os.environ.get("SLURM_LOCAL_STATE") or f"/tmp/slurm_local-{os.getuid()}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def job_dir(job_id: str) -> Path:
    path = state_dir() / f"job{job_id}"
    if not path.is_dir():
        fail(f"no job {job_id} (known: {sorted(p.name[3:] for p in state_dir().glob('job*'))})")
    return path


def signal_number(name: str) -> int:
    name = name.upper()
    if name.isdigit():
        return int(name)
    return int(getattr(signal, name if name.startswith("SIG") else f"SIG{name}"))


def send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------------------------
# sbatch


def sbatch_options(script: Path) -> list[str]:
    """The `#SBATCH` options at the top of a script: Slurm stops reading at the first command."""
    options = []
    for line in script.read_text().splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if stripped.startswith("#SBATCH"):
            options.extend(stripped[len("#SBATCH"):].split("#")[0].split())
    return options


def sbatch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sbatch", add_help=True)
    p.add_argument("-J", "--job-name")
    p.add_argument("-o", "--output")
    p.add_argument("--open-mode", choices=["append", "truncate"], default="truncate")
    p.add_argument("-N", "--nodes", default="1")
    p.add_argument("--ntasks-per-node", type=int)
    p.add_argument("--requeue", action="store_true", default=None)
    p.add_argument("--no-requeue", dest="requeue", action="store_false")
    p.add_argument("--signal")
    p.add_argument("-W", "--wait", action="store_true")
    return p


def split_sbatch_argv(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """(sbatch options, script, script arguments): options end at the script, as in sbatch."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in _VALUE_OPTIONS else 1  # `-J name` takes the next word, `--job-name=x` not
    if i >= len(argv):
        fail("usage: sbatch [OPTIONS] SCRIPT [ARGS]")
    return argv[:i], argv[i], argv[i + 1 :]


_VALUE_OPTIONS = {"-J", "--job-name", "-o", "--output", "-N", "--nodes", "-p", "--partition", "-t", "--time",
                  "-A", "--account", "-n", "--ntasks", "-c", "--cpus-per-task"}


def sbatch(argv: list[str]) -> int:
    options, script, script_args = split_sbatch_argv(argv)
    script = Path(script)
    if not script.is_file():
        fail(f"no batch script {script}")
    parser = sbatch_parser()
    opts, _ = parser.parse_known_args(sbatch_options(script))  # the rest (GPUs, time, ...) means nothing here
    opts, _ = parser.parse_known_args(options, namespace=opts)  # the command line wins
    if str(opts.nodes) != "1":
        fail(f"--nodes={opts.nodes}: the local stand-in runs one node")
    if opts.signal and not re.fullmatch(r"(R?B?:)?\w+(@\d+)?", opts.signal):
        fail(f"--signal={opts.signal} is not [B:]SIG[@seconds]")
    submit_dir = Path.cwd()
    job_id = _next_job_id()
    name = opts.job_name or script.name
    jdir = state_dir() / f"job{job_id}"
    jdir.mkdir()
    spool = jdir / "slurm_script"  # slurmd runs a copy: `$0` is not in the repository
    shutil.copy(script, spool)
    env = {
        **os.environ,
        "SLURM_JOB_ID": job_id, "SLURM_JOBID": job_id, "SLURM_JOB_NAME": name,
        "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost",
        "SLURM_NNODES": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
        "SLURM_SUBMIT_DIR": str(submit_dir), "SLURM_CLUSTER_NAME": "local",
    }
    if opts.ntasks_per_node:
        env.update(SLURM_NTASKS_PER_NODE=str(opts.ntasks_per_node), SLURM_NTASKS=str(opts.ntasks_per_node))
    job = {
        "env": env,
        "command": ["bash", str(spool), *script_args],
        "output": str(submit_dir / (opts.output or "slurm-%j.out").replace("%x", name).replace("%j", job_id)),
        "open_mode": opts.open_mode,
        "requeue": opts.requeue is not False,
    }
    (jdir / "job.json").write_text(json.dumps(job))
    print(f"Submitted batch job {job_id}", flush=True)
    if opts.wait:
        return run_job(job_id)
    # Like sbatch: return now, the job runs on.
    subprocess.Popen([sys.executable, os.path.realpath(__file__), "_run_job", job_id], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return 0


def _next_job_id() -> str:
    counter = state_dir() / "last_job_id"
    last = int(counter.read_text()) if counter.is_file() else 1000
    counter.write_text(str(last + 1))
    return str(last + 1)


def run_job(job_id: str) -> int:
    """Run the batch script until it ends without asking for a requeue; returns its last status.
    Each attempt's status is appended to <state>/job<id>/attempts."""
    jdir = job_dir(job_id)
    job = json.loads((jdir / "job.json").read_text())
    env = job["env"]
    status = 0
    for restart in range(MAX_RESTARTS + 1):
        if restart:
            env["SLURM_RESTART_COUNT"] = str(restart)  # Slurm sets it only on a restart
        # Slurm's default truncates the log when a requeued job starts again; append keeps it.
        with open(job["output"], "a" if job["open_mode"] == "append" else "w") as log:
            batch = subprocess.Popen(job["command"], cwd=env["SLURM_SUBMIT_DIR"], env=env, stdout=log, stderr=subprocess.STDOUT)
            (jdir / "batch.pid").write_text(str(batch.pid))
            status = batch.wait()
        (jdir / "batch.pid").unlink()
        with open(jdir / "attempts", "a") as f:
            f.write(f"{status}\n")
        mark = jdir / "requeue"
        if not mark.exists():
            return status
        mark.unlink()
        if not job["requeue"]:
            print(f"sbatch (local stand-in): job {job_id} asked for a requeue but was submitted with --no-requeue", file=sys.stderr)
            return status
    fail(f"job {job_id} requeued itself {MAX_RESTARTS} times; stopping")
    return status


# --------------------------------------------------------------------------------------------
# srun


def srun(argv: list[str]) -> int:
    if "SLURM_JOB_ID" not in os.environ:
        fail("not inside a job (no SLURM_JOB_ID): run it from a script submitted with sbatch")
    p = argparse.ArgumentParser(prog="srun")
    p.add_argument("--ntasks-per-node", type=int)
    p.add_argument("-n", "--ntasks", type=int)
    p.add_argument("-N", "--nodes", default="1")
    p.add_argument("-K", "--kill-on-bad-exit", nargs="?", const="1", default="0")
    p.add_argument("command", nargs=argparse.REMAINDER)
    opts, _ = p.parse_known_args(argv)  # binding, GPU and CPU options mean nothing here
    if not opts.command:
        fail("usage: srun [OPTIONS] COMMAND [ARGS]")
    if str(opts.nodes) != "1":
        fail(f"--nodes={opts.nodes}: the local stand-in runs one node")
    ntasks = opts.ntasks or opts.ntasks_per_node or int(os.environ.get("SLURM_NTASKS_PER_NODE", "1"))
    jdir = job_dir(os.environ["SLURM_JOB_ID"])
    step = sum(1 for _ in jdir.glob("step*.pids"))
    tasks = []
    for rank in range(ntasks):
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
               "SLURM_NTASKS": str(ntasks), "SLURM_NPROCS": str(ntasks), "SLURM_STEP_ID": str(step),
               "SLURM_STEPID": str(step), "SLURM_STEP_NUM_TASKS": str(ntasks)}
        tasks.append(subprocess.Popen(opts.command, env=env))
    pids = jdir / f"step{step}.pids"
    pids.write_text(" ".join(str(t.pid) for t in tasks))

    def forward(signum, frame):
        for t in tasks:
            if t.poll() is None:
                send(t.pid, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    kill_wait = float(os.environ.get("SLURM_LOCAL_KILL_WAIT", "30"))
    killing_since = None
    while any(t.poll() is None for t in tasks):
        bad = [t for t in tasks if t.returncode not in (None, 0)]
        if opts.kill_on_bad_exit != "0" and bad and killing_since is None:
            killing_since = time.monotonic()
            forward(signal.SIGTERM, None)
        if killing_since is not None and time.monotonic() - killing_since > kill_wait:
            forward(signal.SIGKILL, None)
        time.sleep(0.05)
    pids.rename(pids.with_suffix(".done"))
    return max(t.returncode if t.returncode >= 0 else 128 - t.returncode for t in tasks)


# --------------------------------------------------------------------------------------------
# scontrol, scancel


def expand_hostnames(nodelist: str) -> list[str]:
    """'gpu[01-03,7],cpu1' -> ['gpu01', 'gpu02', 'gpu03', 'gpu7', 'cpu1']."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1))
    return hosts


def scontrol(argv: list[str]) -> int:
    if argv[:2] == ["show", "hostnames"]:
        nodelist = argv[2] if len(argv) > 2 else os.environ.get("SLURM_JOB_NODELIST", "")
        print("\n".join(expand_hostnames(nodelist)))
        return 0
    if argv[:1] == ["requeue"] and len(argv) == 2:
        for job_id in argv[1].split(","):
            jdir = job_dir(job_id)
            if not (jdir / "batch.pid").exists():
                fail(f"job {job_id} is not running")
            (jdir / "requeue").touch()
        return 0
    fail(f"'scontrol {' '.join(argv)}' is not supported (only 'show hostnames' and 'requeue JOBID')")
    return 1


def scancel(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scancel")
    p.add_argument("-s", "--signal")
    p.add_argument("-b", "--batch", action="store_true")
    p.add_argument("-f", "--full", action="store_true")
    p.add_argument("job_id")
    opts = p.parse_args(argv)
    jdir = job_dir(opts.job_id)
    sig = signal_number(opts.signal) if opts.signal else signal.SIGTERM
    batch = jdir / "batch.pid"
    targets = []
    if opts.batch or opts.full or not opts.signal:
        if batch.exists():
            targets.append(int(batch.read_text()))
    if not opts.batch or opts.full or not opts.signal:
        for pids in jdir.glob("step*.pids"):
            targets.extend(int(pid) for pid in pids.read_text().split())
    if not opts.signal:  # a cancel, not a warning: no requeue afterwards
        (jdir / "requeue").unlink(missing_ok=True)
    for pid in targets:
        send(pid, sig)
    return 0


def main() -> int:
    name, argv = Path(sys.argv[0]).name, sys.argv[1:]
    if name == "slurm_local.py" and argv[:1] == ["_run_job"]:
        return run_job(argv[1])
    commands = {"sbatch": sbatch, "srun": srun, "scontrol": scontrol, "scancel": scancel}
    if name not in commands:
        fail(f"call me as one of {', '.join(commands)} (tools/slurm_local/bin)")
    return commands[name](argv)


if __name__ == "__main__":
    sys.exit(main())
