"""Run model-written code in a subprocess that cannot reach the network, write outside its own
temporary directory, or run away with time or memory; and the unbiased pass@k estimator.

Layers of protection, all set up inside the child before the untrusted code runs:

1. a fresh temporary directory as working directory, ``HOME`` and ``TMPDIR``; ``python -I`` (no user
   site, no ``PYTHON*`` variables); no bytecode writes;
2. resource limits: address space (``memory_mb``), CPU seconds, largest file written, no core dumps;
   the parent also enforces a wall-clock ``timeout_s`` and kills the whole process group;
3. a private, empty network namespace where the kernel allows it (``unshare(CLONE_NEWNET)``, with a
   user namespace when not root): no interface but a down loopback, so nothing is reachable;
4. a Python audit hook (PEP 578) that cannot be removed: it refuses sockets, subprocesses, ``fork``,
   ``ctypes`` and any file opened for writing (or removed, renamed, chmod-ed) outside the temp dir.

This stops accidents and the usual hostile snippets; it is not a security boundary against code that
escapes the interpreter (run untrusted code at scale inside a container or VM as well).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

BLOCKED_MARK = "LMSTACK_SANDBOX_BLOCKED"

# The child's first code. {limits} is filled in by run_code; the untrusted program is read from main.py.
BOOTSTRAP = r'''
import os, sys, resource
sys.dont_write_bytecode = True
MEM, CPU, FSIZE = {mem}, {cpu}, {fsize}
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_CPU, (CPU, CPU + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE, FSIZE))
isolated = "none"
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    flags = 0x40000000 | (0 if os.geteuid() == 0 else 0x10000000)   # CLONE_NEWNET (| CLONE_NEWUSER)
    if libc.unshare(flags) == 0:
        isolated = "netns"
except Exception:
    pass
resource.setrlimit(resource.RLIMIT_AS, (MEM, MEM))
with open(".isolation", "w") as f:
    f.write(isolated)
ROOT = os.path.realpath(os.getcwd())
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
BLOCK_ALWAYS = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                "os.forkpty", "pty.", "ctypes.", "os.kill", "os.killpg", "signal.pthread_kill", "os.setuid")
PATH_EVENTS = {{"os.remove": 0, "os.rename": 1, "os.rmdir": 0, "os.mkdir": 0, "os.chmod": 0, "os.chown": 0,
               "os.symlink": 1, "os.link": 1, "os.truncate": 0, "os.utime": 0, "shutil.rmtree": 0,
               "shutil.move": 1, "shutil.copyfile": 1}}

def _outside(path):
    if isinstance(path, int):
        return False
    try:
        p = os.path.realpath(os.fsdecode(path))
    except Exception:
        return True
    return not (p == ROOT or p.startswith(ROOT + os.sep) or p == "/dev/null")

def _deny(event, args):
    raise PermissionError(f"{{BLOCKED_MARK}}: {{event}} {{args!r:.120}}")

def _hook(event, args):
    if event.startswith(BLOCK_ALWAYS):
        if event == "socket.gethostname":
            return
        _deny(event, args)
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & WRITE_FLAGS)
        if writing and _outside(path):
            _deny(event, args)
    elif event in PATH_EVENTS:
        if any(_outside(a) for a in args[:PATH_EVENTS[event] + 1] if isinstance(a, (str, bytes, os.PathLike))):
            _deny(event, args)

BLOCKED_MARK = "{mark}"
sys.addaudithook(_hook)
del libc
code = open("main.py", encoding="utf-8").read()
sys.argv = ["main.py"]
exec(compile(code, "main.py", "exec"), {{"__name__": "__main__", "__builtins__": __builtins__}})
'''


@dataclass
class SandboxResult:
    status: str            # passed | failed | timeout | memory | blocked
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    network_namespace: bool = False   # the kernel gave the child its own empty network namespace

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_code(code: str, timeout_s: float = 5.0, memory_mb: int = 512, max_output: int = 20_000,
             max_file_mb: int = 16) -> SandboxResult:
    """Run ``code`` (a Python program) in the sandbox; ``passed`` means it exited with status 0."""
    with tempfile.TemporaryDirectory(prefix="lmstack-sandbox-") as tmp:
        with open(os.path.join(tmp, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        boot = BOOTSTRAP.format(mem=memory_mb * 2 ** 20, cpu=max(1, math.ceil(timeout_s)),
                                fsize=max_file_mb * 2 ** 20, mark=BLOCKED_MARK)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-I", "-c", boot], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            timed_out = True
        seconds = time.perf_counter() - start
        try:
            with open(os.path.join(tmp, ".isolation"), encoding="utf-8") as f:
                netns = f.read() == "netns"
        except OSError:
            netns = False
    stdout = out.decode("utf-8", "replace")[-max_output:]
    stderr = err.decode("utf-8", "replace")[-max_output:]
    rc = proc.returncode
    if timed_out or rc == -signal.SIGXCPU or rc == -signal.SIGKILL:
        status = "timeout"
    elif "MemoryError" in stderr or rc == -signal.SIGSEGV:
        status = "memory"
    elif BLOCKED_MARK in stderr:
        status = "blocked"
    else:
        status = "passed" if rc == 0 else "failed"
    return SandboxResult(status, rc, stdout, stderr, seconds, netns)


def run_many(programs: Sequence[str], workers: int = 2, **limits) -> list[SandboxResult]:
    """Run programs concurrently (each in its own sandbox), results in input order."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda code: run_code(code, **limits), programs))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
