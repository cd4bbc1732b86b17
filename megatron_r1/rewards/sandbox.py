"""Run one untrusted Python program against its tests in a throwaway sandbox process.

Each layer, and what it stops (`isolation()` says which are active on this machine; it probes
once and logs the answer):

1. Namespaces, when the machine allows them (root, util-linux ``unshare``): the child starts as
   ``unshare --net --mount --pid --kill-child``.
   * network: only a loopback that is down exists, so every connect fails (no downloads, no
     exfiltration, no talking to the trainer's own local servers);
   * PID: the program is PID 1 of its own tree; it cannot see or signal anything outside, and
     when it exits or is killed the kernel kills the whole tree;
   * mount: the filesystem view of layer 2, invisible outside and gone with the namespace.
2. Filesystem (`sandbox_child.enter_root`): chroot into a read-only tmpfs holding only /usr, the
   Python installation, four /dev nodes and a writable, size-capped tmpfs /work (cwd, HOME, /tmp).
   The repository, /etc (shadow), /root, /home and the host's /tmp are not there to read or write.
   The interpreter runs with ``-I -S``: the standard library only, no site-packages, no environment.
3. Privileges: after that the child becomes uid/gid 65534 (nobody) with no capabilities and
   no_new_privs: it cannot undo the mounts, leave the chroot, or signal the root-owned parent.
4. cgroups v1, nested under this process's own (when writable): ``pids.max`` stops fork bombs
   (``RLIMIT_NPROC`` does not bind root, and counts per uid across all sandboxes); the memory
   limit covers the whole tree including files in /work; every task left is killed at the end.
5. rlimits in the child: address space (a huge allocation is a MemoryError), CPU seconds, file
   size, no core dumps, 64 open files.
6. The parent: a wall-clock deadline; stdout+stderr read with a cap (a run printing more is killed
   at the cap: 1 GB of output costs the trainer 1 MB); a minimal environment (nothing of the
   trainer's, e.g. tokens, is inherited); the process group killed; the temporary directory removed.
7. Proof of completion: a pass needs a random per-run nonce that the harness prints only after
   ``check(candidate)`` returned, and exit status 0. ``exit(0)``, ``os._exit(0)`` or a killed parent
   leave no nonce. (The nonce lives in the harness's memory: a program that deliberately reads
   the harness's frames could forge it. That is audit territory, not this layer's.)

Without namespaces (no root, or a container that forbids them) layers 1-3 become in-process
guards (sockets and kill refused) and an empty temporary cwd: they stop accidents, not a
determined program. Train on model-written code only where `isolation().namespaces` is true.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_r1.rewards import sandbox_child as child

logger = logging.getLogger(__name__)

CHILD_SCRIPT = child.__file__
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_GROUP = "megatron-r1-sandbox"  # our runs' cgroups live in this child of the trainer's own

# Every run ends in exactly one of these.
OUTCOMES = (
    "passed",  # the tests ran to completion (nonce seen, exit 0)
    "failed",  # the program or its tests raised (wrong answer, exception, syntax error)
    "timeout",  # wall-clock deadline or CPU limit
    "memory",  # MemoryError or killed by the memory cgroup
    "output_limit",  # printed more than Limits.max_output_bytes
    "early_exit",  # exited before the tests finished (exit(), os._exit())
    "crashed",  # killed by a signal or some other exit status
    "sandbox_error",  # the confinement failed: the machine's problem, not the program's
    "error",  # the parent failed to run it at all (e.g. could not start a process)
    "no_program",  # no code found in the response (set by the caller; nothing was run)
)


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0  # wall clock of the whole run, interpreter start included; also the CPU limit
    memory_mb: int = 1024  # address space of each process, and memory of the whole tree (cgroup)
    max_processes: int = 32  # tasks in the tree (pids cgroup)
    max_output_bytes: int = 1 << 20  # stdout+stderr kept; more kills the run
    file_mb: int = 16  # largest file the program may write
    disk_mb: int = 64  # size of the /work tmpfs (namespaced runs)


@dataclass(frozen=True)
class Job:
    program: str  # model-written source
    test: str  # defines check(candidate)
    entry_point: str  # name of the function check() is given


@dataclass
class RunResult:
    outcome: str  # one of OUTCOMES
    returncode: int | None  # of the child (negative: killed by that signal); None if never run
    output: str  # the first Limits.max_output_bytes of stdout+stderr
    seconds: float  # wall clock in the parent

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


@dataclass(frozen=True)
class Isolation:
    namespaces: bool  # layers 1-3 active
    cgroups: bool  # layer 4 active
    detail: str  # why not, when not


_probe_lock = threading.Lock()


@functools.cache
def _isolation() -> Isolation:
    cgroups, why_not_cg = _cgroups_writable()
    unshare = shutil.which("unshare")
    why_not_ns = ""
    if os.geteuid() != 0:
        why_not_ns = "not root (mounts, chroot and the switch to nobody need it)"
    elif unshare is None:
        why_not_ns = "no unshare binary (util-linux)"
    else:
        probe = _run(Job("def f():\n    return 1\n", "def check(c):\n    assert c() == 1\n", "f"), Limits(timeout_s=20), True, cgroups)
        if not probe.passed:
            why_not_ns = f"probe run ended {probe.outcome}: {probe.output.strip()[-300:]}"
    detail = "; ".join(f"{what}: {why}" for what, why in (("namespaces", why_not_ns), ("cgroups", why_not_cg)) if why)
    found = Isolation(namespaces=not why_not_ns, cgroups=cgroups, detail=detail)
    if detail:
        logger.warning("code sandbox without %s; only in-process guards replace what is missing", detail)
    else:
        logger.info("code sandbox: namespaces (net, mount, pid), chroot as nobody, pids+memory cgroups, rlimits")
    return found


def isolation() -> Isolation:
    """The isolation layers this machine allows, probed on first use (one sandboxed run) and cached."""
    with _probe_lock:
        return _isolation()


def run_job(job: Job, limits: Limits = Limits()) -> RunResult:
    """Run `job` in a fresh sandbox. Never raises: a failure of the parent itself is outcome "error"."""
    start = time.monotonic()
    try:
        iso = isolation()
        return _run(job, limits, iso.namespaces, iso.cgroups)
    except Exception as e:  # noqa: BLE001 - nothing a program does may reach the trainer
        logger.warning("sandbox run failed in the parent (%s: %s); scoring 0", type(e).__name__, e)
        return RunResult("error", None, "", time.monotonic() - start)


def _run(job: Job, limits: Limits, namespaces: bool, cgroups: bool) -> RunResult:
    start = time.monotonic()
    nonce = secrets.token_hex(16)
    base = Path(tempfile.mkdtemp(prefix="megatron-r1-sandbox-"))
    cgroup = None
    try:
        if cgroups:
            cgroup = _Cgroup(base.name, limits)
        workdir = base / ("root" if namespaces else "work")
        workdir.mkdir()
        home = "/work" if namespaces else str(workdir)
        confine = {
            "cgroups": cgroup.dirs if cgroup else [],
            "root": str(workdir) if namespaces else "",
            "python_prefix": os.path.realpath(sys.base_prefix),
            "memory_mb": limits.memory_mb,
            "cpu_s": limits.timeout_s,
            "file_mb": limits.file_mb,
            "disk_mb": limits.disk_mb,
        }
        payload = json.dumps({**asdict(job), "nonce": nonce, "confine": confine}).encode() + b"\n"
        python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        wrap = [shutil.which("unshare") or "unshare", "--net", "--mount", "--pid", "--kill-child"] if namespaces else []
        proc = subprocess.Popen(
            [*wrap, python, "-I", "-S", CHILD_SCRIPT],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=str(workdir), env={"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"},
            start_new_session=True,  # its own process group, killed as a whole below
        )
        try:
            try:
                proc.stdin.write(payload)
                proc.stdin.close()
            except BrokenPipeError:
                pass  # it died before reading: the exit status tells why
            output, ended = _collect(proc, start + limits.timeout_s, limits.max_output_bytes)
        finally:
            _kill(proc, cgroup)
        outcome = _classify(ended, proc.returncode, output, nonce, cgroup)
        if outcome == "sandbox_error":
            logger.warning("code sandbox failed to confine a run: %s", output.strip()[-300:])
        return RunResult(outcome, proc.returncode, output, time.monotonic() - start)
    finally:
        if cgroup is not None:
            cgroup.remove()
        shutil.rmtree(base, ignore_errors=True)


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[str, str]:
    """Read the child's output until it ends ("eof"), the deadline passes ("timeout") or it exceeds
    `cap` bytes ("output_limit"). Reading as it comes keeps a chatty program from blocking on a
    full pipe; poll (not select) works for any fd number in a trainer with thousands open."""
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    chunks, size, ended = [], 0, "eof"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            ended = "timeout"
            break
        if poller.poll(int(min(remaining, 0.05) * 1000) + 1):
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not data:
                break  # every writer is gone
            chunks.append(data)
            size += len(data)
            if size > cap:
                ended = "output_limit"
                break
        elif _exited(proc):
            break  # (no namespaces) a left-behind child may hold the pipe open: do not wait for it
    return b"".join(chunks)[:cap].decode("utf-8", errors="replace"), ended


def _exited(proc: subprocess.Popen) -> bool:
    # WNOWAIT: the zombie keeps its pid, so the process group id cannot be reused before _kill.
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill(proc: subprocess.Popen, cgroup: _Cgroup | None) -> None:
    """Kill the whole tree, then reap the child. First everything in the cgroup (the namespace's
    PID 1 among them: `unshare` then reaps it, and the kernel takes every process in the namespace
    with it), then the process group (``--kill-child`` takes PID 1 down with `unshare`)."""
    if cgroup is not None:
        cgroup.kill_all()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    proc.stdout.close()


def _classify(ended: str, returncode: int | None, output: str, nonce: str, cgroup: _Cgroup | None) -> str:
    if ended != "eof":
        return ended  # timeout | output_limit
    if returncode == 0 and f"\n{nonce}\n" in output:
        return "passed"
    if returncode == child.EXIT_MEMORY or (returncode == -signal.SIGKILL and cgroup is not None and cgroup.oom_killed()):
        return "memory"
    if returncode == -signal.SIGXCPU:
        return "timeout"  # the CPU limit (PID 1 of a namespace ignores SIGXCPU; the hard limit's SIGKILL is "crashed")
    return {
        child.EXIT_FAILED: "failed",
        child.EXIT_SETUP: "sandbox_error",
        child.EXIT_EXIT: "early_exit",
        0: "early_exit",
    }.get(returncode, "crashed")


class _Cgroup:
    """One run's pids and memory cgroups (v1), children of the trainer's own cgroups, so the
    trainer's limits still bound them."""

    def __init__(self, name: str, limits: Limits):
        self.dirs: list[str] = []
        try:
            for controller, settings in (
                ("pids", {"pids.max": limits.max_processes}),
                ("memory", {"memory.limit_in_bytes": limits.memory_mb << 20}),
            ):
                path = _own_cgroup(controller) / CGROUP_GROUP / name
                path.mkdir(parents=True)
                self.dirs.append(str(path))
                for key, value in settings.items():
                    (path / key).write_text(str(value))
                if controller == "memory" and (path / "memory.memsw.limit_in_bytes").exists():
                    # The same cap on memory + swap: otherwise the tree swaps past its limit instead of failing.
                    (path / "memory.memsw.limit_in_bytes").write_text(str(limits.memory_mb << 20))
        except BaseException:
            self.remove()
            raise

    def _memory_file(self, name: str) -> str:
        return next((Path(d, name).read_text() for d in self.dirs if "/memory/" in d), "")

    def oom_killed(self) -> bool:
        for line in self._memory_file("memory.oom_control").splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1]) > 0
        return False

    def kill_all(self) -> None:
        # A fork in flight can add a task after we read the list: repeat until it stays empty.
        for _ in range(200):
            pids = {int(p) for d in self.dirs for p in Path(d, "cgroup.procs").read_text().split()}
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)
        logger.warning("sandbox cgroup %s still has tasks after killing them for 1 s", self.dirs)

    def remove(self) -> None:
        for d in self.dirs:
            for _ in range(100):  # a killed task leaves its cgroup a moment after it is reaped
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
            else:
                logger.warning("could not remove sandbox cgroup %s", d)


def _own_cgroup(controller: str) -> Path:
    """This process's cgroup for `controller` (v1), from /proc/self/cgroup."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return CGROUP_ROOT / controller / path.lstrip("/")
    raise FileNotFoundError(f"no cgroup v1 {controller} controller in /proc/self/cgroup")


def _cgroups_writable() -> tuple[bool, str]:
    try:
        _Cgroup(f"probe-{os.getpid()}", Limits()).remove()
        return True, ""
    except Exception as e:  # noqa: BLE001 - any failure means: no cgroups
        return False, f"{type(e).__name__}: {e}"
