"""`kiln bundle`: a self-contained folder for an offline target machine.

    DIR/model.kiln/      the artifact
    DIR/site/tvm/        TVM's Python package, runtime libraries only (no libtvm_compiler.so)
    DIR/site/tvm_ffi/    apache-tvm-ffi for the target Python (from its wheel)
    DIR/site/kiln/       kiln's runtime modules and the CLI (run, eval, inspect, bench, serve)
    DIR/site/starlette/, uvicorn/, ...   the server's HTTP stack (pure Python), when installed here
    DIR/kiln             launcher: `python3 DIR/kiln run DIR/model.kiln --prompt ...`

The target needs Python and numpy (plus tokenizers/jinja2 for text, ml_dtypes
for bfloat16 weights); no pip, no network. `--platform linux-aarch64` builds the
site from that platform's wheels instead (compiler/wheels.py), numpy, tokenizers,
jinja2 and ml_dtypes included: the target needs Python alone.
DIR/bundle.json says which platform and Python the bundle is for (`kiln emulate`).
"""

from __future__ import annotations

import json
import os
import platform as _platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from ..errors import CompileError

RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_runtime_extra.so", "libtvm_runtime_cuda.so")
KILN_RUNTIME_FILES = ("__init__.py", "errors.py", "tvm_compat.py", "cli.py", "runtime")
LAUNCHER = """#!/usr/bin/env python3
# kiln bundle launcher: runs the kiln CLI from this folder's own site/ only.
import os, sys
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "site"))
os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
from kiln.cli import main
sys.exit(main())
"""


def _copy_tvm(dst: Path) -> None:
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.find_spec("tvm")
    src = Path(next(iter(spec.submodule_search_locations)))
    skip_dirs = {"3rdparty", "include", "__pycache__", "lib64", "web", "cmake", "src", "testing"}

    def ignore(d, names):
        out = {n for n in names if n in skip_dirs or n.endswith(".pyc")}
        if Path(d) == src / "lib":
            out |= {n for n in names if n not in RUNTIME_LIBS}
        return out

    shutil.copytree(src, dst / "tvm", ignore=ignore)


def _fetch_tvm_ffi(dst: Path, python: str) -> None:
    from importlib.metadata import version  # noqa: PLC0415

    ver = version("apache-tvm-ffi")
    tmp = dst.parent / ".wheels"
    tmp.mkdir(exist_ok=True)
    tag = python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", tag,
           "--implementation", "cp", "-d", str(tmp), f"apache-tvm-ffi=={ver}"]
    for plat in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"):
        cmd += ["--platform", plat]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = list(tmp.glob("apache_tvm_ffi-*.whl"))
    if res.returncode != 0 or not wheels:
        raise CompileError(f"could not download apache-tvm-ffi=={ver} for Python {python}: {res.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extractall(dst)
    shutil.rmtree(tmp, ignore_errors=True)


# Pure-Python modules the TVM runtime imports that a bare Python lacks
# (apache-tvm-ffi's registry imports typing_extensions): copied from this
# machine, one file each, any Python 3 they support.
PURE_DEPENDENCIES = ("typing_extensions",)


def copy_pure_dependencies(site: Path) -> None:
    import importlib.util  # noqa: PLC0415

    for name in PURE_DEPENDENCIES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            raise CompileError(f"kiln bundle needs the pure-Python module {name} on this machine (pip install {name.replace('_', '-')})")
        shutil.copy2(spec.origin, site / f"{name}.py")


# `kiln serve` on the offline machine: its HTTP stack, pure Python (uvicorn's
# optional C speed-ups are not taken), copied from this machine when installed.
SERVE_DEPENDENCIES = ("starlette", "uvicorn", "anyio", "h11", "click", "idna")


def copy_serve_dependencies(site: Path) -> list[str]:
    """Copy the server's packages into SITE; returns those missing here (then the
    bundle runs everything but `kiln serve`)."""
    import importlib.util  # noqa: PLC0415

    missing = []
    for name in SERVE_DEPENDENCIES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            missing.append(name)
            continue
        if spec.submodule_search_locations:
            src = Path(next(iter(spec.submodule_search_locations)))
            if any(src.rglob("*.so")):
                missing.append(name)  # a compiled build: may not match the target's Python
                continue
            shutil.copytree(src, site / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(spec.origin, site / Path(spec.origin).name)
    return missing


def copy_kiln_runtime(site: Path) -> None:
    """Copy kiln's runtime modules (and the CLI, which then offers only the
    runtime's commands) into SITE/kiln."""
    root = Path(__file__).resolve().parent.parent  # the kiln package directory
    (site / "kiln").mkdir(parents=True)
    for name in KILN_RUNTIME_FILES:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, site / "kiln" / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, site / "kiln" / name)


def host_platform() -> str:
    return f"linux-{_platform.machine().lower()}"


def make_bundle(artifact: str | Path, out: str | Path, python: str = "3.12", platform: str | None = None) -> dict:
    """Write the bundle folder; returns sizes in bytes. platform: e.g. linux-aarch64
    (default: this machine's) for a bundle whose site comes from that platform's wheels."""
    from ..frontends.bundled import cache_dir  # noqa: PLC0415
    from ..runtime.artifact import open_artifact  # noqa: PLC0415
    from .wheels import PLATFORMS, fetch_wheels, unpack_site  # noqa: PLC0415

    platform = platform or host_platform()
    if platform not in PLATFORMS:
        raise CompileError(f"--platform {platform!r} is not supported; supported: {', '.join(PLATFORMS)}")
    art = open_artifact(artifact, device=None)
    machines = {t.get("machine") for t in art.manifest["targets"]}
    if platform.removeprefix("linux-") not in machines:
        raise CompileError(f"{art.path}: has no code for {platform} (it has {', '.join(sorted(map(str, machines)))}): "
                           f"compile it with a matching --target (e.g. {'llvm:aarch64' if 'aarch64' in platform else 'llvm:x86-64-v3'})")
    out = Path(out)
    if out.exists():
        raise CompileError(f"{out}: exists; choose a new folder for the bundle")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        site = tmp / "site"
        site.mkdir(parents=True)
        if platform == host_platform():
            _copy_tvm(site)
            _fetch_tvm_ffi(site, python)
            copy_pure_dependencies(site)
        else:  # another machine: its wheels, numpy and the tokenizer included
            unpack_site(site, fetch_wheels(platform, python, cache_dir()), RUNTIME_LIBS)
        missing = copy_serve_dependencies(site)
        copy_kiln_runtime(site)
        shutil.copytree(art.path, tmp / "model.kiln")
        launcher = tmp / "kiln"
        launcher.write_text(LAUNCHER)
        launcher.chmod(0o755)
        (tmp / "bundle.json").write_text(json.dumps({"platform": platform, "python": python}) + "\n")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    runtime_bytes = sum(f.stat().st_size for f in (out / "site").rglob("*") if f.is_file())
    model_bytes = sum(f.stat().st_size for f in (out / "model.kiln").rglob("*") if f.is_file())
    return {"runtime_bytes": runtime_bytes, "model_bytes": model_bytes, "serve_missing": missing, "platform": platform}
