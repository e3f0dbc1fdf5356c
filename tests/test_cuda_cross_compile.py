"""CUDA artifacts cross-compiled on a machine without a GPU (issue 3 groundwork).

`kiln compile --target cuda:sm_90` (or several archs) must embed compiled
device code (SASS per arch + PTX of the newest), never CUDA source left for
NVRTC at load time, and the runtime must refuse the
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

from kiln.compiler.fatbin import fatbin_entries

# Every test here starts `kiln compile` processes, most of them running nvcc: slow as well.
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("gcc") is None, reason="needs nvcc and gcc"),
]


def kiln(*args, **kw):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=900, **kw)


@pytest.fixture(scope="module")
def cuda_artifact(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "tiny-sm90.kiln"
    res = kiln("compile", str(tiny_checkpoint("llama")), "-o", str(out), "--target", "cuda:sm_90", "--dtype", "float32", "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_cuda_artifact_holds_sass_not_source(cuda_artifact):
    """(float32: no decode_batch -- its projections would get dlight's generic schedules.)"""
    manifest = json.loads((cuda_artifact / "manifest.json").read_text())
    (tgt,) = manifest["targets"]
    assert (tgt["device"], tgt["arch"], tgt["archs"], tgt["ptx"], tgt["library"]) == ("cuda", "sm_90", ["sm_90"], "compute_90", "lib/cuda.so")
    blob = (cuda_artifact / "lib" / "cuda.so").read_bytes()
    assert sorted(fatbin_entries(blob)) == [("ptx", 90), ("sass", 90)]
    assert b"__global__" not in blob and b"extern \"C\"" not in blob  # no CUDA source for NVRTC
    assert b"decode_batch" not in blob


def test_multi_arch_fatbin(tiny_checkpoint, tmp_path):
    out = tmp_path / "multi.kiln"
    env = dict(os.environ, KILN_CUDA_DECODE_BATCH="0")  # (fatbin entries only: skip compiling the batch kernels three times)
    res = kiln("compile", str(tiny_checkpoint("qwen3")), "-o", str(out), "--target", "cuda:sm_90,sm_80,sm_89", "--dtype", "bfloat16", "--quiet",
               env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    (tgt,) = json.loads((out / "manifest.json").read_text())["targets"]
    assert (tgt["arch"], tgt["archs"], tgt["ptx"]) == ("sm_80", ["sm_80", "sm_89", "sm_90"], "compute_90")
    entries = fatbin_entries((out / "lib" / "cuda.so").read_bytes())
    assert sorted(entries) == [("ptx", 90), ("sass", 80), ("sass", 89), ("sass", 90)]


@pytest.mark.parametrize("fused_gemv", [False, True])
def test_cuda_uses_kiln_kernels(tiny_checkpoint, tmp_path, fused_gemv):
    """head_dim 32 (qwen3 tiny): kiln's split-KV decode attention and tensor-core
    prefill GEMM are in the library; the fused decode GEMVs only with
    KILN_CUDA_GEMV=1 (not the SwiGLU one: intermediate 100 is not whole 16-byte
    rows). head_dim 24 (llama tiny) would take TVM's decode kernel."""
    out = tmp_path / "q3.kiln"
    env = dict(os.environ, KILN_CUDA_GEMV="1" if fused_gemv else "0")
    res = kiln("compile", str(tiny_checkpoint("qwen3")), "-o", str(out), "--target", "cuda:sm_90", "--dtype", "bfloat16", "--quiet", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    blob = (out / "lib" / "cuda.so").read_bytes()
    for name in (b"kiln_paged_decode_attention", b"kiln_gemm_", b"kiln_gemm_rows", b"decode_batch"):  # bf16: decode_batch by default
        assert name in blob, name
    for name in (b"kiln_rmsnorm_gemv", b"kiln_gemv_residual"):
        assert (name in blob) == fused_gemv, name
    assert b"kiln_silu_mul_gemv_residual" not in blob


def _tiny_config(tmp_path, **overrides) -> None:
    """tmp_path / config.json: a 2-layer bf16 Llama config (no weights: --no-weights compiles)."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
           "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2, "vocab_size": 256,
           "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(cfg | overrides))


@pytest.mark.parametrize("widths", ["4", "4,8", "4,f8"])
def test_cuda_quantized_decode_gemv(tmp_path, widths):
    """--quant q4g32 on CUDA: the 4-bit decode projections run on kiln's
    qgemv.cuh (default, measured faster than dlight's), the q8 LM head on
    dlight's GEMV unless KILN_CUDA_QGEMV lists 8 too; prefill projections on
    kiln's quantized tensor-core GEMM."""
    _tiny_config(tmp_path)
    out = tmp_path / "q.kiln"
    env = dict(os.environ, KILN_CUDA_QGEMV=widths)
    res = kiln("compile", str(tmp_path / "config.json"), "--no-weights", "-o", str(out), "--target", "cuda:sm_90",
               "--dtype", "bfloat16", "--quant", "q4g32", "--quiet", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    blob = (out / "lib" / "cuda.so").read_bytes()
    assert b"kiln_qgemv4mmag32_bfloat16" in blob and b"kiln_qgemv4g32_" not in blob  # 16-bit x: on the tensor cores
    assert b"kiln_qgemm4g32_" in blob  # prefill: the tensor-core GEMM decoding the B tile in shared memory
    assert (b"kiln_qgemv8g32" in blob) == ("8" in widths.split(","))
    assert b"decode_batch" not in blob  # quantized weights: not on by default (no quantized row GEMM yet)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {p["dtype"] for p in manifest["params"] if p["quant"] == "q4g32"} == {"uint32", "float16"}
    if widths == "4":  # the float path on request
        res = kiln("compile", str(tmp_path / "config.json"), "--no-weights", "-o", str(tmp_path / "f.kiln"), "--target", "cuda:sm_80",
                   "--dtype", "bfloat16", "--quant", "q4g32", "--quiet", env=env | {"KILN_CUDA_QGEMV_MMA": "0"})
        assert res.returncode == 0, res.stderr[-2000:]
        blob = (tmp_path / "f.kiln" / "lib" / "cuda.so").read_bytes()
        assert b"kiln_qgemv4g32_bfloat16" in blob and b"kiln_qgemv4mma" not in blob
    if widths == "4,f8":  # fp8 weights: e4m3 codes through the same kernel (per-row fp32 scale); decode_batch by default
        res = kiln("compile", str(tmp_path / "config.json"), "--no-weights", "-o", str(tmp_path / "f8.kiln"), "--target",
                   "cuda:sm_80,sm_90", "--dtype", "bfloat16", "--quant", "fp8", "--quiet", env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        blob = (tmp_path / "f8.kiln" / "lib" / "cuda.so").read_bytes()
        assert b"kiln_qgemvf8g128_bfloat16" in blob and b"kiln_qgemvf8g128_float32" in blob  # body and (tied) head
        assert b"kiln_qgemmf8g128_" in blob
        assert b"decode_batch" in blob and b"kiln_gemm_rows_f8" in blob  # fp8's row kernel (sm_80: software e4m3 decode)


def test_qgemv_mma_config():
    """Which q4 decode GEMVs go on the tensor cores, in what shape (warps, steps per round): 16-bit
    activations, q4 codes, K in 128-weight steps, groups of 32 / 64 / 128; whole rounds per warp."""
    from kiln.passes.kernels.gemv_cuda import qgemv_mma_config  # noqa: PLC0415

    assert qgemv_mma_config(4096, 28672, 128, "4", "bfloat16") == (4, 2)  # gate/up: many rows
    assert qgemv_mma_config(14336, 4096, 128, "4", "bfloat16") == (16, 1)  # down: long rows
    assert qgemv_mma_config(4096, 6144, 32, "4", "bfloat16") == (8, 2)
    assert qgemv_mma_config(4096, 6144, 32, "4", "float16") is None  # not built for CUDA yet
    assert qgemv_mma_config(576, 576, 32, "4", "bfloat16") is None  # K not in 128-weight steps (SmolLM2)
    assert qgemv_mma_config(4096, 4096, 128, "4", "float32") is None  # fp32 activations: the float path
    assert qgemv_mma_config(4096, 4096, 128, "8", "bfloat16") is None
    assert qgemv_mma_config(4096, 4096, 256, "4", "bfloat16") is None
    for K in (128, 384, 640, 11008 // 128 * 128, 14336):  # odd step counts fall back to fewer warps, never past whole rounds
        nw, u = qgemv_mma_config(K, 1000, 64, "4", "bfloat16")
        assert (K // 128) % (nw * u) == 0


def test_cuda_q4k_decode_gemv(tmp_path):
    """--quant q4k on CUDA: decode projections on qgemv.cuh's qgemv4k (the super-block, 128 and
    256 here, is the kernel's block); prompts expand the 8-bit scale / minimum codes to q4g32's fp16
    arrays (q4k_expand) and run q4g32's tensor-core GEMM; the parts as the format declares them."""
    _tiny_config(tmp_path)
    out = tmp_path / "q.kiln"
    res = kiln("compile", str(tmp_path / "config.json"), "--no-weights", "-o", str(out), "--target", "cuda:sm_90",
               "--dtype", "bfloat16", "--quant", "q4k", "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    blob = (out / "lib" / "cuda.so").read_bytes()
    assert b"kiln_qgemv4kg128_bfloat16" in blob and b"kiln_qgemv4kg256_bfloat16" in blob  # K = 128 (qkv, gate/up), 256 (down)
    assert b"kiln_q4k_expand128_" in blob and b"kiln_q4k_expand256_" in blob and b"kiln_qgemm4g32_" in blob
    manifest = json.loads((out / "manifest.json").read_text())
    assert {p["name"].rsplit(".", 1)[1]: p["dtype"] for p in manifest["params"] if p["quant"] == "q4k"} == {
        "q": "uint32", "s": "uint8", "z": "int8", "d": "float16", "m": "float16"}


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
    res = kiln("compile", str(tiny_checkpoint("llama")), "-o", str(tmp_path / "x.kiln"), "--target", "cuda:sm_90,sm_90")
    assert res.returncode == 2 and "twice" in res.stderr


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


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_cuda_quantized_kv_cache(tmp_path, kv):
    """--kv-dtype int8|fp8 on CUDA: kiln's append and paged attention kernels are
    in the library, TVM's cache factory is not exported, and the manifest tells
    the runtime how to allocate the cache (GPU runs: benchmarks/results/kv_cache_gpu-*)."""
    _tiny_config(tmp_path, hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path / "kv.kiln"
    res = kiln("compile", str(tmp_path / "config.json"), "--no-weights", "-o", str(out), "--target", "cuda:sm_90",
               "--dtype", "bfloat16", "--kv-dtype", kv, "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    blob = (out / "lib" / "cuda.so").read_bytes()
    assert b"kv_append" in blob and b"kv_attention" in blob
    assert b"create_paged_kv_cache" not in blob
    kvm = json.loads((out / "manifest.json").read_text())["kv_cache"]
    assert (kvm["kind"], kvm["dtype"], kvm["code_dtype"]) == ("kiln-quant", kv, "int8" if kv == "int8" else "uint8")
    assert kvm["bytes_per_token"] == 2 * 2 * 2 * (64 + 4)  # layers x (k, v) x kv heads x (codes + fp32 scale)
