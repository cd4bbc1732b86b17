"""What runs inside the sandbox: confine this process, then run one program against its tests.

Started by `sandbox.py` as ``python -I -S sandbox_child.py`` (no site, no environment, no script
directory on the path), so it imports only a few standard-library modules: it starts once per
program and every millisecond of start-up is paid a thousand times per training step.

Protocol: one JSON line on stdin (the job: program, test, entry point, nonce, confinement), then
stdin is /dev/null. The program's stdout and stderr go to the parent. The nonce is written only
after ``check(candidate)`` returned; any other end exits with a code from the table below.
"""

import json
import os
import resource
import sys

# Exit codes the parent classifies by (unusual values, so a program's own exit(1) is not mistaken).
EXIT_FAILED = 81  # the program or its tests raised
EXIT_SETUP = 82  # the confinement itself failed: a sandbox problem, not the program's
EXIT_MEMORY = 83  # MemoryError (RLIMIT_AS)
EXIT_EXIT = 84  # SystemExit before the tests finished

SANDBOX_UID = 65534  # nobody

# mount(2) flags (linux/fs.h); Python 3.11 has no os.mount.
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
PR_SET_NO_NEW_PRIVS = 38

# Taken before the program runs: it could replace the builtins or os functions afterwards.
_exec, _compile, _write, _exit = exec, compile, os.write, os._exit


def main() -> None:
    job = json.loads(sys.stdin.buffer.readline())
    try:
        confine(job["confine"])
    except Exception as e:  # noqa: BLE001 - anything here is the sandbox's fault, reported as such
        _die(EXIT_SETUP, f"sandbox setup failed: {type(e).__name__}: {e}")
    try:
        # Both compiled before either runs: a program that redefines compile() cannot swap the tests out.
        program = _compile(job["program"], "<program>", "exec")
        test = _compile(job["test"], "<test>", "exec")
    except BaseException as e:  # noqa: BLE001 - SyntaxError, null bytes, too deeply nested: the program failed
        _die(EXIT_FAILED, _describe(e))
    run(program, test, job["entry_point"], job["nonce"])


def confine(c: dict) -> None:
    for cgroup in c["cgroups"]:  # "0" is this process, whatever its pid in a PID namespace
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write("0")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # nothing more to read (and no input() waiting forever)
    os.close(null)
    if c["root"]:
        enter_root(c["root"], c["python_prefix"], c["disk_mb"])
        drop_privileges()
    else:
        guard_in_process()
    memory = c["memory_mb"] << 20
    cpu = max(1, int(c["cpu_s"] + 0.999))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # As PID 1 of a namespace the soft limit's SIGXCPU is ignored; the hard limit's SIGKILL is not.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (c["file_mb"] << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def enter_root(root: str, python_prefix: str, disk_mb: int) -> None:
    """Make `root` a read-only tmpfs holding only /usr (with the /bin, /lib symlinks), the Python
    installation, four /dev nodes and a writable /work (also /tmp), then chroot into it.

    Runs as root inside fresh mount, PID and network namespaces (propagation private, so none of
    these mounts is visible outside). Everything else of the host (/etc, /root, /home, the
    repository, the host's /tmp) is simply absent.
    """
    import ctypes  # only here: the fallback path does not pay for it

    libc = ctypes.CDLL(None, use_errno=True)

    def mount(source, target, fstype, flags, data=None):
        args = [s.encode() if s else None for s in (source, target, fstype)]
        if libc.mount(args[0], args[1], args[2], flags, data.encode() if data else None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {target}: {os.strerror(err)}")

    def bind(path, device=False):
        target = root + path
        mount(path, target, None, MS_BIND | MS_REC)
        # A bind mount takes its own flags only on a remount; device nodes need dev.
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | (0 if device else MS_NODEV))

    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for name in ("usr", "bin", "lib", "lib32", "lib64", "sbin"):
        host = "/" + name
        if os.path.islink(host):  # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(host), root + host)
        elif os.path.isdir(host):
            os.mkdir(root + host)
            bind(host)
    if not python_prefix.startswith("/usr/"):
        # At its own path (sys.path stays valid); the directories above it are ours, mode 755, so
        # the interpreter is readable by nobody even where the host keeps it under /root (700).
        os.makedirs(root + python_prefix, mode=0o755)
        bind(python_prefix)
    os.mkdir(root + "/dev")
    for name in ("null", "zero", "random", "urandom"):
        open(root + "/dev/" + name, "w").close()
        bind("/dev/" + name, device=True)
    os.mkdir(root + "/work")
    mount("tmpfs", root + "/work", "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_mb}m,mode=700,uid={SANDBOX_UID},gid={SANDBOX_UID}")
    os.symlink("work", root + "/tmp")
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    os.chroot(root)
    os.chdir("/work")


def drop_privileges() -> None:
    """Become nobody for good: with every uid non-zero the kernel clears all capabilities, so the
    program can neither undo the mounts, leave the chroot, nor signal root's processes;
    no_new_privs keeps it from gaining any back through a setuid binary."""
    import ctypes

    os.setgroups([])
    os.setresgid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
    os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def guard_in_process() -> None:
    """Without namespaces: refuse sockets and signals from inside Python. This stops accidents
    (a test that downloads, a stray kill), not a program set on getting around it."""
    import _socket
    import socket

    def refused(*args, **kwargs):
        raise PermissionError("the sandbox allows no network and no signals to other processes")

    for module, name in ((socket, "socket"), (socket, "create_connection"), (socket, "socketpair"),
                         (_socket, "socket"), (os, "kill"), (os, "killpg")):
        setattr(module, name, refused)


def run(program, test, entry_point: str, nonce: str) -> None:
    scope = {"__name__": "__sandbox__"}  # not __main__: a demo block under `if __name__ == ...` stays off
    try:
        _exec(program, scope)
        _exec(test, scope)
        scope["check"](scope[entry_point])
    except MemoryError:
        _die(EXIT_MEMORY, "MemoryError")
    except SystemExit:
        _die(EXIT_EXIT, "SystemExit before the tests finished")
    except BaseException as e:  # noqa: BLE001 - whatever the program raised, it failed
        _die(EXIT_FAILED, _describe(e))
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001 - a program may have broken sys.stdout; the nonce does not need it
        pass
    _write(1, f"\n{nonce}\n".encode())
    _exit(0)


def _describe(e: BaseException) -> str:
    try:
        return f"{type(e).__name__}: {e}"[:2000]
    except BaseException:  # noqa: BLE001 - a hostile __str__
        return "exception"


def _die(code: int, message: str) -> None:
    try:
        sys.stdout.flush()
        _write(2, f"\n{message}\n".encode(errors="replace"))
    except BaseException:  # noqa: BLE001 - the exit code says it all
        pass
    _exit(code)


if __name__ == "__main__":
    main()
