"""The artifact's manifest: format constants, its self-hash, and its checks.

Lives in runtime/ because the runtime must check it before loading code; the
compiler imports these constants to write it (never the other way round).

Artifact layout (a directory, conventionally NAME.kiln/):
    manifest.json          written last; describes and hashes everything below
    lib/cpu.so             compiled model code (TVM Relax VM executable) per device
    weights.safetensors    packed params, in the order of manifest["params"]
    tokenizer.json         optional; HF tokenizers format
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..errors import ArtifactError

MAGIC = "kiln-artifact"
FORMAT_VERSION = 1
RUNTIME_ABI = 1  # bump when the runtime <-> library calling convention changes
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20

REQUIRED_FIELDS = ("magic", "format_version", "kiln_version", "tvm_version", "runtime_abi", "model", "dtype",
                   "targets", "params", "files", "kv_cache", "manifest_sha256")


def canonical_bytes(manifest: dict) -> bytes:
    """The bytes the self-hash covers: the manifest without its own hash, canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def seal(manifest: dict) -> dict:
    out = dict(manifest)
    out["manifest_sha256"] = hashlib.sha256(canonical_bytes(out)).hexdigest()
    return out


def parse(raw: bytes, path: str) -> dict:
    """Parse and check a manifest's structure, versions and self-hash."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ArtifactError(f"{path}: manifest is not valid JSON ({err}); the artifact is corrupt: recompile it") from None
    if not isinstance(manifest, dict) or manifest.get("magic") != MAGIC:
        raise ArtifactError(f"{path}: not a kiln artifact manifest (magic {MAGIC!r} missing)")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version!r}, this runtime reads version {FORMAT_VERSION}: "
            f"recompile the model with this kiln, or use a kiln whose runtime reads version {version!r}"
        )
    missing = [f for f in REQUIRED_FIELDS if f not in manifest]
    if missing:
        raise ArtifactError(
            f"{path}: manifest says format version {version!r} (this runtime reads version {FORMAT_VERSION}) "
            f"but lacks fields {', '.join(missing)}: the artifact is incomplete or corrupt: recompile the model"
        )
    expect = hashlib.sha256(canonical_bytes(manifest)).hexdigest()
    if manifest["manifest_sha256"] != expect:
        raise ArtifactError(f"{path}: manifest hash mismatch (the manifest was modified or corrupted): recompile the model")
    abi = manifest.get("runtime_abi")
    if abi != RUNTIME_ABI:
        raise ArtifactError(f"{path}: artifact needs runtime ABI {abi!r}, this runtime has ABI {RUNTIME_ABI}: recompile with this kiln")
    _check_types(manifest, path)
    return manifest


def _check_types(m: dict[str, Any], path: str) -> None:
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ArtifactError(f"{path}: manifest field {what} is malformed")

    need(isinstance(m["files"], dict) and all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in m["files"].values()), "'files'")
    need(isinstance(m["params"], list) and all(isinstance(p, dict) and {"name", "shape", "dtype"} <= set(p) for p in m["params"]), "'params'")
    need(isinstance(m["targets"], list) and len(m["targets"]) > 0 and all(
        isinstance(t, dict) and isinstance(t.get("device"), str) and isinstance(t.get("library"), str)
        and isinstance(t.get("required_cpu_flags", []), list) and all(isinstance(f, str) for f in t.get("required_cpu_flags", []))
        for t in m["targets"]), "'targets'")
    need(isinstance(m["tvm_version"], str), "'tvm_version'")
    need(isinstance(m["model"], dict) and isinstance(m["model"].get("config"), dict), "'model'")
    kv = m["kv_cache"]
    need(isinstance(kv, dict) and all(_pos_int(kv.get(k)) for k in ("max_seq_len", "page_size")), "'kv_cache'")
    need(kv.get("kind", "paged") in ("paged", "kiln-quant"), "'kv_cache.kind'")
    if kv.get("kind") == "kiln-quant":  # kiln's quantized cache: the runtime allocates it from these
        need(kv.get("code_dtype") in ("int8", "uint8", "float16", "bfloat16") and all(_pos_int(kv.get(k)) for k in ("num_layers", "num_kv_heads", "head_dim")),
             "'kv_cache' (quantized: code_dtype, num_layers, num_kv_heads, head_dim)")


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1
