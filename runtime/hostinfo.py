"""What this machine can run: OS, CPU flags. No TVM import (cheap, checkable first)."""

from __future__ import annotations

import platform
import struct
import sys

# LLVM feature name -> /proc/cpuinfo flag, for the ISA extensions generated code uses.
LLVM_TO_CPUINFO = {
    "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt",
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
    "movbe": "movbe", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq",
    "avx512vl": "avx512vl", "avx512cd": "avx512cd", "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16", "avx512vnni": "avx512_vnni", "avx512vbmi": "avx512vbmi",
    "avxvnni": "avx_vnni", "amx-tile": "amx_tile", "amx-bf16": "amx_bf16",
    # aarch64: the ISA features LLVM may use in generated code, named as the kernel's hwcaps
    "neon": "asimd", "fp-armv8": "fp", "fullfp16": "asimdhp", "dotprod": "asimddp", "rdm": "asimdrdm",
    "lse": "atomics", "rcpc": "lrcpc", "fp16fml": "asimdfhm", "complxnum": "fcma", "jsconv": "jscvt",
    "sve": "sve", "sve2": "sve2", "i8mm": "i8mm", "bf16": "bf16",
}

# arm64 hwcap bits, in order (linux arch/arm64/include/uapi/asm/hwcap.h): the names
# /proc/cpuinfo prints under "Features".
_HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop "
          "sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
_HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 "
           "i8mm bf16 dgh rng bti").split()
_AT_HWCAP, _AT_HWCAP2 = 16, 26


def host_os() -> str:
    return "linux" if sys.platform.startswith("linux") else sys.platform


def host_machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def host_cpu_flags() -> set[str]:
    """x86: the flags of /proc/cpuinfo. aarch64: the kernel's hwcaps from /proc/self/auxv
    (the same names /proc/cpuinfo prints under 'Features'; under qemu-user, /proc/cpuinfo
    is the x86 host's, while auxv is the emulated CPU's), else /proc/cpuinfo's Features."""
    key = "flags"
    if host_machine() == "aarch64":
        caps = _aarch64_hwcaps()
        if caps:
            return caps
        key = "Features"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                k, _, value = line.partition(":")
                if k.strip() == key:
                    return set(value.split())
    except OSError:
        pass
    return set()


def _aarch64_hwcaps() -> set[str]:
    try:
        with open("/proc/self/auxv", "rb") as f:
            raw = f.read()
    except OSError:
        return set()
    return hwcaps_from_auxv(raw)


def hwcaps_from_auxv(raw: bytes) -> set[str]:
    """The arm64 hwcap names set in an auxiliary vector (pairs of native uint64: type, value)."""
    aux = dict(struct.iter_unpack("=QQ", raw[: len(raw) // 16 * 16]))
    hw, hw2 = aux.get(_AT_HWCAP, 0), aux.get(_AT_HWCAP2, 0)
    return {n for i, n in enumerate(_HWCAP) if hw >> i & 1} | {n for i, n in enumerate(_HWCAP2) if hw2 >> i & 1}
