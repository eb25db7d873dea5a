"""Run profile configurations each in its own Python process (``python -m slimtune profile-child ...``).

One process per configuration keeps peaks clean: nothing another configuration allocated or cached is
left in the allocator. On CUDA the processes run strictly one after another. For small models on the CPU
(``staged``) a few are started together, so that the slow imports and model builds overlap, and wait at
a barrier; their measured step loops then still run one at a time, with the other processes idle.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from ..errors import SlimtuneError
from ..models.presets import get_preset
from .options import ProfileOptions, check_dependencies
from .profile import TrainingSession, model_dependencies, oom_before_steps
from .result import ProfileResult, is_out_of_memory

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the slimtune package
ERROR_TAIL = 1500
STAGE_GROUP = 4  # processes set up together in staged mode
STAGE_MAX_PARAMS = 200_000_000  # staged mode only for models this small

StartCallback = Callable[[int, ProfileOptions], None]
DoneCallback = Callable[[int, ProfileResult], None]


def child_command(options: ProfileOptions, wait: bool = False) -> list[str]:
    """The command line that profiles ``options`` in a new process and prints one JSON line."""
    return [sys.executable, "-m", "slimtune", "profile-child", *options.to_argv(), *(["--wait"] if wait else [])]


def child_env() -> dict[str, str]:
    """This environment with slimtune's root first on ``PYTHONPATH`` (works without installing slimtune)."""
    env = dict(os.environ)
    parts = [str(PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def parse_child_output(options: ProfileOptions, stdout: str, stderr: str, returncode: int | None) -> ProfileResult:
    """The result from a child's stdout (its last JSON line), or an ``error`` result quoting its stderr."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return ProfileResult.from_dict(json.loads(line))
            except (ValueError, TypeError):
                break
    tail = stderr.strip()[-ERROR_TAIL:] or stdout.strip()[-ERROR_TAIL:] or "no output"
    return ProfileResult.for_options(options, status="error",
                                     error=f"profile process exited with status {returncode}: {tail}")


def run_child(options: ProfileOptions, timeout: float | None = None) -> ProfileResult:
    """Profile ``options`` (already resolved) in a new process and wait for it."""
    try:
        proc = subprocess.run(child_command(options), capture_output=True, text=True, timeout=timeout,
                              env=child_env(), cwd=PACKAGE_ROOT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return ProfileResult.for_options(options, status="timeout",
                                         error=f"no result after {timeout:g} s: {stderr.strip()[-ERROR_TAIL:]}")
    return parse_child_output(options, proc.stdout, proc.stderr, proc.returncode)


def _run_staged(options_list: Sequence[ProfileOptions], on_start: StartCallback | None,
                on_done: DoneCallback | None) -> list[ProfileResult]:
    procs: list[tuple[subprocess.Popen, tempfile._TemporaryFileWrapper]] = []
    try:
        for options in options_list:
            err = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
            proc = subprocess.Popen(child_command(options, wait=True), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=err, text=True, env=child_env(),
                                    cwd=PACKAGE_ROOT)
            procs.append((proc, err))
        for proc, _ in procs:  # barrier: every process has imported and built its model (or failed)
            while True:
                line = proc.stdout.readline()
                if not line or line.strip() == "ready":
                    break
        results = []
        for i, (options, (proc, err)) in enumerate(zip(options_list, procs)):
            if on_start is not None:
                on_start(i, options)
            try:
                proc.stdin.write("go\n")
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            stdout = proc.stdout.read()
            proc.wait()
            err.seek(0)
            result = parse_child_output(options, stdout, err.read(), proc.returncode)
            results.append(result)
            if on_done is not None:
                on_done(i, result)
        return results
    finally:
        for proc, err in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err.close()


def _small(options: ProfileOptions) -> bool:
    if options.model_dir is not None:
        return False
    if options.preset.startswith("tiny-"):
        return True
    return get_preset(options.preset).num_parameters() <= STAGE_MAX_PARAMS


def can_stage(options_list: Sequence[ProfileOptions]) -> bool:
    """Staging suits small CPU models only (presets, not directories): the waiting processes keep their
    models in memory."""
    return all(options.device == "cpu" and _small(options) for options in options_list)


def run_children(options_list: Sequence[ProfileOptions], staged: bool | None = None,
                 on_start: StartCallback | None = None, on_done: DoneCallback | None = None,
                 timeout: float | None = None) -> list[ProfileResult]:
    """Profile each configuration in its own process; results in the same order.

    ``staged`` (default: :func:`can_stage`) sets up to ``STAGE_GROUP`` processes up together and runs
    their step loops one at a time; otherwise each process runs alone, with ``timeout`` seconds.
    """
    resolved = [options.resolved() for options in options_list]
    if staged is None:
        staged = can_stage(resolved)
    if staged:
        results: list[ProfileResult] = []
        for start in range(0, len(resolved), STAGE_GROUP):
            group = resolved[start:start + STAGE_GROUP]
            results += _run_staged(
                group, on_start and (lambda i, o, s=start: on_start(s + i, o)),
                on_done and (lambda i, r, s=start: on_done(s + i, r)))
        return results
    results = []
    for i, options in enumerate(resolved):
        if on_start is not None:
            on_start(i, options)
        result = run_child(options, timeout=timeout)
        results.append(result)
        if on_done is not None:
            on_done(i, result)
    return results


def serve_child(options: ProfileOptions, wait: bool = False) -> int:
    """The child's side (``slimtune profile-child``): profile ``options`` in this process and print exactly one JSON
    line with the result on stdout (everything else the run prints goes to stderr).

    Exit status: 0 ok, 1 OOM or failure, 2 bad options, 3 no ``go``. With ``wait`` (staged runs) it prints ``ready``
    after the setup and runs the steps only once a ``go`` line arrives on stdin.
    """
    out = sys.stdout

    def emit(result: ProfileResult) -> None:
        print(json.dumps(result.to_dict()), file=out, flush=True)

    def wait_for_go() -> bool:
        if not wait:
            return True
        print("ready", file=out, flush=True)
        return sys.stdin.readline().strip() == "go"

    with contextlib.redirect_stdout(sys.stderr):
        try:
            options = options.resolved()
            check_dependencies(options.backend, options.quant, model_dependencies(options))
        except SlimtuneError as exc:
            if not wait_for_go():
                return 3
            emit(ProfileResult.for_options(options, status="error", error=str(exc)))
            return 2
        try:
            session: TrainingSession | None = TrainingSession.prepare(options)
            result = None
        except Exception as exc:  # noqa: BLE001
            if not is_out_of_memory(exc):
                raise
            session, result = None, oom_before_steps(options, exc)
        if not wait_for_go():
            return 3
        if session is not None:
            result = session.run()
    emit(result)
    return 0 if result.ok else 1
