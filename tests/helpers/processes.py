"""Compiling from tests: in this process where it can, else in a child process.

The kiln runtime imports TVM runtime-only when it comes first in a process,
after which the TVM compiler cannot load there. conftest.py loads the full TVM
first, so a pytest process normally compiles in-process (one TVM import for the
whole session); where that failed, or in a process that imported the runtime
first, compiling falls back to a child (`run_python`), the one place tests
start a Python child that may compile.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from .models import make_tiny_checkpoint

# compile_model's defaults for test artifacts: this CPU, float32 end to end.
COMPILE_DEFAULTS = {"target": "llvm", "dtype": "float32"}


def subprocess_env() -> dict[str, str]:
    """The environment for a child that may compile: never runtime-only TVM."""
    env = dict(os.environ)
    env.pop("TVM_USE_RUNTIME_LIB", None)  # kiln.tvm_compat.runtime() sets it in this process
    env.setdefault("TVM_NUM_THREADS", "1")
    return env


def run_python(code: str, *, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`python -c code` (dedented) in a child with `subprocess_env()`; raises with its stderr when it fails and `check`."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return proc


def prefer_full_tvm() -> None:
    """Import TVM with its compiler into this process when nothing imported it runtime-only yet.

    kiln.runtime imports TVM runtime-only when it comes first, after which no
    later test in this pytest process could compile in-process; loading the
    full TVM first keeps the runtime tests from breaking other test files.
    """
    from kiln.errors import KilnError  # noqa: PLC0415
    from kiln.tvm_compat import compiler, runtime_only_loaded  # noqa: PLC0415

    if "tvm" in sys.modules or runtime_only_loaded():
        return
    with contextlib.suppress(KilnError):
        compiler()


def can_compile_in_process() -> bool:
    from kiln.tvm_compat import runtime_only_loaded  # noqa: PLC0415

    prefer_full_tvm()
    return "tvm" in sys.modules and not runtime_only_loaded()


def run_compiler_code(code: str) -> str:
    """Run code that needs the TVM compiler; returns what it printed.

    In this process when it has (or can still get) the full TVM, which saves a
    TVM import per call; otherwise in a child process.
    """
    code = textwrap.dedent(code)
    if can_compile_in_process():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(code, "<compiler code>", "exec"), {"__name__": "__kiln_test__"})  # noqa: S102
        return buf.getvalue()
    return run_python(code).stdout


def compile_script(model: Path, out: Path, **options) -> str:
    """Python source that compiles `model` into `out` (COMPILE_DEFAULTS, then `options`)."""
    options = {**COMPILE_DEFAULTS, **options}
    return f"""
        from kiln.compiler.build import compile_model
        compile_model({str(model)!r}, {str(out)!r}, **{options!r})
    """


def compile_artifact(model: Path, out: Path, **options) -> Path:
    """compile_model(model, out, **options) for llvm in float32 unless `options`
    says otherwise; in this process where it can, else in a child. Returns `out`."""
    if can_compile_in_process():
        from kiln.compiler.build import compile_model  # noqa: PLC0415

        compile_model(model, out, **{**COMPILE_DEFAULTS, **options})
    else:
        run_python(compile_script(model, out, **options))
    return out


def compile_artifacts(jobs: list[tuple[Path, Path, dict]]) -> list[Path]:
    """compile_artifact for each (model, out, options), two at a time in child
    processes: a compile is one thread (TVM's LLVM codegen), so on CI's two cores
    a pair takes the time of one. Returns the outs in order."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    if len(jobs) < 2:
        return [compile_artifact(m, o, **opts) for m, o, opts in jobs]
    workers = max(2, min(len(jobs), os.cpu_count() or 2))
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda job: run_python(compile_script(job[0], job[1], **job[2])), jobs))
    return [o for _, o, _ in jobs]


class MemoLogits:
    """A reference for runtime.quality.compare_sessions whose teacher-forced logits
    are computed once per window and reused against every candidate."""

    def __init__(self, session):
        self.session = session
        self._rows: dict[tuple[int, ...], object] = {}

    def logits(self, ids):
        key = tuple(ids)
        if key not in self._rows:
            self._rows[key] = self.session.logits(ids)
        return self._rows[key]


_SHARED: dict[str, Path] = {}


def shared_artifact(tmp_path_factory) -> tuple[Path, Path]:
    """(model dir, artifact dir) of the numpy-written tiny llama (it has a
    tokenizer), compiled once per pytest process. Read-only: copy before changing it."""
    root = tmp_path_factory.getbasetemp() / "kiln_tiny_llama"
    key = str(root)
    if key not in _SHARED:
        if root.exists():
            shutil.rmtree(root)
        model = make_tiny_checkpoint(root / "model", writer="numpy")
        compile_artifact(model, root / "tiny.kiln")
        _SHARED[key] = root
    return _SHARED[key] / "model", _SHARED[key] / "tiny.kiln"


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
