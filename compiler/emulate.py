"""`kiln emulate BUNDLE ARGS...`: run an aarch64 bundle on this x86 machine under
qemu's user-mode emulation, as its board would run it.

qemu-aarch64 runs the board's own Python (Debian's arm64 packages, unpacked into a
sysroot: `qemu-aarch64 -L SYSROOT SYSROOT/usr/bin/python3.X BUNDLE/kiln ARGS`), which
loads the bundle's aarch64 TVM runtime, numpy and the artifact's aarch64 library. The
sysroot is made once with `apt-get download` + `dpkg -x` (no root, nothing installed)
under $KILN_CACHE/sysroot/; it needs a Debian or Ubuntu host whose apt knows the arm64
architecture (`dpkg --add-architecture arm64 && apt-get update`, as root, once).

Correctness, not speed: emulated code runs some 10-50x slower than on the board.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import KilnError

QEMU = {"linux-aarch64": ("qemu-aarch64", "arm64")}  # platform -> (qemu binary, Debian architecture)

# Debian packages of a Python's sysroot; "a|b": the first apt knows (Debian 12 / Ubuntu 24.04 names)
SYSROOT_PACKAGES = ("libc6", "python{v}-minimal", "libpython{v}-minimal", "libpython{v}-stdlib", "zlib1g", "libexpat1",
                    "libssl3t64|libssl3", "libffi8", "libbz2-1.0|libbz2-1t64", "liblzma5", "libstdc++6", "libgcc-s1")


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    if res.returncode != 0:
        err = (res.stderr or res.stdout).strip().splitlines()
        raise KilnError(f"{what} failed ({' '.join(cmd[:3])} ...): {err[-1] if err else 'exit ' + str(res.returncode)}")
    return res


def _pick(spec: str, arch: str) -> str:
    """The first name of "a|b" that apt knows for ARCH (one name: itself, unchecked)."""
    names = spec.split("|")
    if len(names) == 1:
        return names[0]
    for n in names:
        if subprocess.run(["apt-cache", "show", f"{n}:{arch}"], capture_output=True, check=False).returncode == 0:
            return n
    raise KilnError(f"apt knows none of {', '.join(names)} for {arch}")


def sysroot(platform: str, python: str, cache: Path) -> Path:
    """The cached sysroot with PLATFORM's Python PYTHON ("3.11"); made on first use."""
    if platform not in QEMU:
        raise KilnError(f"emulation of {platform!r} is not supported; supported: {', '.join(QEMU)}")
    arch = QEMU[platform][1]
    root = cache / "sysroot" / f"{platform}-py{python}"
    if (root / "usr" / "bin" / f"python{python}").exists():
        return root
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise KilnError(f"making the {platform} sysroot needs apt-get and dpkg (a Debian or Ubuntu host)")
    foreign = _run(["dpkg", "--print-foreign-architectures"], "dpkg").stdout.split()
    if arch not in foreign:
        raise KilnError(f"apt does not know the {arch} architecture: run once, as root: "
                        f"dpkg --add-architecture {arch} && apt-get update")
    if subprocess.run(["apt-cache", "show", f"python{python}-minimal:{arch}"], capture_output=True, check=False).returncode:
        raise KilnError(f"this host's apt has no Python {python} for {arch} to emulate the bundle with: "
                        f"make the bundle with the --python this distribution packages (Debian 12: 3.11, Ubuntu 24.04: 3.12)")
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        debs, staged = Path(tmp) / "debs", Path(tmp) / "root"
        debs.mkdir()
        pkgs = [f"{_pick(spec.format(v=python), arch)}:{arch}" for spec in SYSROOT_PACKAGES]
        _run(["apt-get", "download", "-q", *pkgs], f"apt-get download ({' '.join(pkgs)})", cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(staged)], f"dpkg -x {deb.name}")
        if not (staged / "usr" / "bin" / f"python{python}").exists():
            raise KilnError(f"the {arch} packages hold no usr/bin/python{python}")
        os.replace(staged, root)
    return root


def emulate_command(bundle: str | Path, args: list[str], cache: Path, cpu: str | None = None) -> tuple[list[str], dict]:
    """The command (and environment) that runs BUNDLE's kiln with ARGS under qemu."""
    bundle = Path(bundle)
    try:
        info = json.loads((bundle / "bundle.json").read_text())
    except (OSError, ValueError):
        raise KilnError(f"{bundle}: not a kiln bundle with a bundle.json (make one with kiln bundle ... --platform linux-aarch64)") from None
    platform, python = info.get("platform"), info.get("python")
    if platform not in QEMU:
        raise KilnError(f"{bundle}: is for {platform}, which runs here without emulation: python3 {bundle}/kiln ...")
    qemu = QEMU[platform][0]
    if shutil.which(qemu) is None:
        raise KilnError(f"{qemu} is not on PATH (Debian/Ubuntu: apt-get install qemu-user)")
    root = sysroot(platform, python, cache)
    cmd = [qemu, "-L", str(root), *(["-cpu", cpu] if cpu else []), str(root / "usr" / "bin" / f"python{python}"),
           str(bundle / "kiln"), *args]
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # this machine's Python settings are not the board's
        env.pop(var, None)
    return cmd, env
