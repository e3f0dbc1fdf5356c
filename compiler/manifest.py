"""The manifest a build writes (its reader and checks: runtime/manifest.py)."""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..runtime.dtypes import itemsize
from ..passes.kernels.mla import latent_format, latent_width
from ..runtime.manifest import FORMAT_VERSION, MAGIC, MAX_SEQUENCES, PREFILL_CHUNK, RUNTIME_ABI
from ..tvm_compat import compiler


def make_manifest(m, *, page_size: int, no_weights: bool, built, quality: dict | None) -> dict:
    """m: build.Model; built: stages.Built; quality: the gate's measurement (None: not measured)."""
    config, plan, kv_fmt = m.config, m.plan, m.kv_fmt
    compute = m.precision(m.targets[0]).compute
    # TVM's cache: K/V in the activations' dtype; kiln's cache: codes + an fp32 scale per row
    kv_heads = m.graph_config.num_key_value_heads  # per GPU when the model is split over several
    if m.family.latent_cache:  # one latent row per token and layer (passes/kernels/mla.py), codes + an fp32 scale
        latent = latent_format(kv_fmt, compute)
        c, width = config, latent_width(config)
        kv_cache = {"kind": "kiln-mla", "dtype": latent.name, "code_dtype": latent.code_dtype, "scale_dtype": "float32",
                    "latent_dim": width, "bytes_per_token": c.num_hidden_layers * latent.bytes_per_row(width),
                    # what per-head K and V of the same model would take, at the activations' width
                    "per_head_kv_bytes_per_token": c.num_hidden_layers * c.num_attention_heads * itemsize(compute)
                    * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)}
    else:
        row_bytes = kv_fmt.bytes_per_row(config.head_dim) if kv_fmt is not None else config.head_dim * itemsize(compute)
        kv_cache = {"kind": "paged" if kv_fmt is None else "kiln-quant", "dtype": compute if kv_fmt is None else kv_fmt.name,
                    **({} if kv_fmt is None else {"code_dtype": kv_fmt.code_dtype, "scale_dtype": "float32"}),
                    "bytes_per_token": 2 * config.num_hidden_layers * kv_heads * row_bytes}
    return {
        "magic": MAGIC,
        "format_version": FORMAT_VERSION,
        "kiln_version": __version__,
        "tvm_version": compiler().version,
        "runtime_abi": RUNTIME_ABI,
        "model": {
            "architecture": config.architecture,
            "config": json.loads(json.dumps(config.to_dict(), default=list)),
            "source": Path(m.ck.source).name,
            "source_format": m.ck.format,
            "source_dtypes": sorted(set(m.ck.tensor_dtypes.values())),
            "num_params": built.num_params,
            **({"num_active_params": config.active_params(built.num_params)} if config.num_experts else {}),
        },
        "dtype": m.dtype,  # storage; each target entry says its compute dtype
        "quant": ({**plan.describe(), "quality": quality, "matrices": built.imported, "calibrated": getattr(m, "importance", None) is not None}
                  if plan is not None else "none"),
        "kv_quant": ({"format": kv_fmt.name, "quality": quality if plan is None else "see quant.quality"} if kv_fmt is not None else "none"),
        "targets": built.libraries,
        "params": built.params,
        "weights_file": None if no_weights or built.tensor_parallel else "weights.safetensors",
        **({"tensor_parallel": built.tensor_parallel} if built.tensor_parallel else {}),
        "kv_cache": {
            **kv_cache,
            "page_size": page_size,
            "max_seq_len": m.max_ctx,
            # sliding-window layers (Model.windowed): the in-chunk prefill kernel is not windowed, so a
            # prefill call holds at most window - 1 tokens of a sequence (runtime/session.py)
            **({"window": config.sliding_window, "max_prefill_chunk": config.sliding_window - 1} if m.windowed else {}),
            "num_layers": config.num_hidden_layers,
            "num_kv_heads": 1 if m.family.latent_cache else kv_heads,
            "head_dim": latent_width(config) if m.family.latent_cache else config.head_dim,
        },
        # what a server may run of it (each target says whether it has decode_batch): sequences at once, prompt tokens
        # per prefill call by default (load's prefill_chunk; a windowed model's calls hold at most window - 1)
        "serving": {"max_sequences": MAX_SEQUENCES, "tokens_per_step": {d: PREFILL_CHUNK[d] for d in sorted({t.device for t in m.targets})},
                    **({"max_tokens_per_step": config.sliding_window - 1} if m.windowed else {})},
        "tokenizer": built.tokenizer,
        "eos_token_ids": list(config.eos_token_ids),
        "bos_token_id": config.bos_token_id,
    }
