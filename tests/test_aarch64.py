"""aarch64 artifacts: `--target llvm:aarch64` (armv8.2-a + dotprod) and named Arm CPUs are
cross-compiled here; the runtime loads only its own machine's libraries and checks the
Arm CPU features first; the slow test runs the artifact under qemu user-mode emulation
through an aarch64 bundle and compares it with the x86 library of the same artifact."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from kiln.errors import ArtifactError, CompileError
from kiln.runtime.artifact import Artifact, check_host
from kiln.runtime.hostinfo import hwcaps_from_auxv

ARM_LOGITS_RTOL = 1e-5  # float32 both ways: only the ISA (NEON / SVE vs AVX) differs


@pytest.fixture
def cross_gcc(monkeypatch):
    """Parsing a cross target checks for its linker (test_missing_cross_toolchain_...):
    here, without one installed, skip that check."""
    import kiln.compiler.target as target  # noqa: PLC0415

    monkeypatch.setattr(target, "check_linker", lambda part, tg: None)


def test_arm_targets_parse_with_their_features(cross_gcc):
    from kiln.compiler.target import library_path, parse_target  # noqa: PLC0415

    base, v1 = parse_target("llvm:aarch64,neoverse-v1")
    assert (base.triple, base.mcpu, base.mattr, base.label) == ("aarch64-linux-gnu", "generic", ("+v8.2a", "+dotprod"), "aarch64")
    assert {"asimd", "asimddp"} <= set(base.required_cpu_flags()) and not {"sve", "i8mm", "asimdhp"} & set(base.required_cpu_flags())
    assert {"asimddp", "sve", "i8mm", "bf16"} <= set(v1.required_cpu_flags())
    assert [library_path(t, [base, v1]) for t in (base, v1)] == ["lib/cpu-aarch64.so", "lib/cpu-neoverse-v1.so"]
    m = base.manifest()
    assert (m["machine"], m["cpu"], m["mcpu"], m["mattr"]) == ("aarch64", "aarch64", "generic", ["+v8.2a", "+dotprod"])
    (a72,) = parse_target("llvm:cortex-a72")  # armv8.0-a: the Raspberry Pi 4's core, no dot product
    assert "asimddp" not in a72.required_cpu_flags() and "asimd" in a72.required_cpu_flags()
    x86, arm = parse_target("llvm:x86-64-v3,cortex-a76")  # one artifact for both machines
    assert (x86.triple, arm.triple) == ("x86_64-linux-gnu", "aarch64-linux-gnu")


def test_missing_cross_toolchain_names_the_package(monkeypatch, tmp_path):
    from kiln.compiler.target import host_triple, parse_target  # noqa: PLC0415

    if host_triple().startswith("aarch64"):
        pytest.skip("llvm:aarch64 is native here")
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "aarch64-linux-gnu-gcc" else real(name))
    with pytest.raises(CompileError, match=r"needs the linker aarch64-linux-gnu-gcc.*apt-get install gcc-aarch64-linux-gnu"):
        parse_target("llvm:neoverse-n1")
    monkeypatch.setattr(shutil, "which", real)
    # a gcc without its C library (installed with --no-install-recommends) answers
    # -print-file-name=crti.o with the bare name, as this stand-in does
    gcc = tmp_path / "aarch64-linux-gnu-gcc"
    gcc.write_text('#!/bin/sh\necho "${1#-print-file-name=}"\n')
    gcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(CompileError, match=r"has no C library for aarch64.*apt-get install libc6-dev-arm64-cross"):
        parse_target("llvm:aarch64")
    with pytest.raises(CompileError, match="not a CPU LLVM knows for x86_64-linux-gnu or aarch64-linux-gnu"):
        parse_target("llvm:cortex-a99")


def _target(cpu, machine, flags):
    return {"kind": "llvm", "device": "cpu", "os": "linux", "cpu": cpu, "mcpu": cpu, "machine": machine,
            "triple": f"{machine}-linux-gnu", "required_cpu_flags": flags, "library": f"lib/cpu-{cpu}.so"}


X86_V3 = _target("x86-64-v3", "x86_64", ["avx", "avx2", "fma"])
ARM_BASE = _target("aarch64", "aarch64", ["asimd", "asimddp", "fp"])
ARM_V1 = _target("neoverse-v1", "aarch64", ["asimd", "asimddp", "fp", "i8mm", "sve"])


def _fake_host(monkeypatch, machine, flags):
    import kiln.runtime.artifact as artifact  # noqa: PLC0415

    monkeypatch.setattr(artifact, "host_machine", lambda: machine)
    monkeypatch.setattr(artifact, "host_cpu_flags", lambda: set(flags))


def _artifact(*targets):
    from kiln.tvm_compat import runtime  # noqa: PLC0415

    return Artifact(Path("m.kiln"), {"tvm_version": runtime().version, "targets": list(targets)})


@pytest.mark.parametrize(("machine", "flags", "picked"), [
    ("x86_64", {"avx", "avx2", "fma"}, "x86-64-v3"),
    ("aarch64", {"asimd", "asimddp", "fp", "atomics"}, "aarch64"),  # cortex-a76 class: no SVE
    ("aarch64", {"asimd", "asimddp", "fp", "i8mm", "sve", "bf16"}, "neoverse-v1"),
])
def test_each_machine_loads_its_own_best_library(monkeypatch, machine, flags, picked):
    _fake_host(monkeypatch, machine, flags)
    art = _artifact(X86_V3, ARM_BASE, ARM_V1)
    assert art.target_for("cpu")["cpu"] == picked
    check_host(art, "cpu")


def test_foreign_or_too_new_arm_code_is_refused_before_loading(monkeypatch):
    _fake_host(monkeypatch, "x86_64", {"avx", "avx2", "fma"})
    with pytest.raises(ArtifactError, match=r"built for aarch64 \(CPU aarch64, neoverse-v1\), this machine is x86_64: recompile with --target llvm"):
        check_host(_artifact(ARM_BASE, ARM_V1), "cpu")
    with pytest.raises(ArtifactError, match=r"library 'neoverse-v1' is for aarch64, this machine is x86_64: choose one of x86-64-v3"):
        check_host(_artifact(X86_V3, ARM_BASE, ARM_V1), "cpu", cpu="neoverse-v1")
    _fake_host(monkeypatch, "aarch64", {"asimd", "fp", "asimddp"})
    with pytest.raises(ArtifactError, match=r"built for x86_64 \(CPU x86-64-v3\), this machine is aarch64"):
        check_host(_artifact(X86_V3), "cpu")
    with pytest.raises(ArtifactError, match=r"built for CPU neoverse-v1 which needs i8mm, sve, not on this CPU"):
        check_host(_artifact(ARM_V1), "cpu")
    _fake_host(monkeypatch, "aarch64", {"asimd", "fp"})  # armv8.0 (cortex-a72): the least demanding level is refused
    with pytest.raises(ArtifactError, match=r"CPU aarch64 which needs asimddp.*--target llvm:cortex-a72"):
        check_host(_artifact(ARM_BASE, ARM_V1), "cpu")


def test_arm_hwcaps_read_from_the_aux_vector():
    hwcap = 1 << 0 | 1 << 1 | 1 << 20 | 1 << 22  # fp asimd asimddp sve
    hwcap2 = 1 << 1 | 1 << 13  # sve2 i8mm
    raw = struct.pack("=6Q", 6, 4096, 16, hwcap, 26, hwcap2) + struct.pack("=2Q", 0, 0)
    assert hwcaps_from_auxv(raw) == {"fp", "asimd", "asimddp", "sve", "sve2", "i8mm"}
    assert hwcaps_from_auxv(b"") == set()


def test_bundle_for_a_platform_the_artifact_has_no_code_for_is_refused(compiled, tmp_path):
    from kiln.compiler.bundle import make_bundle  # noqa: PLC0415

    with pytest.raises(CompileError, match="has no code for linux-aarch64.*llvm:aarch64"):
        make_bundle(compiled("llama"), tmp_path / "b", python="3.11", platform="linux-aarch64")
    assert not (tmp_path / "b").exists()


def _emulate(bundle: Path, args: list[str], cpu: str | None = None) -> subprocess.CompletedProcess:
    from kiln.compiler.emulate import emulate_command  # noqa: PLC0415
    from kiln.frontends.bundled import cache_dir  # noqa: PLC0415

    cmd, env = emulate_command(bundle, args, cache_dir(), cpu=cpu)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_aarch64_artifact_under_qemu_matches_x86(tiny_checkpoint, tmp_path):
    """One artifact with an x86 library (this CPU) and two Arm levels (aarch64, neoverse-v1);
    its aarch64 bundle (wheels from PyPI) runs under qemu-aarch64 with Debian's arm64
    Python: qemu's default CPU (SVE, i8mm) takes the neoverse-v1 library, a cortex-a76
    the baseline, both matching the x86 library's logits and greedy tokens; a cortex-a53
    (no dot product) is refused before any code loads."""
    from helpers.cross import aarch64_tools  # noqa: PLC0415

    from kiln.compiler.build import compile_model  # noqa: PLC0415
    from kiln.compiler.bundle import make_bundle  # noqa: PLC0415
    from kiln.runtime import load  # noqa: PLC0415

    if platform.machine() != "x86_64":
        pytest.skip("emulates aarch64 on an x86-64 host")
    setup_s = aarch64_tools()
    t0 = time.perf_counter()
    art = tmp_path / "m.kiln"
    compile_model(tiny_checkpoint("llama"), art, target="llvm,aarch64,neoverse-v1", dtype="float32")
    compile_s = time.perf_counter() - t0
    s = load(art)
    assert s.target["machine"] == "x86_64"  # this host's own library of the three
    ids = list(range(3, 40))
    ref = s.logits(ids)
    ref_tokens = s.generate(ids[:5], max_new_tokens=24, ignore_eos=True).tokens

    t0 = time.perf_counter()
    bundle = tmp_path / "b"
    make_bundle(art, bundle, python="3.11", platform="linux-aarch64")
    assert not (bundle / "site" / "tvm" / "lib" / "libtvm_compiler.so").exists()
    bundle_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = _emulate(bundle, ["eval", str(bundle / "model.kiln"), "--tokens", ",".join(map(str, ids)),
                            "--logits-out", str(tmp_path / "arm.npy"), "--json"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["target"] == "neoverse-v1"
    err = float(np.abs(np.load(tmp_path / "arm.npy") - ref).max() / np.abs(ref).max())
    assert err < ARM_LOGITS_RTOL, f"aarch64 vs x86 logits: relative error {err:.2e}"

    out = _emulate(bundle, ["run", str(bundle / "model.kiln"), "--tokens", ",".join(map(str, ids[:5])),
                            "--max-new-tokens", "24", "--ignore-eos", "--json"], cpu="cortex-a76")
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["target"] == "aarch64" and res["tokens"] == ref_tokens

    out = _emulate(bundle, ["run", str(bundle / "model.kiln"), "--tokens", "1,2,3"], cpu="cortex-a53")
    assert out.returncode == 2 and re.search(r"built for CPU aarch64 which needs asimddp.*, not on this CPU", out.stderr), out.stderr[-2000:]
    print(f"\naarch64 under qemu: setup {setup_s:.1f} s, compile {compile_s:.1f} s, bundle {bundle_s:.1f} s, "
          f"emulated runs {time.perf_counter() - t0:.1f} s; logits rel err {err:.2e}")


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["q4g32", "q4k"])
def test_aarch64_integer_dots_under_qemu_match_x86(quant, tiny_checkpoint, tmp_path):
    """A q4g32 or q4k artifact (4-bit body, q8 LM head) whose rows fit the CPU integer-dot kernels:
    the aarch64 library runs them on `sdot` / `smlal` (kernels/cpu/qdot.c), the x86 one on
    AVX2. Same activation codes, same integer sums: the logits agree to float32 rounding of the
    block scaling (summed in another order)."""
    from helpers.cross import aarch64_tools  # noqa: PLC0415

    from kiln.compiler.build import compile_model  # noqa: PLC0415
    from kiln.compiler.bundle import make_bundle  # noqa: PLC0415
    from kiln.runtime import load  # noqa: PLC0415

    if platform.machine() != "x86_64":
        pytest.skip("emulates aarch64 on an x86-64 host")
    aarch64_tools()
    art = tmp_path / "q.kiln"
    compile_model(tiny_checkpoint("llama_k64"), art, target="llvm,aarch64", dtype="float32", quant=quant, quality_check=False)
    ids = list(range(3, 40))
    ref = load(art).logits(ids)
    bundle = tmp_path / "b"
    make_bundle(art, bundle, python="3.11", platform="linux-aarch64")
    out = _emulate(bundle, ["eval", str(bundle / "model.kiln"), "--tokens", ",".join(map(str, ids)),
                            "--logits-out", str(tmp_path / "arm.npy"), "--json"], cpu="cortex-a76")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["target"] == "aarch64"
    err = float(np.abs(np.load(tmp_path / "arm.npy") - ref).max() / np.abs(ref).max())
    # same codes and integer sums; the fp32 scaling runs per block on NEON and per block pair on
    # AVX2 (vphaddd): measured 1.1e-5
    assert err < 1e-4, f"aarch64 vs x86 integer-dot logits: relative error {err:.2e}"


def test_foreign_bundle_site_takes_the_tvm_runtime_only(tmp_path):
    """apache-tvm's wheel gives its Python package and runtime libraries, never the 260 MB
    compiler library, headers or sources; other wheels are unpacked whole."""
    import zipfile  # noqa: PLC0415

    from kiln.compiler.bundle import RUNTIME_LIBS  # noqa: PLC0415
    from kiln.compiler.wheels import unpack_site  # noqa: PLC0415

    tvm_whl = tmp_path / "apache_tvm-0.27.0.post1-py3-none-manylinux_2_28_aarch64.whl"
    np_whl = tmp_path / "numpy-2.4.6-cp311-cp311-manylinux_2_28_aarch64.whl"
    tvm_files = ["tvm/__init__.py", "tvm/relax/__init__.py", "tvm/lib/libtvm_runtime.so", "tvm/lib/libtvm_compiler.so",
                 "tvm/include/tvm/runtime.h", "tvm/src/x.cc", "tvm/3rdparty/dlpack.h", "apache_tvm-0.27.0.post1.dist-info/METADATA"]
    for whl, names in ((tvm_whl, tvm_files), (np_whl, ["numpy/__init__.py", "numpy.libs/libopenblas.so"])):
        with zipfile.ZipFile(whl, "w") as zf:
            for n in names:
                zf.writestr(n, "x")
    site = tmp_path / "site"
    unpack_site(site, [tvm_whl, np_whl], RUNTIME_LIBS)
    got = sorted(str(p.relative_to(site)) for p in site.rglob("*") if p.is_file())
    assert got == ["apache_tvm-0.27.0.post1.dist-info/METADATA", "numpy.libs/libopenblas.so", "numpy/__init__.py",
                   "tvm/__init__.py", "tvm/lib/libtvm_runtime.so", "tvm/relax/__init__.py"]


def test_emulate_names_what_is_missing(tmp_path, capsys):
    from kiln.cli import main  # noqa: PLC0415

    assert main(["emulate", str(tmp_path), "--", "run", "m.kiln"]) == 2
    assert "not a kiln bundle with a bundle.json" in capsys.readouterr().err
    (tmp_path / "bundle.json").write_text('{"platform": "linux-x86_64", "python": "3.11"}')
    assert main(["emulate", str(tmp_path), "--", "run", "m.kiln"]) == 2
    assert "runs here without emulation" in capsys.readouterr().err
