"""`python run.py ...` (or `python -m gcode_exp.x ...`) for the suite: a child process that starts with the
imports done.

A real interpreter spends about 3 s importing torch, its compiler front end (which every torch optimizer pulls
in) and pandas before run.py reads its first argument; the suite starts a few hundred of them. Here a server
process (multiprocessing's forkserver) imports those once per pytest worker, having run no torch operation (so
no thread pool is copied), and forks a child per command. The child is a process of its own, as a user's is:
its own working folder, environment, argv, exit code, signals and stdout/stderr (captured to files); it runs
run.py or the module as `__main__`, then the interpreter's exit handlers (logging's flush) before it exits.

What a fork cannot reproduce goes to a real interpreter: a command that is not `python <script>` or
`python -m <module>`, an environment that changes what happens at start-up (PYTHONPATH: the fault
injection of tests/faults/sitecustomize.py), and a sweep on another Hydra launcher (joblib's and submitit's
worker processes: with wandb, a forked joblib sweep waited forever). The commands the README and docs show
always run in a real interpreter (tests/test_docs_commands.py).
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PRELOAD = ["torch", "torch._dynamo", "numpy", "pandas", "hydra", "omegaconf", "gcode_exp.cli", "gcode_exp.tasks",
           "gcode_exp.predict", "gcode_exp.summarize", "gcode_exp.plots"]
AT_START = ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PYTHONSAFEPATH")  # read by the interpreter as it starts
_context = None


def run(cmd: list[str], cwd: Path | str, env: dict[str, str] | None = None, timeout: float = 300
        ) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)`, forked where it
    can be (module docstring)."""
    env = dict(os.environ if env is None else env)
    if not forkable(cmd, env):
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="gcode-exp-fork-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        child = server().Process(target=_child, args=(list(cmd), str(cwd), env, str(out), str(err)))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(cmd, timeout, *(f.read_text(errors="replace") for f in (out, err)))
        return subprocess.CompletedProcess(cmd, child.exitcode, *(f.read_text(errors="replace") for f in (out, err)))


def forkable(cmd: list[str], env: dict[str, str]) -> bool:
    if len(cmd) < 2 or cmd[0] != sys.executable or any(env.get(k) != os.environ.get(k) for k in AT_START):
        return False
    if any(a.startswith(("hydra/launcher=", "hydra.launcher=")) for a in cmd):
        return False
    return cmd[1] == "-m" and len(cmd) > 2 or cmd[1].endswith(".py")


def server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(cmd: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """In the forked process: stdio to the files, the folder, environment and argv of the command, its main."""
    import atexit
    import runpy
    import traceback

    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - the process's own stdin, for its whole life
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # TMPDIR read again
    code = 0
    try:
        if cmd[1] == "-m":
            sys.argv = [cmd[2], *cmd[3:]]
            sys.path[0] = cwd
            runpy.run_module(cmd[2], run_name="__main__", alter_sys=True)
        else:
            sys.argv = cmd[1:]
            sys.path[0] = str(Path(cmd[1]).resolve().parent)
            runpy.run_path(cmd[1], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()  # what the interpreter does on its way out (logging.shutdown among them)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
