"""The `kiln` command's rough edges a new user hit (issue 10): optional
packages, artifacts without a tokenizer, closed pipes, the runtime-only CLI of
a bundle, bad paths reported before TVM loads, eval windows, help and version."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time

import pytest
from helpers import subprocess_env

import kiln
from kiln.cli import main
from kiln.tvm_compat import tvm_version

COMPILER_CMDS = {"compile", "bundle", "demo"}
RUNTIME_CMDS = {"run", "eval", "inspect", "bench", "serve"}


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def child(code: str, *args, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          timeout=timeout, **kw)


def child_main(*args) -> tuple[subprocess.CompletedProcess, float]:
    """main(args) in a fresh process that then prints whether TVM was imported; also the wall time."""
    argv = [str(a) for a in args]
    t0 = time.perf_counter()
    proc = child(f"import sys; from kiln.cli import main; rc = main({argv!r}); print('tvm' in sys.modules); sys.exit(rc)")
    return proc, time.perf_counter() - t0


def subcommands(help_text: str) -> set[str]:
    """The subcommands argparse lists in the usage line: {compile,run,...}."""
    return set(re.search(r"\{([a-z,]+)\}", help_text).group(1).split(","))


# --- 1: ml_dtypes only for bfloat16 -----------------------------------------------------


def test_runtime_without_ml_dtypes(compiled):
    code = f"""
import sys
sys.modules["ml_dtypes"] = None  # as if not installed: `import ml_dtypes` raises ImportError
from kiln.cli import main
rc = main(["run", {str(compiled("llama"))!r}, "--tokens", "1,2,3", "--max-new-tokens", "3", "--ignore-eos", "--json"])
from kiln.errors import KilnError
from kiln.runtime.dtypes import itemsize, numpy_dtype
assert itemsize("bfloat16") == 2  # sizes need no ml_dtypes
try:
    numpy_dtype("bfloat16")
except KilnError as err:
    print("error:", err)
sys.exit(rc)
"""
    proc = child(code)
    assert proc.returncode == 0, proc.stderr
    result, error = proc.stdout.strip().splitlines()
    assert len(json.loads(result)["tokens"]) == 3
    assert error == "error: bfloat16 tensors need the Python package ml_dtypes (pip install ml_dtypes)"


# --- 4: no tokenizer: print the token ids -------------------------------------------------


def test_run_without_tokenizer_prints_token_ids(compiled, capsys):
    args = ["run", str(compiled("llama")), "--tokens", "1,2,3", "--max-new-tokens", "5", "--ignore-eos"]
    assert main(args + ["--json"]) == 0
    want = json.loads(capsys.readouterr().out)["tokens"]
    assert len(want) == 5
    assert main(args) == 0
    assert capsys.readouterr().out == ",".join(map(str, want)) + "\n"


# --- 6: a closed pipe ends quietly ----------------------------------------------------------


@pytest.mark.parametrize("args", [[], ["--json"]])
def test_closed_pipe_is_quiet(compiled, args):
    args = ["inspect", str(compiled("llama")), *args]
    read, write = os.pipe()
    os.close(read)  # the reader is gone before kiln writes a byte (`kiln inspect X | head -0`)
    try:
        proc = subprocess.run([sys.executable, "-m", "kiln.cli", *args], stdout=write, stderr=subprocess.PIPE, text=True,
                              env=subprocess_env(), timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", (proc.returncode, proc.stderr)


# --- 7: the bundle's CLI offers only what it can do ----------------------------------------


def test_bundle_cli_lists_only_runtime_commands(tmp_path):
    from kiln.compiler.bundle import copy_kiln_runtime  # noqa: PLC0415

    site = tmp_path / "site"
    copy_kiln_runtime(site)

    def bundled(*args):  # -S: no site-packages, so no editable kiln install to fall back on (as on the target)
        return child(f"import sys; sys.path.insert(0, {str(site)!r}); from kiln.cli import main; sys.exit(main({list(args)!r}))",
                     "-S", cwd=tmp_path)

    proc = bundled("--help")
    assert proc.returncode == 0, proc.stderr
    assert subcommands(proc.stdout) == RUNTIME_CMDS
    proc = bundled("compile", "model", "-o", "m.kiln")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("usage: kiln") and "invalid choice: 'compile'" in proc.stderr


def test_bundle_runs_with_only_numpy(compiled, tmp_path, monkeypatch):
    """A whole bundle on a Python that has numpy and nothing else (-S: no
    site-packages): TVM runtime-only, apache-tvm-ffi and the pure-Python modules
    they import all come from the bundle (the wheel download is replaced by this
    machine's own apache-tvm-ffi, the same Python)."""
    import importlib.util  # noqa: PLC0415
    import shutil  # noqa: PLC0415

    from kiln.compiler import bundle  # noqa: PLC0415

    def local_tvm_ffi(dst, python):
        src = os.path.dirname(importlib.util.find_spec("tvm_ffi").origin)
        shutil.copytree(src, dst / "tvm_ffi", ignore=shutil.ignore_patterns("__pycache__"))

    monkeypatch.setattr(bundle, "_fetch_tvm_ffi", local_tvm_ffi)
    out = tmp_path / "b"
    bundle.make_bundle(compiled("llama"), out, python=f"{sys.version_info.major}.{sys.version_info.minor}")
    only_numpy = tmp_path / "only_numpy"
    only_numpy.mkdir()
    np_dir = os.path.dirname(importlib.util.find_spec("numpy").origin)
    for name in os.listdir(os.path.dirname(np_dir)):
        if name == "numpy" or name.startswith("numpy.") or name.startswith("numpy-"):
            os.symlink(os.path.join(os.path.dirname(np_dir), name), only_numpy / name)
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(only_numpy)
    proc = subprocess.run([sys.executable, "-S", str(out / "kiln"), "run", str(out / "model.kiln"), "--tokens", "1,2,3",
                           "--max-new-tokens", "4", "--ignore-eos", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["tokens"]) == 4
    # `kiln serve` from the bundle: its HTTP stack came with it
    import re  # noqa: PLC0415
    import signal  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    srv = subprocess.Popen([sys.executable, "-S", str(out / "kiln"), "serve", str(out / "model.kiln"), "--port", "0", "--model-name", "m"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = srv.stdout.readline()
        url = re.search(r"http://[\d.]+:\d+", line)
        assert url, (line, srv.stderr.read() if srv.poll() is not None else "")
        body = json.dumps({"model": "m", "prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True}).encode()
        for _ in range(200):
            try:
                with urllib.request.urlopen(urllib.request.Request(url.group(0) + "/v1/completions", data=body,
                                                                   headers={"Content-Type": "application/json"}), timeout=30) as r:
                    assert json.loads(r.read())["usage"]["completion_tokens"] == 4
                break
            except OSError:  # not accepting yet
                time.sleep(0.05)
        srv.send_signal(signal.SIGTERM)
        assert srv.wait(timeout=60) == 0, srv.stderr.read()
    finally:
        if srv.poll() is None:
            srv.kill()


# --- 8: bad paths fail before TVM is imported ------------------------------------------------


def test_compile_missing_model_fails_before_tvm(tmp_path):
    proc, secs = child_main("compile", "/nonexistent/model", "-o", tmp_path / "x.kiln")
    assert_one_line_error(proc, "/nonexistent/model", "no such file")
    assert proc.stdout.strip() == "False" and secs < 2, (proc.stdout, secs)


@pytest.mark.parametrize("case,fragment", [("locked", "another kiln compile"), ("not_artifact", "not a kiln artifact"),
                                           ("no_parent", "does not exist")])
def test_compile_bad_output_fails_before_tvm(tmp_path, case, fragment):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "out.kiln"
    lock = None
    if case == "locked":  # as a running compile holds it
        lock = os.open(tmp_path / ".out.kiln.lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(lock, fcntl.LOCK_EX)
    elif case == "not_artifact":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out = tmp_path / "missing" / "out.kiln"
    try:
        proc, secs = child_main("compile", model, "-o", out)
    finally:
        if lock is not None:
            os.close(lock)
    assert_one_line_error(proc, fragment)
    assert proc.stdout.strip() == "False" and secs < 2, (proc.stdout, secs)
    if case == "not_artifact":
        assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args", [["run", "MISSING", "--tokens", "1,2"], ["eval", "MISSING", "--tokens", "1,2"],
                                  ["inspect", "MISSING"], ["bench", "MISSING"],
                                  ["eval", "ART", "--tokens", "1,2", "--ref", "MISSING"]])
def test_missing_artifact_fails_before_tvm(compiled, tmp_path, args):
    missing = tmp_path / "nope.kiln"
    args = [missing if a == "MISSING" else compiled("llama") if a == "ART" else a for a in args]
    proc, _ = child_main(*args)
    assert_one_line_error(proc, str(missing))
    assert proc.stdout.strip() == "False"


# --- 9: eval --ref windows fit the context ----------------------------------------------------


def test_eval_ref_window_fits_the_context(compiled, capsys):
    art = str(compiled("llama"))  # max_position_embeddings 256, under the default window of 512
    ids = ",".join(str((i * 37 + 5) % 211) for i in range(300))
    assert main(["eval", art, "--tokens", ids, "--ref", art, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["window"] == 256 and r["tokens"] == 300
    assert r["mean_kld"] < 1e-6 and r["top1_agreement"] == 1.0
    assert main(["eval", art, "--tokens", ids, "--ref", art, "--window", "300"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kiln: error: --window 300") and "256" in err, err


# --- 11: help and version ------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert re.fullmatch(rf"kiln {re.escape(kiln.__version__)} \(TVM \S+\)\n", out), out


def test_version_does_not_import_tvm():
    proc = child("import sys\nfrom kiln.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    print('tvm' in sys.modules)")
    assert proc.stdout.splitlines() == [f"kiln {kiln.__version__} (TVM {tvm_version()})", "False"], proc.stderr


def test_bare_kiln_prints_help(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: kiln") and "required" not in err
    assert COMPILER_CMDS | RUNTIME_CMDS <= subcommands(err)
    for cmd in COMPILER_CMDS | RUNTIME_CMDS:  # each listed with its one-line help
        assert re.search(rf"^\s+{cmd}\s+\S", err, re.M), cmd


def test_help_texts(capsys):
    def help_of(*cmd):
        with pytest.raises(SystemExit):
            main([*cmd, "--help"])
        return " ".join(capsys.readouterr().out.split())  # argparse wraps lines

    c = help_of("compile")
    assert "q8, q4g32, q4k, q4g128, fp8 (passes/quant/formats/), or gguf" in c
    assert "--quiet no progress lines" in c
    d = help_of("demo")
    assert "KILN_CACHE" in d and "~/.cache/kiln" in d
    assert COMPILER_CMDS | RUNTIME_CMDS <= subcommands(help_of())


# --- 5 and 11: a quiet compile says only what the user can act on ---------------------------


@pytest.mark.slow  # a `kiln compile` process
def test_quiet_compile_prints_only_the_missing_tokenizer_warning(tiny_checkpoint, tmp_path):
    """No TVM chatter ("Warning: Fast mode segfaults ...", once per take op before);
    the one thing that matters about this checkpoint: it has no tokenizer."""
    proc = subprocess.run([sys.executable, "-m", "kiln.cli", "compile", str(tiny_checkpoint("llama")), "-o", str(tmp_path / "q.kiln"),
                           "--dtype", "float32", "--quiet"], capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: warning: ") and "no tokenizer" in lines[0] and "--tokens" in lines[0], proc.stderr
    assert proc.stdout.startswith("compiled ")


# --- 10: progress -----------------------------------------------------------------------------


@pytest.mark.slow
def test_progress_bars_only_on_a_terminal(tiny_checkpoint, tmp_path):
    import io  # noqa: PLC0415

    from kiln.compiler.build import compile_model  # noqa: PLC0415
    from kiln.compiler.progress import Progress  # noqa: PLC0415

    piped = io.StringIO()
    p = Progress(stream=piped)  # a pipe: not a TTY, so phase lines only
    assert not p.live
    p("phase")
    p.count("weights", 1, 2)
    with p.waiting("codegen"):
        time.sleep(0.6)
    assert piped.getvalue().count("\n") == 1 and "\r" not in piped.getvalue()

    tty = io.StringIO()
    compile_model(tiny_checkpoint("llama"), tmp_path / "p.kiln", target="llvm", dtype="float32", progress=Progress(stream=tty, live=True))
    out = tty.getvalue()
    assert "\r  weights [" in out and f"] {len(json.loads((tmp_path / 'p.kiln' / 'manifest.json').read_text())['params'])}/" in out
    assert re.search(r"\r  codegen \(llvm \S+\) [|/\\-] +\d+s", out), out[-500:]
    assert "] write artifact\n" in out and not out.endswith("\x1b[K")  # live lines cleared before the next phase line
