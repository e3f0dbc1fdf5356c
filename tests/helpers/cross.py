"""The aarch64 emulation test's machine set-up: qemu-user, the aarch64 cross gcc (and its
libc) and apt's arm64 architecture (for `kiln emulate`'s sysroot).

Fetched only with KILN_FETCH_MODELS=1 and as root (CI runs as root on a bare Debian);
otherwise the test skips, naming what is missing. apt keeps the .deb files under
$KILN_CACHE/apt, so a CI machine that keeps the cache downloads no package twice; once
installed, nothing runs at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from kiln.frontends.bundled import cache_dir

TOOLS = {"qemu-aarch64": "qemu-user", "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu"}
# the cross gcc's libc (crti.o, libc.so): a Recommends of gcc-aarch64-linux-gnu, so named
PACKAGES = (*TOOLS.values(), "libc6-dev-arm64-cross")
CROSS_LIBC = "/usr/aarch64-linux-gnu/lib/crti.o"


def _missing() -> list[str]:
    out = [f"{tool} ({pkg})" for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if not os.path.exists(CROSS_LIBC):
        out.append(f"{CROSS_LIBC} (libc6-dev-arm64-cross)")
    if shutil.which("dpkg") and "arm64" not in subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True,
                                                              text=True, check=False).stdout.split():
        out.append("apt's arm64 architecture (dpkg --add-architecture arm64)")
    return out


def _apt(*args: str) -> None:
    archives = cache_dir() / "apt" / "archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    res = subprocess.run(["apt-get", "-q", "-o", f"Dir::Cache::Archives={archives}", *args], capture_output=True,
                         text=True, env=env, check=False)
    if res.returncode != 0:
        pytest.fail(f"apt-get {' '.join(args)} failed: {res.stderr.strip()[-400:]}")


def aarch64_tools() -> float:
    """Make sure the cross tools are here (installing them when allowed) or skip; returns
    the seconds spent installing (0 when all were here)."""
    missing = _missing()
    if not missing:
        return 0.0
    if os.environ.get("KILN_FETCH_MODELS") != "1":
        pytest.skip(f"aarch64 emulation needs {', '.join(missing)}: install them, or KILN_FETCH_MODELS=1 (as root) to have the test do it")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"aarch64 emulation needs {', '.join(missing)}; installing them needs root and apt-get")
    t0 = time.perf_counter()
    subprocess.run(["dpkg", "--add-architecture", "arm64"], check=True)
    _apt("update")
    _apt("install", "-y", "--no-install-recommends", *PACKAGES)
    still = _missing()
    assert not still, f"still missing after apt-get install: {still}"
    return time.perf_counter() - t0
