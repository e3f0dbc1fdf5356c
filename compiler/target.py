"""Compilation targets: parse `--target`, detect the host CPU, describe what the
built library needs from the machine that loads it.

Spellings:
  llvm                 the host CPU (triple from the OS, mcpu detected)
  llvm:x86-64-v3       an explicit LLVM CPU name (also znver4, skylake-avx512, ...)
  llvm:x86-64-v2,x86-64-v3,x86-64-v4   one library per level in one artifact; the runtime
                       loads the best the host supports (never an illegal instruction)
  llvm:aarch64         64-bit Arm, armv8.2-a + dotprod (cross-compiled on an x86 host, linked
                       by aarch64-linux-gnu-gcc)
  llvm:cortex-a76      a named Arm CPU (also neoverse-n1, neoverse-v1, cortex-a72, ...): its
                       features (i8mm, sve, ...) are what the loading machine must have
  llvm:aarch64,neoverse-v1   several levels again; x86 and Arm libraries may share an artifact
  cuda:sm_90           a CUDA arch (cross-compiled: no GPU or driver needed)
  cuda:sm_80,sm_89,sm_90   one library with SASS for each arch + PTX of the newest

Why detect mcpu ourselves: the LLVM inside TVM 0.27's wheel has the triple
x86_64-conda-linux-gnu and silently builds `mcpu=native` for baseline SSE2
("not valid in -mtriple"). We pass an explicit triple and the detected CPU name.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field

from ..errors import CompileError
from ..runtime.hostinfo import LLVM_TO_CPUINFO, host_os
from ..tvm_compat import compiler

_TRIPLES = {"x86_64": "x86_64-linux-gnu", "amd64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}

# Named CPU levels that are not LLVM CPU names: name -> (triple, LLVM mcpu, mattr).
# `aarch64` is the baseline of the Arm boards kiln aims at (Raspberry Pi 5, RK3588,
# Jetson Orin, Graviton 2+): armv8.2-a with the int8 dot product. LLVM's `generic`
# CPU with those two features, rather than a core that has them (cortex-a55), so
# that code is tuned for no particular core (cortex-a55 is an in-order little core:
# its scheduling model would shape code for the big cores too) and the manifest
# names exactly the features it needs.
CPU_ALIASES = {"aarch64": ("aarch64-linux-gnu", "generic", ("+v8.2a", "+dotprod"))}

# Linking a library for another machine: the cross gcc, and the Debian packages of it
# and of its C library (a Recommends of the gcc, missing after --no-install-recommends).
CROSS_LINKERS = {
    "aarch64-linux-gnu": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"),
    "x86_64-linux-gnu": ("x86_64-linux-gnu-gcc", "gcc-x86-64-linux-gnu", "libc6-dev-amd64-cross"),
}


@dataclass(frozen=True)
class CompileTarget:
    """One code target of an artifact."""

    kind: str  # "llvm" | "cuda"
    triple: str = ""
    mcpu: str = ""
    arch: str = ""  # cuda: the arch TVM generates code for (the oldest of archs)
    archs: tuple[str, ...] = field(default=())  # cuda: SASS in the fatbin for each of these
    llvm_features: tuple[str, ...] = field(default=())
    name: str = ""  # llvm: the CPU as the user named it (`aarch64` is mcpu generic + mattr)
    mattr: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        return (self.name or self.mcpu) if self.kind == "llvm" else ",".join(self.archs)

    @property
    def linker(self) -> str | None:
        """The C compiler that links this library: None for this machine's default;
        a cross gcc for a library another machine runs."""
        if self.triple == host_triple():
            return None
        return CROSS_LINKERS[self.triple][0]

    @property
    def device(self) -> str:
        return "cpu" if self.kind == "llvm" else "cuda"

    def tvm_target(self):
        t = compiler()
        if self.kind == "llvm":
            attrs = {"mattr": list(self.mattr)} if self.mattr else {}
            return t.Target({"kind": "llvm", "mtriple": self.triple, "mcpu": self.mcpu, **attrs})
        return t.Target({"kind": "cuda", "arch": self.arch, "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
                         "thread_warp_size": 32, "host": {"kind": "llvm", "mtriple": self.triple}})

    def required_cpu_flags(self) -> list[str]:
        """/proc/cpuinfo flags the host must have to run this library."""
        return sorted({LLVM_TO_CPUINFO[f] for f in self.llvm_features if f in LLVM_TO_CPUINFO})

    def manifest(self) -> dict:
        out = {"kind": self.kind, "device": self.device, "triple": self.triple, "os": "linux"}
        if self.kind == "llvm":
            out.update(
                cpu=self.label,
                mcpu=self.mcpu,
                **({"mattr": list(self.mattr)} if self.mattr else {}),
                machine=self.triple.split("-")[0],
                required_cpu_flags=self.required_cpu_flags(),
            )
        else:
            newest = max(self.archs, key=arch_number)
            out.update(arch=self.arch, archs=list(self.archs), ptx="compute_" + newest.removeprefix("sm_"),
                       machine=self.triple.split("-")[0], code="fatbin")
        return out


_CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")


def arch_number(arch: str) -> int:
    return int(arch.removeprefix("sm_"))


def wgmma_ok(tg: CompileTarget) -> bool:
    """Kernels may use Hopper's sm_90a instructions (wgmma) and its 227 KB of shared memory per
    block: the target builds for sm_90 and nothing else (an sm_80 or sm_89 fatbin entry could
    not launch a block that large)."""
    return tg.kind == "cuda" and bool(tg.archs) and all(arch_number(a) == 90 for a in tg.archs)


def _cuda_target(part: str, archs: list[str]) -> CompileTarget:
    import shutil  # noqa: PLC0415

    t = compiler()
    for arch in archs:
        if arch not in _CUDA_ARCHS:
            raise CompileError(f"--target {part}: CUDA arch {arch!r} is not supported; supported: {', '.join('cuda:' + a for a in _CUDA_ARCHS)}")
    if len(set(archs)) != len(archs):
        raise CompileError(f"--target {part}: an arch is listed twice")
    if t.tvm.get_global_func("device_api.cuda", allow_missing=True) is None:
        raise CompileError(f"--target {part}: TVM's CUDA plugin is not loaded in this process (use the kiln CLI, or call kiln.compiler.cuda_stub.prepare_cuda_compile() before anything imports TVM)")
    if shutil.which("nvcc") is None:
        raise CompileError(f"--target {part}: nvcc is needed to build CUDA code and is not on PATH")
    archs = sorted(archs, key=arch_number)
    # one code generation for all: for the oldest arch, so every arch's SASS is valid
    return CompileTarget("cuda", triple=host_triple(), arch=archs[0], archs=tuple(archs))


def host_triple() -> str:
    machine = platform.machine().lower()
    if machine not in _TRIPLES:
        raise CompileError(f"host machine {machine!r} is not supported; supported: x86_64, aarch64")
    if host_os() != "linux":
        raise CompileError(f"host OS {host_os()!r} is not supported yet; supported: linux")
    return _TRIPLES[machine]


def parse_target(spec: str) -> list[CompileTarget]:
    """`llvm`, `llvm:CPU`, comma lists. Raises CompileError with the accepted forms."""
    targets = []
    parts: list[str] = []
    for p in [p.strip() for p in spec.split(",") if p.strip()]:
        if p.startswith("sm_") and parts and parts[-1].startswith("cuda:"):
            parts[-1] += "," + p  # cuda:sm_80,sm_89,sm_90 is one target
        elif ":" not in p and p not in ("llvm", "cuda") and parts and parts[-1].startswith("llvm"):
            parts.append("llvm:" + p)  # llvm:x86-64-v2,x86-64-v3,x86-64-v4: one CPU library per level
        else:
            parts.append(p)
    for part in parts:
        kind, _, arg = part.partition(":")
        if kind == "llvm":
            targets.append(_cpu_target(part, arg))
        elif kind == "cuda":
            targets.append(_cuda_target(part, arg.split(",")))
        else:
            raise CompileError(f"--target {part!r}: unknown target kind {kind!r}; use llvm, llvm:CPU (e.g. llvm:x86-64-v3)")
    if not targets:
        raise CompileError("--target is empty; use llvm or llvm:CPU")
    labels = [tg.label for tg in targets]
    if len(set(labels)) != len(labels):
        raise CompileError(f"--target {spec}: a CPU or CUDA target is named twice")
    return targets


def _cpu_target(part: str, name: str) -> CompileTarget:
    """`llvm` (this CPU), `llvm:NAME`: an alias (aarch64), or an LLVM CPU name of this
    machine's architecture or, failing that, of the other one (cross-compiled)."""
    codegen = compiler().tvm.target.codegen
    here = host_triple()
    if name in CPU_ALIASES:
        triple, mcpu, mattr = CPU_ALIASES[name]
    else:
        mcpu, mattr = name or codegen.llvm_get_system_cpu(), ()
        others = [tr for tr in dict.fromkeys(CROSS_LINKERS) if tr != here]
        triple = next((tr for tr in [here, *others] if codegen.llvm_is_valid_cpu(mcpu, tr)), None)
        if triple is None:
            raise CompileError(f"--target {part}: {mcpu!r} is not a CPU LLVM knows for {' or '.join([here, *others])} "
                               f"(try x86-64-v3, znver4, skylake-avx512, aarch64, cortex-a76, neoverse-v1)")
    tgt = compiler().Target({"kind": "llvm", "mtriple": triple, "mcpu": mcpu, **({"mattr": list(mattr)} if mattr else {})})
    feats = codegen.llvm_get_cpu_features(tgt)
    if triple.startswith("x86_64") and "64bit" not in feats:
        # a 32-bit CPU (pentium, i686, ...) is a valid LLVM name for the triple, but
        # LLVM aborts the whole process building 64-bit code for it
        raise CompileError(f"--target {part}: {mcpu!r} is a 32-bit CPU; kiln builds x86-64 code "
                           f"(try x86-64, x86-64-v3, znver4, skylake-avx512)")
    out = CompileTarget("llvm", triple=triple, mcpu=mcpu, llvm_features=tuple(sorted(feats)),
                        name=name if name in CPU_ALIASES else "", mattr=mattr)
    check_linker(part, out)
    return out


def check_linker(part: str, tg: CompileTarget) -> None:
    """A library for another machine is linked by its cross gcc: refuse early, naming the
    package, when it is not installed."""
    import os  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    cc = tg.linker
    if cc is None:
        return
    _, gcc_pkg, libc_pkg = CROSS_LINKERS[tg.triple]
    machine = tg.triple.split("-")[0]
    if shutil.which(cc) is None:
        raise CompileError(f"--target {part}: cross-compiling for {machine} needs the linker {cc}, not on PATH "
                           f"(Debian/Ubuntu: apt-get install {gcc_pkg})")
    found = subprocess.run([cc, "-print-file-name=crti.o"], capture_output=True, text=True, check=False).stdout.strip()
    if not os.path.isabs(found):  # gcc echoes the bare name when it has no C library to link against
        raise CompileError(f"--target {part}: {cc} has no C library for {machine} to link with "
                           f"(Debian/Ubuntu: apt-get install {libc_pkg})")


def library_path(tg: CompileTarget, targets) -> str:
    """The artifact's library for tg: lib/cpu.so, lib/cuda.so; lib/cpu-MCPU.so when the
    artifact holds several CPU levels (the runtime picks the best the host runs)."""
    shared = sum(1 for t in targets if t.device == tg.device) > 1
    return f"lib/{tg.device}-{tg.label}.so" if shared else f"lib/{tg.device}.so"
