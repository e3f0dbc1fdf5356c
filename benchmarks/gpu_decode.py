"""kiln vs torch peers on one GPU, side by side in one run: batch-1 greedy decode
tok/s, GB/s, share of the copy-bandwidth bound, and time to first token.

    python benchmarks/gpu_decode.py --kiln gb/kiln \\
        --shape l8b=benchmarks/shapes/llama3-8b.json:gb/l8b.kiln \\
        --shape l1b=benchmarks/shapes/llama3.2-1b.json:gb/l1b.kiln \\
        [--prompt-len 128 --gen-len 128 --ttft-len 2048 --context 32768 --rounds 2] [--json OUT]

Every model runs on random weights of the shape's config (bf16), so nothing big
travels. Peers, all in this process:
  gptfast  a gpt-fast-style Llama written here in torch: fused wqkv / w13, static
           KV cache, decode step under torch.compile(mode="reduce-overhead",
           fullgraph=True) (CUDA graphs); prefill eager with SDPA (flash) on the prompt.
  hf       transformers' LlamaForCausalLM, eager, DynamicCache, manual greedy loop.
  gptfast-int4  gptfast with every linear on torch's int4 tinygemm kernel (_weight_int4pack_mm, groups
           of 128: gpt-fast's int4 weight-only mode), the peer of kiln's --quant q4g128.
kiln runs as a subprocess (`KILN bench ART --device cuda --random-weights --json`),
since its runtime is the shipped bundle (TVM runtime only), not this torch process.
Rounds interleave kiln and peers so drift in clocks hits all alike.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------- the gpt-fast-style peer
class Block(nn.Module):
    def __init__(self, c: dict, max_seq: int, dtype):
        super().__init__()
        d, h, kv, hd = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        self.h, self.kv, self.hd = h, kv, hd
        self.wqkv = nn.Linear(d, (h + 2 * kv) * hd, bias=False)
        self.wo = nn.Linear(h * hd, d, bias=False)
        self.qk_norm = str(c.get("model_type", "")).startswith("qwen3")  # Qwen3: RMSNorm of q and k per head
        if self.qk_norm:
            self.nq, self.nk = nn.Parameter(torch.ones(hd)), nn.Parameter(torch.ones(hd))
        self.moe = MoE(c) if moe_dims(c) else None
        if self.moe is None:
            self.w13 = nn.Linear(d, 2 * c["intermediate_size"], bias=False)
            self.w2 = nn.Linear(c["intermediate_size"], d, bias=False)
        self.n1 = nn.Parameter(torch.ones(d))
        self.n2 = nn.Parameter(torch.ones(d))
        self.eps = c["rms_norm_eps"]
        self.register_buffer("k_cache", torch.zeros(1, kv, max_seq, hd, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(1, kv, max_seq, hd, dtype=dtype), persistent=False)

    def norm(self, x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * w

    def forward(self, x, cos, sin, pos, mask):
        b, t, _ = x.shape
        qkv = self.wqkv(self.norm(x, self.n1))
        q, k, v = qkv.split([self.h * self.hd, self.kv * self.hd, self.kv * self.hd], dim=-1)
        q, k = q.view(b, t, self.h, self.hd), k.view(b, t, self.kv, self.hd)
        if self.qk_norm:
            q, k = self.norm(q, self.nq), self.norm(k, self.nk)
        q = rope(q, cos, sin).transpose(1, 2)
        k = rope(k, cos, sin).transpose(1, 2)
        v = v.view(b, t, self.kv, self.hd).transpose(1, 2)
        self.k_cache[:, :, pos] = k
        self.v_cache[:, :, pos] = v
        if mask is None:  # prefill from position 0: attend to the prompt only (flash path)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
        x = x + self.wo(y.transpose(1, 2).reshape(b, t, -1))
        if self.moe is not None:
            return x + self.moe(self.norm(x, self.n2))
        g, u = self.w13(self.norm(x, self.n2)).chunk(2, dim=-1)
        return x + self.w2(F.silu(g) * u)


def moe_dims(c: dict) -> tuple[int, int, int, bool] | None:
    """(experts, expert width, top-k, renormalise) of an MoE config, None for a dense one."""
    e = c.get("num_experts") or c.get("num_local_experts")
    if not e:
        return None
    return e, c.get("moe_intermediate_size") or c["intermediate_size"], c["num_experts_per_tok"], bool(c.get("norm_topk_prob", True))


class MoE(nn.Module):
    """Softmax router, top-k experts (renormalised as the config says), SwiGLU experts stacked
    [E, 2F, d] / [E, d, F]. Decode gathers the chosen experts' weights by index inside the
    compiled step (as gpt-fast's mixtral-moe does; inductor fuses the gather into the GEMV);
    a prompt runs each expert on the tokens routed to it (eager)."""

    def __init__(self, c: dict):
        super().__init__()
        d = c["hidden_size"]
        self.e, f, self.k, self.renorm = moe_dims(c)
        self.gate = nn.Linear(d, self.e, bias=False)
        self.w13 = nn.Parameter(torch.empty(self.e, 2 * f, d))
        self.w2 = nn.Parameter(torch.empty(self.e, d, f))

    def forward(self, x):
        b, t, d = x.shape
        x = x.reshape(-1, d)
        w, idx = self.gate(x).float().softmax(-1).topk(self.k, dim=-1)
        if self.renorm:
            w = w / w.sum(-1, keepdim=True)
        w = w.to(x.dtype)
        if x.shape[0] <= 4:
            g, u = torch.einsum("td,tkfd->tkf", x, self.w13[idx]).chunk(2, dim=-1)
            y = torch.einsum("tkf,tkdf->tkd", F.silu(g) * u, self.w2[idx])
            return (y * w[..., None]).sum(1).view(b, t, d)
        out = torch.zeros_like(x)
        for e in range(self.e):
            tok, j = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                g, u = (x[tok] @ self.w13[e].T).chunk(2, dim=-1)
                out.index_add_(0, tok, ((F.silu(g) * u) @ self.w2[e].T) * w[tok, j, None])
        return out.view(b, t, d)


def rope(x, cos, sin):  # x [b, t, heads, hd]; rotate-half layout (as HF)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class GptFastLlama(nn.Module):
    def __init__(self, c: dict, max_seq: int, dtype):
        super().__init__()
        self.c = c
        self.emb = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Block(c, max_seq, dtype) for _ in range(c["num_hidden_layers"]))
        self.nf = nn.Parameter(torch.ones(c["hidden_size"]))
        self.out = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        if c.get("tie_word_embeddings"):
            self.out.weight = self.emb.weight
        hd = c["head_dim"]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(max_seq).float(), inv)
        ang = torch.cat([ang, ang], dim=-1)
        self.register_buffer("cos", ang.cos().to(dtype), persistent=False)
        self.register_buffer("sin", ang.sin().to(dtype), persistent=False)
        self.register_buffer("causal", torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool)), persistent=False)

    def forward(self, idx, pos, prefill: bool):
        x = self.emb(idx)
        cos, sin = self.cos[pos][None, :, None, :], self.sin[pos][None, :, None, :]
        mask = None if prefill else self.causal[pos][None, None]
        for layer in self.layers:
            x = layer(x, cos, sin, pos, mask)
        x = self.layers[0].norm(x[:, -1:], self.nf)
        return self.out(x)[:, -1]


class Int4Linear(nn.Module):
    """gpt-fast's int4 weight-only linear: torch's tinygemm kernel (_weight_int4pack_mm), groups of
    128, random codes and bf16 scales / zeros (a speed peer: values do not matter)."""

    def __init__(self, lin: nn.Linear, group: int = 128, inner_k_tiles: int = 8):
        super().__init__()
        n, k = lin.weight.shape
        codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=lin.weight.device)
        self.register_buffer("w", torch.ops.aten._convert_weight_to_int4pack(codes, inner_k_tiles))
        self.register_buffer("sz", (torch.randn(k // group, n, 2, device=lin.weight.device) * 0.01).to(torch.bfloat16))
        self.group, self.n = group, n

    def forward(self, x):
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), self.w, self.group, self.sz)
        return y.reshape(*x.shape[:-1], self.n)


def _int4(m: nn.Module) -> None:
    """Every nn.Linear (the LM head too, as gpt-fast's int4 handler does) -> Int4Linear."""
    for name, child in list(m.named_children()):
        if isinstance(child, nn.Linear):
            setattr(m, name, Int4Linear(child))
        else:
            _int4(child)


def time_gptfast(c, dtype, prompt_len, gen_len, ttft_len, compiled, int4: bool = False) -> dict:
    max_seq = max(prompt_len, ttft_len) + gen_len + 8
    torch.set_default_dtype(dtype)  # build in bf16: an 8B model in fp32 first would take 32 GB
    with torch.device("cuda"):
        m = GptFastLlama(c, max_seq, dtype)
        for p in m.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
        if int4:
            _int4(m)
    m.eval()

    def step(tok, pos):
        return m(tok, pos, prefill=False).argmax(-1, keepdim=True)

    dec = torch.compile(step, mode="reduce-overhead", fullgraph=True) if compiled else step
    prompt = torch.randint(0, c["vocab_size"], (1, max(prompt_len, ttft_len)), device="cuda")
    out = {}
    with torch.inference_mode():
        def prefill(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tok = m(prompt[:, :n], torch.arange(n, device="cuda"), prefill=True).argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            return tok, time.perf_counter() - t0

        for _ in range(2):
            prefill(ttft_len)
        _, out["ttft_s"] = prefill(ttft_len)
        tok, _ = prefill(prompt_len)
        for i in range(3):  # compile + graph capture + warm-up
            dec(tok, torch.tensor([prompt_len + i], device="cuda"))
        torch.cuda.synchronize()
        positions = [torch.tensor([prompt_len + i], device="cuda") for i in range(gen_len)]
        t0 = time.perf_counter()
        for i in range(gen_len):
            tok = dec(tok, positions[i]).clone()
        torch.cuda.synchronize()
        out["decode_tok_per_s"] = gen_len / (time.perf_counter() - t0)
    del m
    torch.cuda.empty_cache()
    return out


def time_hf(c, dtype, prompt_len, gen_len, ttft_len) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    cfg = AutoConfig.for_model(c.get("model_type", "llama"), **{k: v for k, v in c.items() if k not in ("architectures", "torch_dtype", "model_type")})
    torch.set_default_dtype(dtype)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(cfg).eval()
    prompt = torch.randint(0, c["vocab_size"], (1, max(prompt_len, ttft_len)), device="cuda")
    out = {}
    with torch.inference_mode():
        def prefill(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = m(prompt[:, :n], use_cache=True)
            tok = r.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            return r.past_key_values, tok, time.perf_counter() - t0

        prefill(ttft_len)
        _, _, out["ttft_s"] = prefill(ttft_len)
        past, tok, _ = prefill(prompt_len)
        for _ in range(2):
            r = m(tok, past_key_values=past, use_cache=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(gen_len):
            r = m(tok, past_key_values=r.past_key_values, use_cache=True)
            tok = r.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        out["decode_tok_per_s"] = gen_len / (time.perf_counter() - t0)
    del m
    torch.cuda.empty_cache()
    return out


def time_kiln(kiln: str, art: str, prompt_len, gen_len, ttft_len, context) -> dict:
    def bench(*extra):
        cmd = [kiln, "bench", art, "--device", "cuda", "--random-weights", "--json", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    d = bench("--prompt-len", str(prompt_len), "--gen-len", str(gen_len), *(["--context", str(context)] if context else []))
    out = {"decode_tok_per_s": d["decode_tok_per_s"], "copy_GB_per_s": d["copy_GB_per_s"]}
    if context:
        out["context_decode_tok_per_s"] = d["context_decode_tok_per_s"]
    if ttft_len:
        out["ttft_s"] = bench("--prompt-len", str(ttft_len), "--gen-len", "2")["time_to_first_token_ms"] / 1e3
    return out


def weight_bytes(c: dict, esize: int = 2) -> int:
    """Bytes of weights one decoded token reads (an MoE layer: its router and k experts)."""
    d, f, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    hd, h, kv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    moe = moe_dims(c)
    ffn = 3 * d * f if moe is None else moe[0] * d + moe[2] * 3 * d * moe[1]
    layer = d * (h + 2 * kv) * hd + h * hd * d + ffn + 2 * d
    return esize * (L * layer + d + v * d + (0 if c.get("tie_word_embeddings") else d))


def copy_bw() -> float:
    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 4 * 10 / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", required=True, help="kiln launcher (the bundle's `kiln`)")
    ap.add_argument("--shape", action="append", required=True, help="NAME=CONFIG.json:ARTIFACT")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--ttft-len", type=int, default=2048)
    ap.add_argument("--context", type=int, default=0, help="kiln: also decode at this context (first shape only)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--peers", default="gptfast,hf")
    ap.add_argument("--json", help="write all measurements here")
    ap.add_argument("--peer-shapes", type=int, default=None, help="run the peers beside the first N shapes only (default: all)")
    a = ap.parse_args()
    dtype = torch.bfloat16
    peers = [p for p in a.peers.split(",") if p]
    bw = copy_bw()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw:.0f} GB/s (read + write)", flush=True)
    rows = []
    for i, spec in enumerate(a.shape):
        name, rest = spec.split("=", 1)
        cfg_path, art = rest.split(":", 1)
        c = json.load(open(cfg_path))
        c.setdefault("head_dim", c["hidden_size"] // c["num_attention_heads"])
        nbytes = weight_bytes(c)
        runs: dict[str, list[dict]] = {}
        for r in range(a.rounds):
            ctx = a.context if i == 0 else 0
            runs.setdefault("kiln", []).append(time_kiln(a.kiln, art, a.prompt_len, a.gen_len, a.ttft_len, ctx))
            with_peers = a.peer_shapes is None or i < a.peer_shapes
            if "gptfast" in peers and with_peers:
                runs.setdefault("gptfast", []).append(time_gptfast(c, dtype, a.prompt_len, a.gen_len, a.ttft_len, True))
            if "gptfast-int4" in peers and with_peers:
                try:
                    runs.setdefault("gpt int4", []).append(time_gptfast(c, dtype, a.prompt_len, a.gen_len, a.ttft_len, True, int4=True))
                except Exception as err:  # noqa: BLE001 - torch's int4 ops move between versions: say so, keep kiln's numbers
                    print(f"  gptfast-int4 failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
                    peers.remove("gptfast-int4")
            if "hf" in peers and with_peers:
                runs.setdefault("hf eager", []).append(time_hf(c, dtype, a.prompt_len, a.gen_len, a.ttft_len))
            print(f"  {name} round {r}: " + ", ".join(f"{k} {v[-1]['decode_tok_per_s']:.1f}" for k, v in runs.items()), flush=True)
        for who, rs in runs.items():
            best = max(rs, key=lambda d: d["decode_tok_per_s"])
            tps = best["decode_tok_per_s"]
            kv_avg = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * 2 * (a.prompt_len + a.gen_len / 2)
            rows.append({"shape": name, "who": who, "decode_tok_per_s": round(tps, 1),
                         "all_decode_tok_per_s": [round(d["decode_tok_per_s"], 1) for d in rs],
                         "GB_per_s": round((nbytes + kv_avg) * tps / 1e9, 1), "share_of_copy": round((nbytes + kv_avg) * tps / 1e9 / bw, 3),
                         "ttft_ms": round(min(d["ttft_s"] for d in rs) * 1e3, 1) if "ttft_s" in best else None,
                         "context_decode_tok_per_s": max((d.get("context_decode_tok_per_s", 0) for d in rs), default=0) or None})
    print(f"\nbatch 1 greedy decode, prompt {a.prompt_len}, {a.gen_len} tokens, bf16 random weights; TTFT at {a.ttft_len} tokens; best of {a.rounds}")
    print(f"{'shape':6s} {'who':9s} {'tok/s':>8s} {'GB/s':>7s} {'of copy':>8s} {'vs kiln':>8s} {'TTFT ms':>9s}  all rounds")
    for r in rows:
        k = next(x for x in rows if x["shape"] == r["shape"] and x["who"] == "kiln")
        ratio = k["decode_tok_per_s"] / r["decode_tok_per_s"]
        print(f"{r['shape']:6s} {r['who']:9s} {r['decode_tok_per_s']:8.1f} {r['GB_per_s']:7.0f} {r['share_of_copy']:8.1%} {ratio:7.2f}x {r['ttft_ms'] or math.nan:9.1f}  {r['all_decode_tok_per_s']}")
        if r["context_decode_tok_per_s"]:
            c0 = json.load(open(a.shape[0].split("=", 1)[1].split(":", 1)[0]))
            c0.setdefault("head_dim", c0["hidden_size"] // c0["num_attention_heads"])
            kvb = 2 * c0["num_hidden_layers"] * c0["num_key_value_heads"] * c0["head_dim"] * 2
            tb = (weight_bytes(c0) + kvb * (a.context + a.gen_len / 2)) * r["context_decode_tok_per_s"] / 1e9
            print(f"{'':6s} {'':9s} at context {a.context}: {r['context_decode_tok_per_s']:.1f} tok/s, {tb:.0f} GB/s with KV, {tb / bw:.1%} of copy")
    if a.json:
        json.dump({"copy_GB_per_s": bw, "torch": torch.__version__, "args": vars(a), "rows": rows}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
