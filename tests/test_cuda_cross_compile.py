"""CUDA artifacts cross-compiled on a machine without a GPU (issue 3 groundwork).

`kiln compile --target cuda:sm_90` must embed compiled device code (a cubin),
never CUDA source left for NVRTC at load time, and the runtime must refuse the
artifact cleanly where there is no GPU. The GPU side (load through `kiln
bundle`, logits vs transformers on an H100) ran on the device machine; its
output is kept in benchmarks/results/gpu_tiny_llama_sm90_bundle-2026-11-22.txt.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("gcc") is None, reason="needs nvcc and gcc")


def kiln(*args, **kw):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=900, **kw)


@pytest.fixture(scope="module")
def cuda_artifact(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "tiny-sm90.kiln"
    res = kiln("compile", str(tiny_checkpoint("llama")), "-o", str(out), "--target", "cuda:sm_90", "--dtype", "float32", "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_cuda_artifact_holds_a_cubin_not_source(cuda_artifact):
    manifest = json.loads((cuda_artifact / "manifest.json").read_text())
    (tgt,) = manifest["targets"]
    assert (tgt["device"], tgt["arch"], tgt["library"]) == ("cuda", "sm_90", "lib/cuda.so")
    blob = (cuda_artifact / "lib" / "cuda.so").read_bytes()
    assert b"-arch sm_90" in blob  # ptxas options inside the embedded cubin
    assert b"\x7fELF" in blob[64:]  # a device ELF (the cubin) embedded in the host library


def test_runtime_refuses_cuda_artifact_without_gpu(cuda_artifact):
    env = dict(os.environ)
    res = kiln("run", str(cuda_artifact), "--tokens", "1,2,3", "--device", "cuda", env=env)
    assert res.returncode == 2
    assert res.stderr.startswith("kiln: error:") and "Traceback" not in res.stderr
    assert "CUDA" in res.stderr
    res = kiln("run", str(cuda_artifact), "--tokens", "1,2,3")  # default device cpu
    assert res.returncode == 2 and "no code for device 'cpu'" in res.stderr


def test_unknown_cuda_arch_is_refused(tiny_checkpoint, tmp_path):
    res = kiln("compile", str(tiny_checkpoint("llama")), "-o", str(tmp_path / "x.kiln"), "--target", "cuda:sm_75")
    assert res.returncode == 2 and "sm_75" in res.stderr and "cuda:sm_90" in res.stderr
    assert not (tmp_path / "x.kiln").exists()


@pytest.mark.skipif(os.environ.get("KILN_FETCH_MODELS") != "1", reason="downloads apache-tvm-ffi for the target Python")
def test_bundle_is_small_and_self_contained(cuda_artifact, tmp_path):
    res = kiln("bundle", str(cuda_artifact), "-o", str(tmp_path / "b"), "--python", "3.12")
    assert res.returncode == 0, res.stderr[-2000:]
    site = tmp_path / "b" / "site"
    assert not (site / "tvm" / "lib" / "libtvm_compiler.so").exists()
    assert (site / "tvm_ffi").is_dir() and (site / "kiln" / "runtime" / "session.py").is_file()
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    assert size <= 35 * 2**20, f"runtime part is {size / 2**20:.1f} MiB"


def test_cuda_float16_is_refused_not_crashed(tiny_checkpoint, tmp_path):
    res = kiln("compile", str(tiny_checkpoint("llama")), "-o", str(tmp_path / "x.kiln"), "--target", "cuda:sm_90", "--dtype", "float16")
    assert res.returncode == 2 and "bfloat16" in res.stderr
    assert not (tmp_path / "x.kiln").exists()
