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

# Serving limits of this runtime, recorded in the manifests it writes (`serving`): sequences one session
# runs at once, and the prompt tokens a prefill call takes by default per device (load(prefill_chunk=...)).
MAX_SEQUENCES = 4096
PREFILL_CHUNK = {"cpu": 1024, "cuda": 2048}

REQUIRED_FIELDS = ("magic", "format_version", "kiln_version", "tvm_version", "runtime_abi", "model", "dtype",
                   "targets", "params", "files", "kv_cache", "manifest_sha256")
# "kind": absent for language models; "graph" for a general graph (ONNX, issue 18:
# runtime/graph.py), whose library has main(*inputs, *params) and no KV cache
GRAPH_KIND = "graph"
GRAPH_REQUIRED_FIELDS = ("magic", "format_version", "kiln_version", "tvm_version", "runtime_abi", "kind", "model", "graph",
                         "targets", "params", "files", "manifest_sha256")


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
    kind = manifest.get("kind")
    if kind not in (None, GRAPH_KIND):
        raise ArtifactError(f"{path}: artifact kind {kind!r}; this runtime runs language models and {GRAPH_KIND!r} artifacts: use a newer kiln")
    missing = [f for f in (GRAPH_REQUIRED_FIELDS if kind == GRAPH_KIND else REQUIRED_FIELDS) if f not in manifest]
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
    if m.get("kind") == GRAPH_KIND:
        g = m["graph"]
        need(isinstance(m["model"], dict) and isinstance(g, dict) and isinstance(g.get("function"), str), "'graph'")
        for key in ("inputs", "outputs"):
            need(isinstance(g.get(key), list) and all(
                isinstance(x, dict) and isinstance(x.get("name"), str) and isinstance(x.get("dtype"), str) and isinstance(x.get("shape"), list)
                and all(isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0) for d in x["shape"])
                for x in g[key]), f"'graph.{key}'")
        return
    need(isinstance(m["model"], dict) and isinstance(m["model"].get("config"), dict), "'model'")
    tp = m.get("tensor_parallel")
    if tp is not None:
        files = tp.get("weights_files") if isinstance(tp, dict) else None
        need(isinstance(tp, dict) and _pos_int(tp.get("size")) and tp["size"] >= 2 and isinstance(tp.get("ccl_library"), str)
             and (files is None or (isinstance(files, list) and len(files) == tp["size"] and all(isinstance(f, str) for f in files))),
             "'tensor_parallel' (size >= 2, ccl_library, one weights file per shard)")
    kv = m["kv_cache"]
    need(isinstance(kv, dict) and all(_pos_int(kv.get(k)) for k in ("max_seq_len", "page_size")), "'kv_cache'")
    need(kv.get("kind", "paged") in ("paged", "kiln-quant", "kiln-mla"), "'kv_cache.kind'")
    if kv.get("kind") == "kiln-mla":  # the latent cache of multi-head latent attention
        need(kv.get("code_dtype") in ("int8", "uint8", "float16", "bfloat16", "float32") and all(_pos_int(kv.get(k)) for k in ("num_layers", "latent_dim")),
             "'kv_cache' (latent: code_dtype, num_layers, latent_dim)")
    if kv.get("kind") == "kiln-quant":  # kiln's quantized cache: the runtime allocates it from these
        need(kv.get("code_dtype") in ("int8", "uint8", "float16", "bfloat16") and all(_pos_int(kv.get(k)) for k in ("num_layers", "num_kv_heads", "head_dim")),
             "'kv_cache' (quantized: code_dtype, num_layers, num_kv_heads, head_dim)")


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1
