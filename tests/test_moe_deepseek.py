"""DeepSeek's MoE block (issue 13): V2 softmax / group_limited_greedy and V3 noaux_tc
selection, routed_scaling_factor, norm_topk_prob, shared experts, first_k_dense_replace
-- the kernels and the block against float64 numpy twins (ties on purpose: lower
group, then lower expert index first), and the twins against transformers' own
routers. The full DeepSeek model needs MLA (issue 14)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import slow_except

from kiln.passes.schedule_tir import ScheduleTIR
from kiln.tvm_compat import compiler

t = compiler()
tvm, te = t.tvm, t.te

from kiln.frontends.models import moe  # noqa: E402  (TVM-at-import: after compiler())

TOL = dict(rtol=2e-5, atol=2e-6)
# (name, routing, experts, top-k): V2 plain greedy, V2 group-limited, V3 noaux_tc (with and without renormalising)
ROUTINGS = {
    "v2_greedy": (moe.DeepSeekRouting.v2("greedy", routed_scaling_factor=16.0), 12, 3),
    "v2_groups": (moe.DeepSeekRouting.v2("group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5), 12, 3),
    "v3": (moe.DeepSeekRouting.v3(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5), 16, 4),
    "v3_unnormed": (moe.DeepSeekRouting.v3(n_group=3, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0), 9, 2),
}


@pytest.fixture(scope="module")
def target():
    from kiln.compiler.target import parse_target  # noqa: PLC0415

    return parse_target("llvm")[0].tvm_target()


def routing_twin(logits: np.ndarray, bias: np.ndarray | None, r, k: int):
    """float64: transformers' DeepSeek routers with stable sorts (ties: lower group, lower expert)."""
    lg = logits.astype(np.float64)
    if r.scoring == "sigmoid":
        sc = 1.0 / (1.0 + np.exp(-lg))
    else:
        sc = np.exp(lg - lg.max(axis=1, keepdims=True))
        sc /= sc.sum(axis=1, keepdims=True)
    ch = sc + bias.astype(np.float64) if r.bias else sc
    n_tok, n_exp = sc.shape
    size = n_exp // r.n_group
    grouped = ch.reshape(n_tok, r.n_group, size)
    best = np.take_along_axis(grouped, np.argsort(-grouped, axis=2, kind="stable")[:, :, : r.group_best], axis=2)
    chosen_groups = np.argsort(-best.sum(axis=2), axis=1, kind="stable")[:, : r.topk_group]
    keep = np.zeros((n_tok, r.n_group), bool)
    np.put_along_axis(keep, chosen_groups, True, axis=1)
    kept = np.where(np.repeat(keep, size, axis=1), ch, r.masked)
    ids = np.argsort(-kept, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(sc, ids, axis=1)
    if r.normalize:
        w = w / (w.sum(axis=1, keepdims=True) + 1e-20)
    return ids, w * r.scale


def _logits_with_ties(rng, tokens, experts):
    lg = rng.standard_normal((tokens, experts)).astype("float32")
    for i in range(tokens):  # per token: two experts share the best logit, two share a middle one
        a, b, c, d = rng.permutation(experts)[:4]
        lg[i, a] = lg[i, b] = lg[i].max() + 0.25
        lg[i, d] = lg[i, c]
    return lg


@pytest.mark.parametrize(("name", "tokens"), slow_except([(n, tk) for n in ROUTINGS for tk in (1, 13)], ("v2_groups", 13), ("v3", 1)))
def test_routing_matches_numpy_with_ties(target, name, tokens):
    r, experts, k = ROUTINGS[name]
    rng = np.random.default_rng(experts * 10 + k + tokens)
    logits = _logits_with_ties(rng, tokens, experts)
    bias = (0.1 * rng.standard_normal(experts)).astype("float32")
    tok = tokens if tokens == 1 else t.tirx.Var("seq_len", "int64")
    lg = te.placeholder((tok, experts), "float32", name="logits")
    b = te.placeholder((experts,), "float32", name="bias")
    sc = moe.te_router_scores(lg, r.scoring)
    ids = moe.te_group_limited_topk(sc, k, r.n_group, r.topk_group, r.group_best, r.masked, b if r.bias else None)
    wts = moe.te_gathered_weights(sc, ids, r.normalize, r.scale)
    func = te.create_prim_func([lg, b, ids, wts]).with_attr("global_symbol", "main")
    with target:
        lib = tvm.compile(ScheduleTIR(target)(tvm.IRModule({"main": func})), target=target)
    dev = tvm.cpu()
    outs = [tvm.runtime.empty((tokens, k), "int32", dev), tvm.runtime.empty((tokens, k), "float32", dev)]
    lib["main"](tvm.runtime.tensor(logits, dev), tvm.runtime.tensor(bias, dev), *outs)
    want_ids, want_w = routing_twin(logits, bias, r, k)
    np.testing.assert_array_equal(outs[0].numpy(), want_ids)
    np.testing.assert_allclose(outs[1].numpy(), want_w, **TOL)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_twin_is_transformers_router(version):
    """The twin (and so the kernels) choose what transformers' DeepseekV2/V3 routers
    choose, weighted alike (random logits, no ties: transformers' topk order is
    unspecified); DeepSeekRouting.from_hf reads the routing from the config."""
    torch = pytest.importorskip("torch")
    import transformers  # noqa: PLC0415

    experts, k, hidden = 16, 4, 24
    common = dict(hidden_size=hidden, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=experts, num_experts_per_tok=k, n_group=4, topk_group=2,
                  routed_scaling_factor=2.5)
    if version == "v2":
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter as Router  # noqa: PLC0415

        config = transformers.DeepseekV2Config(**common, topk_method="group_limited_greedy")
    else:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as Router  # noqa: PLC0415

        config = transformers.DeepseekV3Config(**common, norm_topk_prob=True)
    r = moe.DeepSeekRouting.from_hf(config.to_dict())  # the config keys -> kiln's routing
    assert r == (moe.DeepSeekRouting.v3(4, 2, True, 2.5) if version == "v3" else moe.DeepSeekRouting.v2("group_limited_greedy", 4, 2, 2.5))
    router = Router(config).eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(13, hidden, generator=gen)
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, hidden, generator=gen))
        bias = None
        if version == "v3":
            router.e_score_correction_bias.copy_(0.3 * torch.randn(experts, generator=gen))
            bias = router.e_score_correction_bias.detach().numpy()
        _, got_w, got_ids = router(x)  # (router logits, top-k weights, top-k ids)
    logits = (x @ router.weight.T).detach().numpy()
    want_ids, want_w = routing_twin(logits, bias, r, k)
    order = np.argsort(got_ids.numpy(), axis=1)
    np.testing.assert_array_equal(np.take_along_axis(got_ids.numpy(), order, axis=1), np.sort(want_ids, axis=1))
    np.testing.assert_allclose(np.take_along_axis(got_w.numpy(), order, axis=1),
                               np.take_along_axis(want_w, np.argsort(want_ids, axis=1), axis=1), rtol=1e-5, atol=1e-6)


def test_first_k_dense_replace_and_unknown_methods():
    """transformers' rule: layers before first_k_dense_replace keep the dense MLP; a
    selection kiln does not have is refused by name."""
    from kiln.errors import UnsupportedModelError  # noqa: PLC0415

    assert [moe.deepseek_moe_layer(i, 1) for i in range(4)] == [False, True, True, True]
    assert [moe.deepseek_moe_layer(i, 0) for i in range(2)] == [True, True]
    with pytest.raises(UnsupportedModelError, match="topk_method 'sinkhorn'"):
        moe.DeepSeekRouting.from_hf({"topk_method": "sinkhorn"})


def _silu(v):
    return v / (1.0 + np.exp(-v))


def block_twin(x, p: dict, r, k: int, n_shared: int):
    """float64 DeepSeek MoE block: y = sum_j w_j expert_{ids_j}(x) + shared(x) (SwiGLU everywhere)."""
    x = x.astype(np.float64)
    p = {n: a.astype(np.float64) for n, a in p.items()}
    ids, w = routing_twin(x @ p["gate.weight"].T, p.get("e_score_correction_bias"), r, k)
    y = np.zeros_like(x)
    for t_ in range(x.shape[0]):
        for j in range(k):
            gate, up = np.split(p["experts.gate_up"][ids[t_, j]] @ x[t_], 2)
            y[t_] += w[t_, j] * (p["experts.down"][ids[t_, j]] @ (_silu(gate) * up))
    if n_shared:
        gate, up = np.split(x @ p["shared_experts.gate_up_proj.weight"].T, 2, axis=1)
        y += (_silu(gate) * up) @ p["shared_experts.down_proj.weight"].T
    return y


@pytest.mark.parametrize(("name", "n_shared", "tokens"), slow_except(
    [(n, s, tk) for n in ROUTINGS for s in (0, 2) for tk in (1, 13)], ("v3", 2, 13)))
def test_block_matches_numpy(target, name, n_shared, tokens):
    """DeepSeekMoE (routed experts chosen by the routing, plus shared experts) built as a
    Relax function for llvm and run: equal to the float64 twin of the whole block."""
    from kiln.frontends.config import ModelConfig  # noqa: PLC0415

    r, experts, k = ROUTINGS[name]
    hidden, inter = 40, 24
    cfg = ModelConfig.from_dict({"architectures": ["DeepSeekMoEBlock"], "hidden_size": hidden, "intermediate_size": 56,
                                 "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 8,
                                 "num_experts": experts, "num_experts_per_tok": k, "moe_intermediate_size": inter})
    block = moe.DeepSeekMoE(cfg, "float32", r, n_shared=n_shared)
    mod, params = block.export_tvm(spec={"forward": {"x": t.nn.spec.Tensor([1, tokens, hidden], "float32")}})
    rng = np.random.default_rng(experts + n_shared + tokens)
    arrays = {n: (0.3 * rng.standard_normal([int(d) for d in p.shape])).astype("float32") for n, p in params}
    x = rng.standard_normal((1, tokens, hidden)).astype("float32")
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    got = vm["forward"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(arrays[n]) for n, _ in params]).numpy()
    want = block_twin(x[0], arrays, r, k, n_shared)
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)
