"""Open an artifact: check everything before any code is loaded.

Order: manifest (format version, self-hash, ABI) -> this machine (OS, CPU,
TVM version) -> sha256 of every file -> only then the library is handed to TVM.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ArtifactError
from . import manifest as mf
from .dtypes import SAFETENSORS_CODES, itemsize
from .manifest import GRAPH_KIND
from .hostinfo import host_cpu_flags, host_machine, host_os



@dataclass
class Artifact:
    path: Path
    manifest: dict
    hashes_verified: bool = False  # every file's sha256 checked against the manifest (open_artifact)

    def target_for(self, device: str, cpu: str | None = None) -> dict:
        """The target entry to load for `device`. An artifact with several CPU levels
        (--target llvm:x86-64-v2,x86-64-v3,x86-64-v4, or x86 and aarch64 libraries side
        by side) gives, of this machine's architecture, the level with the most required
        CPU flags that this host has, or the one named `cpu` (see cpu_name)."""
        cands = [t for t in self.manifest["targets"] if t["device"] == device]
        if not cands:
            have = ", ".join(t["device"] for t in self.manifest["targets"])
            raise ArtifactError(f"{self.path}: artifact has no code for device {device!r} (it has: {have}); recompile with a matching --target")
        if cpu is not None:
            named = [t for t in cands if cpu_name(t) == cpu]
            if not named:
                levels = ", ".join(str(cpu_name(t)) for t in cands)
                raise ArtifactError(f"{self.path}: has no {device} library for {cpu!r} (it has: {levels})")
            return named[0]
        mine = [t for t in cands if t.get("machine", host_machine()) == host_machine()]
        cands = mine or cands  # none: check_host says which machine the code is for
        if len(cands) == 1:
            return cands[0]
        have = host_cpu_flags()
        fits = [t for t in cands if not have or set(t.get("required_cpu_flags", [])) <= have]
        if not fits:  # the least demanding level: check_host names what this CPU lacks
            return min(cands, key=lambda t: len(t.get("required_cpu_flags", [])))
        return max(fits, key=lambda t: len(t.get("required_cpu_flags", [])))

    def file(self, rel: str) -> Path:
        return self.path / rel

    def describe(self) -> list[str]:
        """What `kiln inspect` prints, one line per item: versions, model, params
        and quantization (with its measured quality), targets, KV cache,
        tokenizer, files with their sizes and hashes."""
        m = self.manifest
        if m.get("kind") == GRAPH_KIND:
            return self._describe_graph()
        c = m["model"]["config"]
        lines = [f"{self.path}: kiln artifact v{m['format_version']} (kiln {m['kiln_version']}, TVM {m['tvm_version']}, runtime ABI {m['runtime_abi']})",
                 f"  model    {m['model']['architecture']} from {m['model']['source']} ({m['model']['source_format']}): "
                 f"{c['num_hidden_layers']} layers, dim {c['hidden_size']}, heads {c['num_attention_heads']}/{c['num_key_value_heads']}, vocab {c['vocab_size']}"]
        q = m.get("quant", "none")
        qname = q["weights"] if isinstance(q, dict) else q
        lines.append(f"  params   {m['model']['num_params'] / 1e6:.2f}M  dtype {m['dtype']}  quant {qname}  ({len(m['params'])} tensors)")
        if m["model"].get("num_active_params") is not None:  # mixture of experts: what one token reads
            from .bench import weight_bytes_per_token  # noqa: PLC0415  (the count kiln bench divides by)

            lines.append(f"  active   {m['model']['num_active_params'] / 1e6:.2f}M params per token (experts it is not routed to are skipped), "
                         f"{_size(weight_bytes_per_token(m))} of weights read per decoded token")
        if isinstance(q, dict):
            lines.append("  quant    " + ", ".join(f"{r} {f}" for r, f in q.get("roles", {}).items()))
            if q.get("layers"):  # --quant gguf: the layers whose formats differ from the roles above
                lines.append("  layers   " + "; ".join(f"{i}: " + ", ".join(f"{r} {f}" for r, f in t.items()) for i, t in q["layers"].items()))
            qual = q.get("quality")
            if qual:
                lines.append(f"  quality  mean KLD {qual['mean_kld']:.5f}, top-1 {100 * qual['top1_agreement']:.2f}%, perplexity {qual['perplexity']:.3f} "
                             f"(float {qual['ref_perplexity']:.3f}) over {qual['tokens']} tokens of {qual['text']} ({qual['measured_on']})")
            else:
                lines.append("  quality  not measured")
        cpus = [t for t in m["targets"] if t["device"] == "cpu"]
        here = self.target_for("cpu") if len(cpus) > 1 else None
        if here is not None and here.get("machine") != host_machine():
            here = None
        for t in m["targets"]:
            if t["kind"] == "cuda":  # SASS per arch (+ PTX the driver can JIT for newer GPUs)
                archs = ",".join(t.get("archs") or [t.get("arch", "")])
                desc = f"cuda {archs}" + (f" + PTX {t['ptx']}" if t.get("ptx") else "") + f", compute {t.get('compute_dtype', '?')}, host {t['triple']}"
            else:
                desc = f"{t['kind']} {cpu_name(t)} {t['triple']}" + (f" (mcpu {t['mcpu']} {','.join(t['mattr'])})" if t.get("mattr") else "")
            flags = t.get("required_cpu_flags")
            mark = "  <- this host loads it" if t is here else ""
            lines.append(f"  target   {t['device']}: {desc}" + (f"  needs {' '.join(flags)}" if flags else "") + mark)
        tp = m.get("tensor_parallel")
        if tp:  # split over GPUs: each shard's slice of the heads and FFN, its own weights file
            n = tp["size"]
            lines.append(f"  parallel tensor, {n} shards (one worker and GPU each): heads {c['num_attention_heads'] // n}/"
                         f"{max(c['num_key_value_heads'] // n, 1)}, FFN {c['intermediate_size'] // n}, vocab rows {-(-c['vocab_size'] // n)} "
                         f"per shard; collectives {tp['ccl_library']}; the KV cache below is per shard")
        sv = m.get("serving")
        if isinstance(sv, dict):  # (artifacts from 2026-12-02 on)
            batch = [t["device"] for t in m["targets"] if t.get("decode_batch")]
            steps = ", ".join(f"{n} on {d}" for d, n in sv.get("tokens_per_step", {}).items())
            lines.append(f"  serving  {'decode_batch on ' + ', '.join(dict.fromkeys(batch)) if batch else 'one decode call per sequence'}; "
                         f"up to {sv.get('max_sequences')} sequences; prompt tokens per step {steps} by default"
                         + (f" (at most {sv['max_tokens_per_step']})" if sv.get("max_tokens_per_step") else ""))
        kv = m["kv_cache"]
        full = kv["bytes_per_token"] * kv["max_seq_len"]
        lines.append(f"  kv cache {kv['kind']} {kv['dtype']}, page {kv['page_size']}, {kv['bytes_per_token'] / 1024:.1f} KiB/token "
                     f"({kv['bytes_per_token']} bytes), {full / 2**20:.1f} MiB at the max context of {kv['max_seq_len']} tokens")
        if kv.get("kind") == "kiln-mla":  # latent rows instead of per-head K and V
            lines.append(f"           one latent row of {kv['latent_dim']} per token and layer; per-head K and V would take "
                         f"{kv['per_head_kv_bytes_per_token'] / 1024:.1f} KiB/token")
        kq = m.get("kv_quant")
        if isinstance(kq, dict) and isinstance(kq.get("quality"), dict):
            q = kq["quality"]
            lines.append(f"  kv quality mean KLD {q['mean_kld']:.5f}, top-1 {100 * q['top1_agreement']:.2f}% vs float32 ({q['tokens']} tokens of {q['text']})")
        tok = m.get("tokenizer")
        lines.append(f"  tokenizer {'yes' + (' + chat template' if tok.get('chat_template') else '') if tok else 'none (use --tokens)'}")
        for rel, info in m["files"].items():
            lines.append(f"  file     {rel:24s} {info['size'] / 2**20:9.2f} MiB  sha256 {info['sha256'][:16]}…")
        lines.append("  hashes   verified" if self.hashes_verified else "  hashes   not checked")
        return lines


    def _describe_graph(self) -> list[str]:
        m = self.manifest
        src = m["model"]
        lines = [f"{self.path}: kiln graph artifact v{m['format_version']} (kiln {m['kiln_version']}, TVM {m['tvm_version']}, runtime ABI {m['runtime_abi']})",
                 f"  model    {src.get('source')} ({src.get('source_format')}, opset {src.get('opset')}, {src.get('producer') or 'unknown producer'}): "
                 f"{src.get('nodes')} nodes, {src.get('folded_nodes', 0)} folded at compile time"]
        lines.append(f"  params   {src.get('num_params', 0) / 1e6:.3f}M  dtype {m.get('dtype')}  ({len(m['params'])} tensors)")
        q = m.get("quant", "none")
        if isinstance(q, dict):
            qual = q.get("quality")
            lines.append(f"  quant    {q['weights']}: {q['matrices']} matrices (matmul / Gemm / Conv weights); "
                         + (f"worst output relative L2 error {qual['worst_rel_l2']:.3g} vs float on {qual['inputs']}" if isinstance(qual, dict)
                            else "quality not measured"))
        for key in ("inputs", "outputs"):
            for x in m["graph"][key]:
                shape = "[" + ", ".join(str(d) for d in x["shape"]) + "]"
                lines.append(f"  {key[:-1]:8s} {x['name']}: {x['dtype']} {shape}")
        ops = src.get("ops") or {}
        if ops:
            lines.append("  ops      " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])))
        for t in m["targets"]:
            flags = t.get("required_cpu_flags")
            lines.append(f"  target   {t['device']}: {t['kind']} {t.get('mcpu') or ','.join(t.get('archs') or [])} {t['triple']}"
                         + (f"  needs {' '.join(flags)}" if flags else ""))
        for rel, info in m["files"].items():
            lines.append(f"  file     {rel:24s} {info['size'] / 2**20:9.2f} MiB  sha256 {info['sha256'][:16]}…")
        lines.append("  hashes   verified" if self.hashes_verified else "  hashes   not checked")
        return lines


def cpu_name(target: dict) -> str | None:
    """A CPU library's name as given to --target (`x86-64-v3`, `aarch64`, `cortex-a76`);
    LLVM's mcpu in artifacts older than the `cpu` key."""
    return target.get("cpu") or target.get("mcpu")


def _safe_rel(root: Path, rel: str) -> Path:
    p = (root / rel).resolve()
    if not str(p).startswith(str(root.resolve()) + os.sep):
        raise ArtifactError(f"{root}: manifest names a file outside the artifact: {rel!r}")
    return p


def open_artifact(path: str | Path, device: str | None = "cpu", verify_hashes: bool = True, cpu: str | None = None) -> Artifact:
    """device=None: inspect only (no check that this machine can run it); cpu: a CPU
    level of the artifact to check for (default: the best this host runs)."""
    root = Path(path)
    mpath = root / mf.MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(f"{root}: not an artifact directory (compile one with `kiln compile MODEL -o {root}`)")
    try:
        size = mpath.stat().st_size
        if size > mf.MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{mpath}: manifest is {size} bytes, over the {mf.MAX_MANIFEST_BYTES} limit")
        raw = mpath.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{root}: no manifest.json (an incomplete or foreign directory, not a kiln artifact)") from None
    manifest = mf.parse(raw, str(mpath))
    art = Artifact(root, manifest)
    if device is not None:
        check_host(art, device, cpu)
    check_covered(art)
    if verify_hashes:
        for rel, info in manifest["files"].items():
            verify_file(root, rel, info)
        art.hashes_verified = True
    return art


def check_host(art: Artifact, device: str, cpu: str | None = None) -> None:
    """Refuse an artifact built for another machine, before loading its code. The machine
    (OS, architecture, CPU features) first: that needs no TVM import, seconds on a small
    board or under emulation."""
    from ..tvm_compat import runtime  # noqa: PLC0415  (imports TVM runtime only)

    m = art.manifest
    tgt = art.target_for(device, cpu)
    if tgt.get("os", "linux") != host_os():
        raise ArtifactError(f"{art.path}: built for {tgt.get('os')}, this machine runs {host_os()}: recompile on/for {host_os()}")
    machine = tgt.get("machine")
    if machine != host_machine():
        here = [cpu_name(t) for t in m["targets"] if t["device"] == device and t.get("machine") == host_machine()]
        if cpu is not None and here:  # a multi-machine artifact, asked for the other machine's library
            raise ArtifactError(f"{art.path}: its {device} library {cpu!r} is for {machine}, this machine is {host_machine()}: "
                                f"choose one of {', '.join(map(str, here))}")
        names = [cpu_name(t) for t in m["targets"] if device == "cpu" == t["device"] and t.get("machine") == machine]
        what = machine + (f" (CPU {', '.join(map(str, names))})" if names else "")
        raise ArtifactError(f"{art.path}: built for {what}, this machine is {host_machine()}: recompile with --target llvm "
                            f"(this CPU), or run it on {machine} (kiln bundle --platform linux-{machine})")
    if device == "cpu":
        have = host_cpu_flags()
        missing = sorted(set(tgt.get("required_cpu_flags", [])) - have) if have else []
        if missing:
            older = {"aarch64": "llvm:cortex-a72 (armv8.0-a)"}.get(machine, "llvm:x86-64-v2")
            raise ArtifactError(
                f"{art.path}: built for CPU {cpu_name(tgt)} which needs {', '.join(missing)}, not on this CPU: "
                f"recompile with --target llvm (this CPU) or an older one such as --target {older}"
            )
    tvm_here = runtime().version
    if m["tvm_version"] != tvm_here:
        raise ArtifactError(f"{art.path}: built with TVM {m['tvm_version']}, this runtime has TVM {tvm_here}: recompile with this kiln/TVM")


def loaded_files(manifest: dict) -> list[str]:
    """Every file the runtime will read: libraries, weights, tokenizer."""
    rels = [t["library"] for t in manifest["targets"]]
    weights = manifest.get("weights_file", "weights.safetensors")
    if weights is not None:  # None: compiled with --no-weights (random weights at load)
        rels.append(weights)
    tp = manifest.get("tensor_parallel")
    if tp is not None:  # a split model: the collective plugin and each shard's weights
        files = tp.get("weights_files") if isinstance(tp, dict) else None
        rels += [tp.get("ccl_library") if isinstance(tp, dict) else None, *(files if isinstance(files, list) else [])]
    tok = manifest.get("tokenizer")
    if tok:
        rels.append(tok.get("file") if isinstance(tok, dict) else None)
    return rels


def check_covered(art: Artifact) -> None:
    """Each file that will be loaded must be inside the artifact and hashed by the manifest.

    Without this a manifest could point the runtime at a file its hash check never saw.
    """
    files = art.manifest["files"]
    for rel in loaded_files(art.manifest):
        if not isinstance(rel, str) or rel not in files:
            raise ArtifactError(f"{art.path}: manifest names {rel!r} to load but lists no hash for it: the artifact is corrupt: recompile it")
        _safe_rel(art.path, rel)


def verify_file(root: Path, rel: str, info: dict) -> None:
    p = _safe_rel(root, rel)
    sha = hashlib.sha256()
    size = 0
    try:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                sha.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise ArtifactError(f"{root}: file {rel} listed in the manifest is missing") from None
    if size != info.get("size", size) or sha.hexdigest() != info["sha256"]:
        raise ArtifactError(f"{root}: {rel} fails its sha256 check (corrupted or modified): recompile or re-copy the artifact")


def read_weights(art: Artifact, rel: str | None = None) -> list[tuple[dict, np.ndarray]]:
    """Memory-map the packed weights (rel: a tensor-parallel shard's file; default the
    artifact's one weights file); returns (param spec, array view) in manifest order.

    The file was hashed already; here the header must agree with the manifest's
    param spec exactly (name, shape, dtype, order).
    """
    path = _safe_rel(art.path, rel or art.manifest.get("weights_file", "weights.safetensors"))
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > min(100 << 20, size - 8):
            raise ArtifactError(f"{path}: weights header length {n} does not fit the file ({size} bytes): recompile the model")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ArtifactError(f"{path}: weights header is not valid JSON: recompile the model") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: weights header is not a JSON object: recompile the model")
    base = 8 + n
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = []
    for spec in art.manifest["params"]:
        ent = header.get(spec["name"])
        code = SAFETENSORS_CODES.get(spec["dtype"])
        size = itemsize(spec["dtype"]) if code else 0
        if (not isinstance(ent, dict) or code is None or ent.get("dtype") != code
                or ent.get("shape") != list(spec["shape"])):
            raise ArtifactError(f"{path}: param {spec['name']} does not match the manifest's spec {spec['dtype']}{list(spec['shape'])}")
        offs = ent.get("data_offsets")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise ArtifactError(f"{path}: param {spec['name']} has malformed data_offsets")
        start, end = offs
        if not 0 <= start <= end <= data.size - base:
            raise ArtifactError(f"{path}: param {spec['name']} lies outside the file")
        if end - start != math.prod(spec["shape"]) * size:
            raise ArtifactError(f"{path}: param {spec['name']} spans {end - start} bytes, shape {list(spec['shape'])} x {size} needs {math.prod(spec['shape']) * size}")
        out.append((spec, data[base + start : base + end]))
    return out


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.2f} MB"
