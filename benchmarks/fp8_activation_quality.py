"""What e4m3 activations cost on top of fp8 weights: kiln's Hopper path, emulated on the CPU.

kiln's fp8 weights (passes/quant/formats/fp8.py: e4m3 codes, one fp32 scale per output row,
row maximum -> 448, subnormal codes flushed) run on Hopper as fp8 x fp8 wgmma: each
projection's input rows are quantized on the fly to e4m3 with one fp32 scale per token
(passes/kernels/cuda/gemm_wg.cuh quant_rows_e4m3: scale = max|x| / 448, codes =
__nv_cvt_float2_to_fp8x2(x * (448 / max|x|), SATFINITE, E4M3), round to nearest even,
subnormals kept), wherever K % 128 == 0. This script measures, with fp32 sums (not Hopper's
reduced fp8 accumulation), how far that moves a real model's next-token distributions:

  ref        float32: the GGUF's blocks dequantized once (that *is* the float model here)
  fp8w       fp8 weights (every projection and the LM head; a tied embedding table is the LM
             head's fp8 matrix, as in `kiln compile --quant fp8`), float32 activations: kiln's
             fp8 today
  fp8w+a8    fp8w, and each projection's input rows quantized to e4m3 per token where
             K % 128 == 0: the prompt path (qgemm) of kiln's new Hopper kernels
  ...+head   the same, the LM head's input too when its K % 128 == 0 (decode_batch above 64
             rows: gemm_rows_f8 takes the LM head as well)
  a8 all     every projection and the LM head whatever K (for information: what kiln would
             get if it ran models with K % 128 != 0 on the fp8 kernels too)
  fp8w+bf16a fp8w with every projection / LM head input rounded to bfloat16 (for scale: what
             the 16-bit activations kiln's GPU path has today already cost)

Emulation: quantize -> dequantize in float32 around each torch.nn.Linear of a transformers
model (weights swapped in place, a forward pre-hook on the inputs); the weight codes come from
kiln's own encoder (passes/quant/formats/fp8.py), the activation codes from torch's
float8_e4m3fn cast (round to nearest even, subnormals kept, the input clamped to +-448 = SATFINITE).

Metrics, teacher-forced over passes/data/calib_en.txt (the quality gate's calibration text) in
non-overlapping windows, each its own forward from an empty cache: mean KL(ref || variant) of
the next-token distributions over all positions, top-1 agreement with ref, perplexity of the
text, and the same KL / top-1 of each a8 variant against fp8w. Greedy: 32 new tokens (EOS not
stopping) for two chat prompts per variant, compared with ref's tokens; the a8 variants are
run with e4m3 activations at every step and, as `kiln run` does (batch-1 decode goes through
the qgemv with 16-bit activations), on the prompt only.

    PATH=.venv/bin:$PATH python benchmarks/fp8_activation_quality.py [--models smollm2,gemma3] [--window 512] [--out FILE]

Models are read from ~/.cache/kiln (SmolLM2-135M-Instruct.Q4_1.gguf, gemma-3-270m-q4_k_m.gguf)
through transformers' GGUF loader (its load_gguf_checkpoint: from_pretrained(gguf_file=...)
wants accelerate, which the venv does not have). Single thread: ~10 minutes for both.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

from kiln.passes.quant.codec import fp8_decode
from kiln.passes.quant.formats.fp8 import encode_rows_fp8

CACHE = Path.home() / ".cache" / "kiln"
MODELS = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf", "gemma3": "gemma-3-270m-q4_k_m.gguf"}
TEXT = ROOT / "passes" / "data" / "calib_en.txt"
F8_BK = 128  # passes/kernels/gemm_cuda.py: the fp8 kernels take K in whole 128-code steps
PROMPTS = ("What are three good reasons to learn a second language?",
           "Write a short note to a neighbour asking them to water my plants while I am away.")
NEW_TOKENS = 32
# chat turns for a GGUF without a template (the Gemma base model's own turn markers)
FALLBACK_TURN = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"


def load(name: str):
    """(transformers model in float32, tokenizer) from the GGUF's dequantized blocks."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: PLC0415

    f = MODELS[name]
    config = AutoConfig.from_pretrained(CACHE, gguf_file=f)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_gguf_checkpoint(str(CACHE / f), return_tensors=True, model_to_load=model)["tensors"]
    res = model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
        assert res.missing_keys in ([], ["lm_head.weight"]), res.missing_keys
    else:
        assert not res.missing_keys, res.missing_keys
    return model.eval(), AutoTokenizer.from_pretrained(CACHE, gguf_file=f)


def fp8_rows(w: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """w [N, K] float32 -> kiln's fp8 round trip [N, K] (e4m3 codes * per-row scale), in row chunks."""
    out = torch.empty_like(w)
    for i in range(0, w.shape[0], chunk):
        codes, scale = encode_rows_fp8(w[i:i + chunk].numpy())
        out[i:i + chunk] = torch.from_numpy(fp8_decode(codes) * scale[:, None])
    return out


def e4m3_tokens(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] float32 -> quant_rows_e4m3's round trip: one scale max|x_row| / 448 per token."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 448.0 / torch.where(amax > 0, amax, 1.0), 0.0)
    q = (x * inv).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(torch.float32)
    return q * (amax / 448.0)


class Emulator:
    """Switches a model's nn.Linear layers between float and fp8 weights, and their inputs between
    float, bfloat16 and per-token e4m3, by variant."""

    def __init__(self, model):
        self.model = model
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.head = model.get_output_embeddings()
        self.float_w, self.fp8_w = {}, {}
        for n, m in self.linears.items():  # a tied head shares its Parameter with the embedding: both swap together
            self.float_w[n] = m.weight.data
            self.fp8_w[n] = fp8_rows(m.weight.data)
        self.act = {}  # linear name -> input transform (absent: float)
        self.prompt_only = False
        for n, m in self.linears.items():
            m.register_forward_pre_hook(self._hook(n))

    def _hook(self, name):
        def hook(mod, args):
            fn = self.act.get(name)
            x = args[0]
            if fn is None or (self.prompt_only and x.shape[-2] == 1):
                return None
            return (fn(x),) + tuple(args[1:])
        return hook

    def a8_sets(self) -> dict[str, set]:
        """The linears whose inputs kiln's fp8 kernels quantize, per a8 variant."""
        k_ok = {n for n, m in self.linears.items() if m.in_features % F8_BK == 0}
        head = {n for n, m in self.linears.items() if m is self.head}
        return {"fp8w+a8": k_ok - head, "fp8w+a8+head": k_ok, "fp8w+a8 all": set(self.linears)}

    def set(self, variant: str):
        fp8 = variant != "ref"
        for n, m in self.linears.items():
            m.weight.data = self.fp8_w[n] if fp8 else self.float_w[n]
        if variant in ("ref", "fp8w"):
            self.act = {}
        elif variant == "fp8w+bf16a":
            self.act = {n: (lambda x: x.to(torch.bfloat16).to(torch.float32)) for n in self.linears}
        else:
            self.act = {n: e4m3_tokens for n in self.a8_sets()[variant]}


def variants(emu: Emulator) -> list[str]:
    """ref, fp8w, the a8 variants that differ from each other, fp8w+bf16a."""
    out, seen = ["ref", "fp8w"], []
    for v, s in emu.a8_sets().items():
        if s and s not in seen:
            out.append(v)
            seen.append(s)
    return out + ["fp8w+bf16a"]


def kl_top1(logp_p: torch.Tensor, logp_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: KL(p || q) in nats, and whether the argmaxes agree. logp_* [T, V]."""
    kl = (logp_p.exp() * (logp_p - logp_q)).sum(-1)
    return kl, logp_p.argmax(-1) == logp_q.argmax(-1)


@torch.inference_mode()
def teacher_forced(emu: Emulator, tok, text: str, window: int, names: list[str]) -> dict:
    prefix = tok("").input_ids  # the tokens the tokenizer starts a text with (Gemma's <bos>; none for SmolLM2)
    ids = tok(text, add_special_tokens=False).input_ids
    body = window - len(prefix)
    wins = [prefix + ids[i:i + body] for i in range(0, len(ids), body) if len(ids[i:i + body]) >= 64]
    acc = {v: {"kl": [], "top1": [], "nll": [], "kl8": [], "top18": []} for v in names}
    for w in wins:
        x = torch.tensor([w])
        tgt = x[0, 1:]
        logp = {}
        for v in names:
            emu.set(v)
            lp = torch.log_softmax(emu.model(x).logits[0].float(), dim=-1)
            acc[v]["nll"].append(-lp[:-1].gather(1, tgt[:, None])[:, 0])
            if v == "ref":
                logp["ref"] = lp
                continue
            kl, t1 = kl_top1(logp["ref"], lp)
            acc[v]["kl"].append(kl)
            acc[v]["top1"].append(t1)
            if v == "fp8w":
                logp["fp8w"] = lp
            elif v != "fp8w+bf16a":
                kl, t1 = kl_top1(logp["fp8w"], lp)
                acc[v]["kl8"].append(kl)
                acc[v]["top18"].append(t1)
            del lp
        del logp
    out = {"tokens": sum(len(w) for w in wins), "windows": len(wins)}
    for v, a in acc.items():
        r = {"ppl": float(torch.cat(a["nll"]).double().mean().exp())}
        if a["kl"]:
            kl = torch.cat(a["kl"]).double()
            r |= {"kl": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)), "kl_max": float(kl.max()),
                  "top1": float(torch.cat(a["top1"]).double().mean())}
        if a["kl8"]:
            r |= {"kl_vs_fp8w": float(torch.cat(a["kl8"]).double().mean()), "top1_vs_fp8w": float(torch.cat(a["top18"]).double().mean())}
        out[v] = r
    return out


def chat_ids(tok, prompt: str) -> list[int]:
    if tok.chat_template:
        return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]
    return tok(FALLBACK_TURN.format(prompt)).input_ids


@torch.inference_mode()
def greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids, the EOS not stopping it (cached decode: one token per step)."""
    out = model(torch.tensor([ids]), use_cache=True)
    cache, new = out.past_key_values, []
    for _ in range(n):
        t = int(out.logits[0, -1].argmax())
        new.append(t)
        out = model(torch.tensor([[t]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    return new


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def generations(emu: Emulator, tok, names: list[str]) -> dict:
    """variant (and 'variant, prompt only') -> [(tokens, text)] per prompt."""
    runs = [(v, False) for v in names] + [(v, True) for v in names if v.startswith("fp8w+a8")]
    out = {}
    for v, prompt_only in runs:
        emu.set(v)
        emu.prompt_only = prompt_only
        key = v + (" (prompt only)" if prompt_only else "")
        out[key] = [(t := greedy(emu.model, chat_ids(tok, p), NEW_TOKENS), tok.decode(t)) for p in PROMPTS]
    emu.prompt_only = False
    return out


def report(name: str, emu: Emulator, tf: dict, gen: dict, log) -> list[tuple]:
    lin = emu.linears
    ks = sorted({m.in_features for m in lin.values()})
    log(f"\n=== {name}: {MODELS[name]}  ({len(lin)} linears; K values {ks}; K % 128 == 0: "
        f"{sorted({k for k in ks if k % F8_BK == 0})}; LM head K {emu.head.in_features}, "
        f"tied {emu.model.config.tie_word_embeddings})")
    for v, s in emu.a8_sets().items():
        kinds = sorted({n.rsplit('.', 1)[-1] for n in s})
        log(f"  {v}: e4m3 inputs on {len(s)} of {len(lin)} linears: {', '.join(kinds) or '-'}")
    log(f"  teacher-forced: {tf['tokens']} tokens in {tf['windows']} windows")
    ref_gen, fp8_gen = gen["ref"], gen["fp8w"]
    rows = []
    log(f"  {'variant':<28}{'KL(ref||v)':>12}{'p99':>10}{'max':>9}{'top1':>8}{'ppl':>9}{'KL(fp8w||v)':>13}{'top1 vs fp8w':>14}"
        f"  greedy == ref (same leading tokens of {NEW_TOKENS})")
    for key, g in gen.items():
        v = key.split(" (")[0]
        r = tf[v]
        eq = [a[0] == b[0] for a, b in zip(g, ref_gen)]
        pre = [same_prefix(a[0], b[0]) for a, b in zip(g, ref_gen)]
        tfcols = (f"{r.get('kl', 0):>12.5f}{r.get('kl_p99', 0):>10.4f}{r.get('kl_max', 0):>9.3f}{r.get('top1', 1):>8.4f}{r['ppl']:>9.3f}"
                  if key == v else " " * 48)
        v8 = (f"{r['kl_vs_fp8w']:>13.5f}{r['top1_vs_fp8w']:>14.4f}" if "kl_vs_fp8w" in r and key == v else " " * 27)
        log(f"  {key:<28}{tfcols}{v8}  {'/'.join('yes' if e else 'no' for e in eq)} ({'/'.join(map(str, pre))})")
        pre8 = [same_prefix(a[0], b[0]) for a, b in zip(g, fp8_gen)]
        rows.append((name, key, r.get("kl") if key == v else None, r.get("top1") if key == v else None, all(eq), pre, pre8))
    log("  greedy texts:")
    for key, g in gen.items():
        for i, (_, text) in enumerate(g):
            log(f"    [{key} | prompt {i}] {text!r}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None, help="also write the output to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    log(f"fp8 (e4m3) weights x per-token e4m3 activations, emulated in float32 on the CPU "
        f"(torch {torch.__version__}); text {TEXT.relative_to(ROOT)}, windows of {args.window}")
    text = TEXT.read_text()
    table = []
    for name in args.models.split(","):
        t0 = time.time()
        model, tok = load(name)
        emu = Emulator(model)
        names = variants(emu)
        tf = teacher_forced(emu, tok, text, args.window, names)
        gen = generations(emu, tok, names)
        table += report(name, emu, tf, gen, log)
        log(f"  ({time.time() - t0:.0f} s)")
        del emu, model
    log(f"\n| model | variant | KL(ref‖v) | top-1 agree | greedy == ref (2 prompts; same leading tokens of {NEW_TOKENS}) "
        "| same leading tokens as fp8w |")
    log("|---|---|---|---|---|---|")
    for name, key, kl, top1, eq, pre, pre8 in table:
        kls = "-" if kl is None else f"{kl:.5f}"
        t1 = "-" if top1 is None else f"{100 * top1:.2f}%"
        log(f"| {name} | {key} | {kls} | {t1} | {'yes' if eq else 'no'} ({'/'.join(map(str, pre))}) | {'/'.join(map(str, pre8))} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
