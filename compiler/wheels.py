"""The bundle's site folder for another machine (`kiln bundle --platform linux-aarch64`),
made from that platform's wheels on PyPI instead of this machine's installed packages.

The wheels are the versions installed here (what kiln is tested with), downloaded
once into $KILN_CACHE/wheels/PLATFORM-cpXY/ (a second bundle fetches nothing) and
unpacked: all of each, except that apache-tvm gives only its runtime (no
libtvm_compiler.so, no headers or sources), as the host bundle copies it.
"""

from __future__ import annotations

import fcntl
import re
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..errors import CompileError

# What the runtime and its CLI import on the target: TVM's runtime and its FFI, numpy,
# ml_dtypes (bfloat16 / fp8 weights), tokenizers and jinja2 (text prompts, chat
# templates), and the pure-Python typing_extensions that tvm_ffi imports.
RUNTIME_WHEELS = ("apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "tokenizers", "jinja2", "markupsafe",
                  "typing_extensions")

# platform -> manylinux tags pip may take, newest first (TVM's own wheel is 2_28)
PLATFORMS = {
    "linux-aarch64": ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"),
    "linux-x86_64": ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"),
}
TVM_SKIP_DIRS = {"3rdparty", "include", "__pycache__", "lib64", "web", "cmake", "src", "testing"}


def _wheel_stem(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def requirements() -> list[str]:
    """RUNTIME_WHEELS pinned to the versions installed here (unpinned when absent)."""
    out = []
    for name in RUNTIME_WHEELS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def _cached_wheel(folder: Path, req: str) -> Path | None:
    name, _, ver = req.partition("==")
    found = sorted(p for p in folder.glob("*.whl")
                   if p.name.split("-")[0].lower() == _wheel_stem(name) and (not ver or p.name.split("-")[1] == ver))
    return found[-1] if found else None


def fetch_wheels(platform: str, python: str, cache: Path) -> list[Path]:
    """The runtime's wheels for PLATFORM and CPython PYTHON ("3.11"), from the cache or
    PyPI (pip download, binary wheels only, no dependencies: the list is complete)."""
    if platform not in PLATFORMS:
        raise CompileError(f"--platform {platform!r} is not supported; supported: {', '.join(PLATFORMS)}")
    if not re.fullmatch(r"3\.\d+", python):
        raise CompileError(f"--python {python!r}: give the target's Python as 3.X (e.g. 3.11)")
    folder = cache / "wheels" / f"{platform}-cp{python.replace('.', '')}"
    folder.mkdir(parents=True, exist_ok=True)
    # one process downloads into the folder at a time: another waits, then finds the wheels whole
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch_into(folder, platform, python)


def _fetch_into(folder: Path, platform: str, python: str) -> list[Path]:
    reqs = requirements()
    missing = [r for r in reqs if _cached_wheel(folder, r) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--python-version", python, "--implementation", "cp", "-d", str(folder)]
        for tag in PLATFORMS[platform]:
            cmd += ["--platform", tag]
        res = subprocess.run(cmd + missing, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            err = res.stderr.strip().splitlines()
            raise CompileError(f"could not download the {platform} wheels for Python {python} ({' '.join(missing)}): "
                               f"{err[-1] if err else 'pip failed'}")
    wheels = [_cached_wheel(folder, r) for r in reqs]
    if any(w is None for w in wheels):
        raise CompileError(f"pip gave no wheel for {[r for r, w in zip(reqs, wheels) if w is None]} ({platform}, Python {python})")
    return wheels


def unpack_site(site: Path, wheels: list[Path], tvm_libs: tuple[str, ...]) -> None:
    """Unzip each wheel into SITE; of apache-tvm's, the Python package without its
    headers, sources and tests, and of its libraries only TVM_LIBS (the runtime's)."""
    for whl in wheels:
        with zipfile.ZipFile(whl) as zf:
            members = zf.namelist()
            if whl.name.startswith("apache_tvm-"):
                members = [n for n in members if _tvm_runtime_file(n, tvm_libs)]
            zf.extractall(site, members)
    for lib in site.rglob("*.so*"):  # zip drops the mode bits
        lib.chmod(0o755)


def _tvm_runtime_file(name: str, tvm_libs: tuple[str, ...]) -> bool:
    parts = name.split("/")
    if parts[0] != "tvm" and not parts[0].endswith(".dist-info"):
        return False
    if any(p in TVM_SKIP_DIRS for p in parts[:-1]) or name.endswith(".pyc"):
        return False
    return not (parts[:2] == ["tvm", "lib"] and len(parts) == 3 and parts[2] not in tvm_libs)

