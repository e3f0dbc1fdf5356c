"""The mixture-of-experts MLP every MoE family shares: a router and stacked experts.

    logits  = x @ W_router^T                      # [T, E] float32
    ids     = top-k experts by logit              # [T, k] int32 (ties: lower expert index)
    weights = softmax(logits)[ids]                # [T, k], / their sum when renormalised
    out     = sum_j weights[j] * down_{ids[j]}(silu(gate_{ids[j]}(x)) * up_{ids[j]}(x))

Only the chosen experts are computed: the expert kernels read rows of the
stacked weights through `ids`, which stay device data (no host round trip).
Experts are stacked at conversion time, one tensor per layer:
`experts.gate_up  # [E, 2F, D]` (gate rows, then up rows, per expert) and
`experts.down  # [E, D, F]`. The DeepSeek block (DeepSeekMoE) adds shared
experts (a dense MLP beside these) and its own selection (softmax or sigmoid
scores, group limits, a correction bias for the choice only, a scaling factor)
in place of `select_experts`; the expert kernels stay.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...errors import UnsupportedModelError
from ..config import ModelConfig
from .layers import OP_ATTR, QFORMAT_ATTR, ROLE_ATTR, _precision, _tvm, nn, nt_matmul, op

te = _tvm.te
tir = _tvm.tirx

# What the MoE kernels are, set on purpose so passes match them by attribute
# (cf. layers.OP_ATTR; a pass reading OP_ATTR reads ROLE_ATTR too):
# passes/cuda_experts.py swaps in CUDA kernels by these.
EXPERT_ATTRS = {OP_ATTR: "expert_matmul", ROLE_ATTR: "expert"}  # the gate/up GEMV over the chosen experts
EXPERT_DOWN_ATTRS = {OP_ATTR: "expert_down", ROLE_ATTR: "expert"}  # the down GEMV with the weighted sum over k
TOPK_ATTRS = {OP_ATTR: "topk_experts", ROLE_ATTR: "router"}
RENORMALIZE_ATTR = "kiln.renormalize"  # routing_weights: divided by the chosen experts' sum (1) or all E (0)


def _f32(v):
    return v if str(v.dtype) == "float32" else v.astype("float32")


# --- kernels (TE: the schedule rules of each target pick them up by structure) ---
def te_topk_experts(lg, k: int):
    """lg  # [T, E] float32 -> ids  # [T, k] int32, best first.

    An expert's rank is the number of experts with a larger logit, or an equal
    one and a lower index, so ties go to the lower expert index whatever the
    target (docs/DESIGN.md). Ranking the logits is ranking the softmax
    (monotone) without the rounding that can make two probabilities equal.
    O(E^2) compares per token: nothing next to an expert's GEMV at decode."""
    n_tok, n_exp = lg.shape
    o = te.reduce_axis((0, n_exp), name="o")

    def beats(t, e):
        return tir.Or(lg[t, o] > lg[t, e], tir.And(lg[t, o] == lg[t, e], o < e))

    rank = te.compute((n_tok, n_exp), lambda t, e: te.sum(tir.Select(beats(t, e), 1, 0), axis=o), name="expert_rank")
    e = te.reduce_axis((0, n_exp), name="e")
    return te.compute((n_tok, k), lambda t, j: te.sum(tir.Select(rank[t, e] == j, e.astype("int32"), 0), axis=e), name="topk_experts")


def te_routing_weights(lg, idt, renormalize: bool):
    """lg  # [T, E] float32, idt  # [T, k] int32 -> weights  # [T, k] float32: the chosen
    experts' softmax probabilities, divided by their sum when `renormalize`."""
    n_tok, n_exp = lg.shape
    k = idt.shape[1]
    e = te.reduce_axis((0, n_exp), name="e")
    mx = te.compute((n_tok,), lambda t: te.max(lg[t, e], axis=e), name="router_max")

    def chosen(t, j):
        return te.exp(lg[t, _expert(idt, t, j, n_exp)] - mx[t])

    if renormalize:
        j = te.reduce_axis((0, k), name="j")
        den = te.compute((n_tok,), lambda t: te.sum(chosen(t, j), axis=j), name="router_den")
    else:
        e2 = te.reduce_axis((0, n_exp), name="e2")
        den = te.compute((n_tok,), lambda t: te.sum(te.exp(lg[t, e2] - mx[t]), axis=e2), name="router_den")
    return te.compute((n_tok, k), lambda t, j: chosen(t, j) / den[t], name="routing_weights")


def te_expert_matmul(xt, wt, idt, out_dtype: str = "float32", name: str = "expert_gate_up", fmt=None):
    """xt  # [T, K], wt  # [E, N, K] (storage dtype; with `fmt`: the format's arrays
    (q, s[, z]), each [E, N, ...]), idt  # [T, k] int32 -> y  # [T, k, N]:
    y[t, j] = W[ids[t, j]] @ x[t], the chosen experts' rows only (fp32 accumulation;
    quantized codes decoded inside the reduction, as q_matmul does for dense weights)."""
    n_tok, k_ext = xt.shape
    w, n_exp, n_ext = _weights(wt, fmt, int(k_ext))
    r = te.reduce_axis((0, k_ext), name="k")
    y = te.compute((n_tok, idt.shape[1], n_ext),
                   lambda t, j, n: te.sum(_f32(xt[t, r]) * w(_expert(idt, t, j, n_exp), n, r), axis=r), name=name)
    return y if out_dtype == "float32" else te.compute(y.shape, lambda *i: y(*i).astype(out_dtype), name=name + "_cast")


def te_expert_down(at, wt, idt, wts, out_dtype: str = "float32", name: str = "expert_down", fmt=None):
    """at  # [T, k, F], wt  # [E, D, F] (or the format's arrays, as te_expert_matmul),
    idt  # [T, k] int32, wts  # [T, k] float32 -> out  # [T, D]:
    sum_j wts[t, j] * (W[ids[t, j]] @ a[t, j]); the routing weights and the sum over
    the k experts are in the same reduction."""
    n_tok, k, f_ext = at.shape
    w, n_exp, d_ext = _weights(wt, fmt, int(f_ext))
    j = te.reduce_axis((0, k), name="j")
    r = te.reduce_axis((0, f_ext), name="k")
    y = te.compute((n_tok, d_ext),
                   lambda t, d: te.sum(wts[t, j] * _f32(at[t, j, r]) * w(_expert(idt, t, j, n_exp), d, r), axis=[j, r]),
                   name=name)
    return y if out_dtype == "float32" else te.compute(y.shape, lambda *i: y(*i).astype(out_dtype), name=name + "_cast")


def _weights(wt, fmt, k: int):
    """(read(e, n, k) -> fp32, E, N) for a float stack or a quantized one's arrays."""
    if fmt is None:
        return (lambda e, n, r: _f32(wt[e, n, r])), wt.shape[0], wt.shape[1]
    return fmt.te_stacked_weight(fmt.group_for(k), *wt), wt[0].shape[0], wt[0].shape[1]


def _expert(idt, t, j, n_exp):
    # clamped: a kernel stays in bounds even if ids were wrong (cf. layers.take)
    return tir.max(tir.min(idt[t, j], n_exp - 1), 0)


# --- DeepSeek's selection (V2 group_limited_greedy, V3 noaux_tc), as transformers computes it ---
def te_router_scores(lg, scoring: str):
    """lg  # [T, E] float32 -> scores  # [T, E]: softmax over the experts (V2) or sigmoid (V3)."""
    n_tok, n_exp = lg.shape
    if scoring == "sigmoid":
        return te.compute(lg.shape, lambda t, e: te.sigmoid(lg[t, e]), name="router_scores")
    e = te.reduce_axis((0, n_exp), name="e")
    mx = te.compute((n_tok,), lambda t: te.max(lg[t, e], axis=e), name="router_max")
    ex = te.compute(lg.shape, lambda t, e_: te.exp(lg[t, e_] - mx[t]), name="router_exp")
    e2 = te.reduce_axis((0, n_exp), name="e2")
    den = te.compute((n_tok,), lambda t: te.sum(ex[t, e2], axis=e2), name="router_den")
    return te.compute(lg.shape, lambda t, e_: ex[t, e_] / den[t], name="router_scores")


def te_group_limited_topk(sc, k: int, n_group: int, topk_group: int, group_best: int, masked: float, bias=None):
    """sc  # [T, E] scores (+ bias  # [E] for the choice only: V3's e_score_correction_bias)
    -> ids  # [T, k] int32: the top-k experts among the `topk_group` best groups of E / n_group
    consecutive experts. A group's score is the sum of its `group_best` best choice scores
    (V2: 1, its maximum; V3: 2); experts of other groups score `masked` (V2 0.0, V3 -inf).
    Groups and experts are ranked as topk_experts ranks: ties to the lower index."""
    n_tok, n_exp = sc.shape
    size = n_exp // n_group
    ch = sc if bias is None else te.compute(sc.shape, lambda t, e: sc[t, e] + bias[e], name="choice_scores")
    o = te.reduce_axis((0, size), name="o")

    def beats_in_group(t, e):
        first = (e // size) * size
        return tir.Or(ch[t, first + o] > ch[t, e], tir.And(ch[t, first + o] == ch[t, e], first + o < e))

    rank = te.compute(sc.shape, lambda t, e: te.sum(tir.Select(beats_in_group(t, e), 1, 0), axis=o), name="rank_in_group")
    m = te.reduce_axis((0, size), name="m")
    gs = te.compute((n_tok, n_group), lambda t, g: te.sum(tir.Select(rank[t, g * size + m] < group_best, ch[t, g * size + m],
                                                                      tir.const(0, "float32")), axis=m), name="group_scores")
    h = te.reduce_axis((0, n_group), name="h")
    grank = te.compute((n_tok, n_group), lambda t, g: te.sum(
        tir.Select(tir.Or(gs[t, h] > gs[t, g], tir.And(gs[t, h] == gs[t, g], h < g)), 1, 0), axis=h), name="group_rank")
    fill = tir.const(masked, "float32")
    kept = te.compute(sc.shape, lambda t, e: tir.Select(grank[t, e // size] < topk_group, ch[t, e], fill), name="group_masked")
    return te_topk_experts(kept, k)


def te_gathered_weights(sc, idt, normalize: bool, scale: float):
    """sc  # [T, E], idt  # [T, k] -> weights  # [T, k]: the chosen experts' scores (no bias),
    divided by their sum + 1e-20 when `normalize`, times `scale` (routed_scaling_factor)."""
    n_tok, n_exp = sc.shape
    k = idt.shape[1]
    if not normalize:
        return te.compute(idt.shape, lambda t, j: sc[t, _expert(idt, t, j, n_exp)] * tir.const(scale, "float32"), name="routing_weights")
    r = te.reduce_axis((0, k), name="j")
    den = te.compute((n_tok,), lambda t: te.sum(sc[t, _expert(idt, t, r, n_exp)], axis=r), name="router_den")
    return te.compute(idt.shape, lambda t, j: sc[t, _expert(idt, t, j, n_exp)] / (den[t] + tir.const(1e-20, "float32"))
                      * tir.const(scale, "float32"), name="routing_weights")


# --- the graph ops ---------------------------------------------------------------
def topk_experts(logits, k: int):
    return op.tensor_expr_op(lambda lg: te_topk_experts(lg, k), "topk_experts", [logits], attrs=TOPK_ATTRS)


def routing_weights(logits, ids, renormalize: bool):
    attrs = {OP_ATTR: "routing_weights", ROLE_ATTR: "router", RENORMALIZE_ATTR: int(renormalize)}
    return op.tensor_expr_op(lambda lg, idt: te_routing_weights(lg, idt, renormalize), "routing_weights", [logits, ids], attrs=attrs)


def _weight_args(w, attrs=EXPERT_ATTRS):
    """(graph args, format, kernel attrs) of a float stack or a QExperts."""
    if isinstance(w, QExperts):
        return w.params(), w.fmt, attrs | {QFORMAT_ATTR: w.fmt.name}
    return [w], None, attrs


def expert_matmul(x, w, ids, name: str = "expert_gate_up"):
    out = str(x.dtype)
    args, fmt, attrs = _weight_args(w)

    def compute(xt, *rest):
        *wt, idt = rest
        return te_expert_matmul(xt, tuple(wt) if fmt else wt[0], idt, out, name, fmt)

    return op.tensor_expr_op(compute, name, [x, *args, ids], attrs=attrs)


def expert_down(a, w, ids, weights, name: str = "expert_down"):
    out = str(a.dtype)
    args, fmt, attrs = _weight_args(w, EXPERT_DOWN_ATTRS)

    def compute(at, *rest):
        *wt, idt, wts = rest
        return te_expert_down(at, tuple(wt) if fmt else wt[0], idt, wts, out, name, fmt)

    return op.tensor_expr_op(compute, name, [a, *args, ids, weights], attrs=attrs)


def deepseek_select(logits, bias, r: DeepSeekRouting, k: int):
    """logits [T, E] (, bias [E]) -> (ids [T, k] int32, weights [T, k] float32), DeepSeek's way.
    V2's plain greedy choice (softmax scores, one group, no bias) is Mixtral's routing without
    renormalising, times routed_scaling_factor: it takes those ops (one fused kernel on CUDA,
    passes/cuda_experts.py) -- the same experts (softmax keeps the order; ties to the lower index)."""
    if r.scoring == "softmax" and r.n_group == 1 and bias is None and not r.normalize:
        ids = topk_experts(logits, k)
        weights = routing_weights(logits, ids, renormalize=False)
        return ids, (weights * r.scale if r.scale != 1.0 else weights)
    scores = op.tensor_expr_op(lambda lg: te_router_scores(lg, r.scoring), "router_scores", [logits])
    choose = lambda sc, b=None: te_group_limited_topk(sc, k, r.n_group, r.topk_group, r.group_best, r.masked, b)  # noqa: E731
    ids = op.tensor_expr_op(choose, "group_limited_topk", [scores] + ([bias] if bias is not None else []))
    return ids, op.tensor_expr_op(lambda sc, idt: te_gathered_weights(sc, idt, r.normalize, r.scale), "routing_weights", [scores, ids])


class Router(nn.Module):
    """logits = x @ W^T in float32 (W [E, hidden], the artifact's float dtype: never quantized)."""

    def __init__(self, hidden: int, experts: int, dtype):
        self.weight = nn.Parameter((experts, hidden), _precision(dtype).storage)

    def forward(self, x):
        return nt_matmul(x, self.weight, name="router", out_dtype="float32", role="router")


class QExperts(nn.Module):
    """A quantized stack of expert matrices [E, N, K], stored as its format's arrays
    with the expert axis kept (params `q`, `s`, `z` for formats with a minimum, `d`, `m` for super-block scales;
    passes/quant/weights.py stacked_parts). The expert kernels decode only the
    chosen experts' codes, where they read them."""

    def __init__(self, shape: tuple[int, int, int], fmt):
        self.fmt = fmt
        self.shape = tuple(shape)
        self.q = self.s = self.z = self.d = self.m = None
        self._parts = tuple(fmt.stacked_parts(self.shape))
        for sfx, (shp, dt) in fmt.stacked_parts(self.shape).items():
            setattr(self, sfx, nn.Parameter(shp, dt))

    def params(self) -> list:
        return [getattr(self, sfx) for sfx in self._parts]


def _stack(shape, role: str, precision):
    fmt = precision.format_for(role, shape[-1])
    return QExperts(shape, fmt) if fmt is not None else nn.Parameter(shape, precision.storage)


class Experts(nn.Module):
    """E SwiGLU experts stacked: gate_up  # [E, 2F, hidden], down  # [E, hidden, F]
    (float, or quantized per the plan's expert_gate_up / expert_down roles)."""

    def __init__(self, hidden: int, inter: int, experts: int, dtype):
        p = _precision(dtype)
        self.gate_up = _stack((experts, 2 * inter, hidden), "expert_gate_up", p)
        self.down = _stack((experts, hidden, inter), "expert_down", p)

    def forward(self, x, ids, weights):
        """x [T, hidden], ids [T, k], weights [T, k] -> [T, hidden]."""
        gate, up = op.split(expert_matmul(x, self.gate_up, ids), 2, axis=-1)  # [T, k, F] each
        return expert_down(op.silu(gate) * up, self.down, ids, weights)


class SparseMoE(nn.Module):
    """The MLP of an MoE layer: route each token to its top-k experts, run only those."""

    def __init__(self, c: ModelConfig, dtype):
        self.top_k = c.num_experts_per_tok
        self.renormalize = bool(c.norm_topk_prob)
        self.gate = Router(c.hidden_size, c.num_experts, dtype)
        self.experts = Experts(c.hidden_size, c.moe_intermediate_size, c.num_experts, dtype)

    def select_experts(self, logits):
        """-> (ids [T, k] int32, weights [T, k] float32). DeepSeek's routings replace this."""
        ids = topk_experts(logits, self.top_k)
        return ids, routing_weights(logits, ids, self.renormalize)

    def forward(self, x):
        b, s, hidden = x.shape
        x = op.reshape(x, (b * s, hidden))
        ids, weights = self.select_experts(self.gate(x))
        return op.reshape(self.experts(x, ids, weights), (b, s, hidden))


@dataclass(frozen=True)
class DeepSeekRouting:
    """How a DeepSeek router picks and weighs its experts (transformers' DeepseekV2 /
    DeepseekV3 TopkRouter): `v2` = softmax scores, group_limited_greedy (groups ranked
    by their best expert, others' experts scored 0) or greedy (one group), weights
    = scores x routed_scaling_factor; `v3` = noaux_tc: sigmoid scores, the choice made
    on scores + e_score_correction_bias (groups ranked by their best two, others'
    experts -inf), weights = the unbiased scores, renormalised when norm_topk_prob,
    x routed_scaling_factor."""

    scoring: str = "softmax"  # softmax | sigmoid
    n_group: int = 1
    topk_group: int = 1
    group_best: int = 1  # a group's score: the sum of its best `group_best` choice scores
    masked: float = 0.0  # the choice score of experts outside the chosen groups
    normalize: bool = False
    scale: float = 1.0  # routed_scaling_factor
    bias: bool = False  # e_score_correction_bias (choice only)

    @classmethod
    def from_hf(cls, cfg: dict):
        """From a DeepSeek-V2/V3 config.json: topk_method greedy | group_limited_greedy (V2) |
        noaux_tc (V3; what transformers' DeepseekV3Config implies without saying), n_group,
        topk_group, routed_scaling_factor, norm_topk_prob."""
        method = cfg.get("topk_method") or ("noaux_tc" if cfg.get("model_type") == "deepseek_v3" else "greedy")
        groups = int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1)
        scale = float(cfg.get("routed_scaling_factor", 1.0))
        if method == "noaux_tc":
            return cls.v3(*groups, bool(cfg.get("norm_topk_prob", True)), scale)
        if method in ("greedy", "group_limited_greedy"):
            return cls.v2(method, *groups, scale)
        raise UnsupportedModelError(f"DeepSeek topk_method {method!r} is not supported; supported: greedy, group_limited_greedy, noaux_tc")

    @classmethod
    def v2(cls, topk_method: str = "greedy", n_group: int = 1, topk_group: int = 1, routed_scaling_factor: float = 1.0):
        groups = (n_group, topk_group) if topk_method == "group_limited_greedy" else (1, 1)
        return cls("softmax", *groups, 1, 0.0, False, routed_scaling_factor, False)

    @classmethod
    def v3(cls, n_group: int, topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float):
        return cls("sigmoid", n_group, topk_group, 2, float("-inf"), norm_topk_prob, routed_scaling_factor, True)


def deepseek_moe_layer(i: int, first_k_dense_replace: int) -> bool:
    """Layer i of a DeepSeek model has the MoE block (the first `first_k_dense_replace` keep a
    dense MLP; transformers 5 reads no moe_layer_freq)."""
    return i >= first_k_dense_replace


class DeepSeekMoE(SparseMoE):
    """DeepSeek's MoE block: routed experts chosen by `routing` plus `n_shared` shared
    experts, one dense SwiGLU MLP of width n_shared x moe_intermediate_size that every
    token runs: y = experts(x) + shared_experts(x). The full model waits for MLA (issue 14)."""

    def __init__(self, c: ModelConfig, dtype, routing: DeepSeekRouting, n_shared: int):
        from .llama import LlamaMLP  # noqa: PLC0415  (the dense SwiGLU MLP every family shares)

        super().__init__(c, dtype)
        self.routing = routing
        self.e_score_correction_bias = nn.Parameter((c.num_experts,), "float32") if routing.bias else None
        shared = dataclasses.replace(c, intermediate_size=n_shared * c.moe_intermediate_size, mlp_bias=False)
        self.shared_experts = LlamaMLP(shared, dtype) if n_shared else None

    def select_experts(self, logits):
        return deepseek_select(logits, self.e_score_correction_bias, self.routing, self.top_k)

    def forward(self, x):
        y = super().forward(x)
        return y + self.shared_experts(x) if self.shared_experts is not None else y


class MoEFamily:
    """Mixed in before a dense family: MoE layers (config.is_moe_layer) get a
    SparseMoE as their `mlp`, and their weights are read from either HF layout:
    per-expert matrices (`{hf_moe}.experts.{e}.{gate|up|down}.weight`, what
    transformers' save_pretrained writes) or transformers 5's fused tensors
    (`mlp.experts.gate_up_proj` [E, 2F, hidden], `mlp.experts.down_proj`)."""

    hf_moe = "mlp"  # the HF module holding router and experts on disk
    hf_expert = ("gate_proj", "up_proj", "down_proj")  # per-expert matrix names: gate, up, down

    def make_layer(self, config, dtype, i: int):
        layer = super().make_layer(config, dtype, i)
        if config.is_moe_layer(i):
            layer.mlp = SparseMoE(config, dtype)
        return layer

    @classmethod
    def layer_param_shapes_at(cls, c, i):
        shapes = super().layer_param_shapes_at(c, i)
        if not c.is_moe_layer(i):
            return shapes
        e, f, d = c.num_experts, c.moe_intermediate_size, c.hidden_size
        return {k: v for k, v in shapes.items() if not k.startswith("mlp.")} | {
            "mlp.gate.weight": (e, d), "mlp.experts.gate_up": (e, 2 * f, d), "mlp.experts.down": (e, d, f)}

    @classmethod
    def hf_layer_sources_at(cls, c, i):
        sources = super().hf_layer_sources_at(c, i)
        if not c.is_moe_layer(i):
            return sources
        ex = f"{cls.hf_moe}.experts"
        gate, up, down = cls.hf_expert
        return {k: v for k, v in sources.items() if not k.startswith("mlp.")} | {
            "mlp.gate.weight": (f"{cls.hf_moe}.gate.weight",),
            "mlp.experts.gate_up": tuple(f"{ex}.{e}.{p}.weight" for e in range(c.num_experts) for p in (gate, up)),
            "mlp.experts.down": tuple(f"{ex}.{e}.{down}.weight" for e in range(c.num_experts)),
        }

    @classmethod
    def hf_sources_for(cls, c, names):
        """Per layer, the spelling the checkpoint has: per-expert matrices (hf_layer_sources_at),
        transformers 5's fused stacks, or GGUF's stacks (`ffn_{gate,up,down}_exps`, named
        `mlp.experts.{gate,up,down}_proj.weight  # [E, rows, k]` by frontends/gguf_names.py;
        gate and up are joined within each expert)."""
        sources = super().hf_sources_for(c, names)
        for i in range(c.num_hidden_layers):
            ex = f"model.layers.{i}.mlp.experts"
            if not c.is_moe_layer(i):
                continue
            if f"{ex}.gate_up_proj" in names:
                gate_up, down = (f"{ex}.gate_up_proj",), (f"{ex}.down_proj",)
            elif f"{ex}.gate_proj.weight" in names:
                gate_up, down = (f"{ex}.gate_proj.weight", f"{ex}.up_proj.weight"), (f"{ex}.down_proj.weight",)
            else:
                continue
            p = f"layers.{i}.mlp"
            sources.update({f"{p}.gate.weight": (f"model.layers.{i}.mlp.gate.weight",),
                            f"{p}.experts.gate_up": gate_up, f"{p}.experts.down": down})
        return sources
