"""What this machine can run: OS, CPU flags. No TVM import (cheap, checkable first)."""

from __future__ import annotations

import platform
import sys

# LLVM feature name -> /proc/cpuinfo flag, for the ISA extensions generated code uses.
LLVM_TO_CPUINFO = {
    "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt",
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
    "movbe": "movbe", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq",
    "avx512vl": "avx512vl", "avx512cd": "avx512cd", "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16", "avx512vnni": "avx512_vnni", "avx512vbmi": "avx512vbmi",
    "avxvnni": "avx_vnni", "amx-tile": "amx_tile", "amx-bf16": "amx_bf16",
    "neon": "asimd", "fullfp16": "asimdhp", "dotprod": "asimddp", "sve": "sve", "i8mm": "i8mm", "bf16": "bf16",
}


def host_os() -> str:
    return "linux" if sys.platform.startswith("linux") else sys.platform


def host_machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def host_cpu_flags() -> set[str]:
    """Flags from /proc/cpuinfo ('flags' on x86, 'Features' on arm)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()
