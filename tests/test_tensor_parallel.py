"""Tensor parallelism (issue 16): the weight split (numpy, against the unsplit
matmuls it must reproduce), the refusals, and tiny models compiled with
--tensor-parallel 2 for the CPU and run as two disco workers whose collectives
go through shared memory: logits equal the unsplit artifact's within float32
rounding, greedy tokens equal, bad requests fail on every shard and leave the
session usable. (On GPUs the same artifacts use NCCL: BENCHMARKS.md.)

The shared tiny models (3 heads, 1 KV head) do not split, on purpose; these
tests make their own with 4 heads / 2 KV heads, an even FFN and an odd
vocabulary (211: the last LM-head shard is padded)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import rel_err
from helpers.processes import compile_artifact

from kiln.errors import CompileError, RequestError
from kiln.frontends.config import ModelConfig
from kiln.frontends.models import family_for
from kiln.frontends.models.sharding import Split, layout, shard, shard_config

RTOL = 2e-5  # max |TP2 - TP1| / max |TP1 logit|: the same sums in another order
CONFIG = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
              vocab_size=211, num_hidden_layers=2, max_position_embeddings=128)


def _config(**kw) -> ModelConfig:
    return ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], **CONFIG, **kw})


def test_shards_of_a_concatenated_qkv_hold_their_own_heads_in_q_k_v_order():
    c = _config()
    n, rng = 2, np.random.default_rng(0)
    w = rng.standard_normal((c.q_size + 2 * c.kv_size, 8))
    split = layout(family_for("LlamaForCausalLM"), c, 2)["layers.0.attn.qkv_proj.weight"]
    q, k, v = np.split(w, [c.q_size, c.q_size + c.kv_size])
    for r in range(n):
        s = shard(w, split, n, r)
        hq, hk = c.q_size // n, c.kv_size // n
        np.testing.assert_array_equal(s, np.concatenate([q[r * hq:(r + 1) * hq], k[r * hk:(r + 1) * hk], v[r * hk:(r + 1) * hk]]))


def test_fewer_kv_heads_than_shards_are_replicated_to_the_shards_that_read_them():
    """4 query heads, 1 KV head, 2 shards: each shard keeps its 2 query heads and the one KV head."""
    c = _config(num_key_value_heads=1)
    assert shard_config(c, 2).num_key_value_heads == 1
    w = np.random.default_rng(2).standard_normal((c.q_size + 2 * c.kv_size, 8))
    q, k, v = np.split(w, [c.q_size, c.q_size + c.kv_size])
    split = layout(family_for("LlamaForCausalLM"), c, 2)["layers.0.attn.qkv_proj.weight"]
    for r in range(2):
        np.testing.assert_array_equal(shard(w, split, 2, r), np.concatenate([q[r * 32:(r + 1) * 32], k, v]))
    # 8 KV heads over 16 shards: shards 2j and 2j+1 hold KV head j
    c16 = _config(num_attention_heads=16, num_key_value_heads=8, head_dim=4)
    w = np.arange(c16.q_size + 2 * c16.kv_size, dtype=np.float64)[:, None]
    split = layout(family_for("LlamaForCausalLM"), c16, 16)["layers.0.attn.qkv_proj.weight"]
    k_rows = [shard(w, split, 16, r)[4:8, 0] - c16.q_size for r in range(16)]
    assert [int(k[0]) // 4 for k in k_rows] == [r // 2 for r in range(16)]


def test_row_and_column_parallel_shards_reproduce_the_whole_mlp():
    """gate/up split by rows, down by columns: the sum over shards of each shard's MLP is the MLP."""
    c, n = _config(), 2
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, c.hidden_size))
    gu = rng.standard_normal((2 * c.intermediate_size, c.hidden_size))
    down = rng.standard_normal((c.hidden_size, c.intermediate_size))
    lay = layout(family_for("LlamaForCausalLM"), c, 2)

    def mlp(gu, down):
        g, u = np.split(x @ gu.T, 2, axis=-1)
        return (g / (1 + np.exp(-g)) * u) @ down.T

    total = sum(mlp(shard(gu, lay["layers.0.mlp.gate_up_proj.weight"], n, r), shard(down, lay["layers.0.mlp.down_proj.weight"], n, r))
                for r in range(n))
    np.testing.assert_allclose(total, mlp(gu, down), rtol=1e-12, atol=1e-12)


def test_vocab_shards_pad_the_last_with_zero_rows_and_biases_go_to_shard_0():
    w = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
    a, b = shard(w, Split("vocab"), 2, 0), shard(w, Split("vocab"), 2, 1)
    assert a.shape == b.shape == (3, 2)
    np.testing.assert_array_equal(np.concatenate([a, b])[:5], w)
    np.testing.assert_array_equal(b[2], 0)
    bias = np.ones(4, np.float32)
    assert shard(bias, Split("first"), 2, 0) is bias and not shard(bias, Split("first"), 2, 1).any()


def test_the_shard_config_divides_heads_and_ffn_and_unties_the_head():
    s = shard_config(_config(tie_word_embeddings=True), 2)
    assert (s.num_attention_heads, s.num_key_value_heads, s.intermediate_size, s.head_dim) == (2, 1, 48, 16)
    assert s.tensor_parallel == 2 and not s.tie_word_embeddings and s.vocab_size == 211
    assert family_for("LlamaForCausalLM").param_shapes(s)["lm_head.weight"] == (106, 64)
    assert shard_config(_config(), 1) == _config()


@pytest.mark.parametrize("kw, n, words", [
    (dict(num_attention_heads=9, num_key_value_heads=3, head_dim=16), 2, "9 attention heads do not split evenly over 2"),
    (dict(num_attention_heads=6, num_key_value_heads=3), 2, "3 KV heads do not split evenly over 2"),
    (dict(intermediate_size=97), 2, "97 FFN columns"),
    (dict(num_local_experts=4, num_experts_per_tok=2), 2, "mixture-of-experts"),
    ({}, 0, "must be an integer in [1, 64]"),
])
def test_a_split_that_does_not_fit_is_refused_naming_the_numbers(kw, n, words):
    with pytest.raises(CompileError) as err:
        shard_config(_config(**kw), n)
    assert words in str(err.value)


def _checkpoint(path, seed: int, **cfg):
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # weights large enough that greedy tokens vary
        for p in model.parameters():
            p.mul_(8.0 if p.ndim == 2 else 1.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["tied", "biases", "one-kv-head"])
def pair(request, tmp_path_factory):
    """(TP1 artifact, TP2 artifact) of one tiny model: tied embeddings (the head is cut
    from the table), biases on q/k/v/o and the MLP (row-parallel biases on shard 0), or
    one KV head for two shards (replicated)."""
    kw = {"tied": dict(tie_word_embeddings=True), "biases": dict(attention_bias=True, mlp_bias=True),
          "one-kv-head": dict(num_key_value_heads=1)}[request.param]
    d = tmp_path_factory.mktemp(f"tp-{request.param}")
    ck = _checkpoint(d / "ck", seed={"tied": 3, "biases": 4, "one-kv-head": 5}[request.param], **{**CONFIG, **kw})
    return compile_artifact(ck, d / "tp1.kiln"), compile_artifact(ck, d / "tp2.kiln", tensor_parallel=2)


@pytest.mark.slow
def test_two_shards_on_cpu_give_the_unsplit_logits_and_tokens(pair):
    from kiln.runtime import load  # noqa: PLC0415
    from kiln.runtime.tensor_parallel import TensorParallelSession  # noqa: PLC0415

    one, two = load(pair[0], max_sequences=4), load(pair[1], threads=1, max_sequences=4)
    try:
        assert isinstance(two, TensorParallelSession) and two.shards == 2
        ids = [int(i) for i in np.random.default_rng(5).integers(0, 211, 23)]
        assert rel_err(two.logits(ids), one.logits(ids)) < RTOL
        assert rel_err(two.decode_logits(ids[:9]), one.decode_logits(ids[:9])) < RTOL
        a, b = one.generate(ids[:6], max_new_tokens=24, ignore_eos=True), two.generate(ids[:6], max_new_tokens=24, ignore_eos=True)
        assert a.tokens == b.tokens and len(set(a.tokens)) > 1
        # a bad request fails on both shards before any collective; the session goes on
        with pytest.raises(RequestError, match="outside"):
            two.prefill(two.add_sequence(), [5, 999])
        assert two.sequences == [0] and two.sequence_length(0) == 0
        two.remove_sequence(0)
        # several sequences in one step (the server's decode_batch), as in the unsplit artifact
        seqs1, seqs2 = [one.add_sequence() for _ in range(3)], [two.add_sequence() for _ in range(3)]
        prompts = [ids[:4], ids[4:11], ids[11:14]]
        assert rel_err(two.prefill_many(seqs2, prompts), one.prefill_many(seqs1, prompts)) < RTOL
        assert one.decode_greedy(seqs1, [1, 2, 3]) == two.decode_greedy(seqs2, [1, 2, 3])
        assert one.decode_greedy_async(seqs1, [7, 8, 9])() == two.decode_greedy_async(seqs2, [7, 8, 9])()  # the engine's overlapped steps
        assert rel_err(two.decode_step(seqs2, [4, 5, 6]), one.decode_step(seqs1, [4, 5, 6])) < RTOL
    finally:
        two.close()


@pytest.mark.slow
def test_kiln_serve_on_a_split_artifact_answers_like_the_unsplit_one(pair):
    """The server's engine runs on the TensorParallelSession unchanged: six concurrent greedy
    requests through a batch of 4, the real openai client on 127.0.0.1, same tokens as TP1."""
    import re  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import threading  # noqa: PLC0415

    import openai  # noqa: PLC0415
    from helpers.processes import subprocess_env  # noqa: PLC0415

    def serve(art):
        proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(art), "--port", "0", "--max-batch", "4",
                                 "--model-name", "t", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=subprocess_env())
        m = re.search(r"on http://([\d.]+):(\d+)", proc.stdout.readline())
        assert m, proc.stderr.read()[-2000:]
        client = openai.OpenAI(base_url=f"http://{m.group(1)}:{m.group(2)}/v1", api_key="-", max_retries=5, timeout=60)
        out = [None] * 6

        def one(i):  # half with logprobs (steps that read logits; the tokens compared), half without (overlapped greedy
            # steps, as tokens only through the session: no tokenizer here, so only their count comes back)
            r = client.completions.create(model="t", prompt=[5 + 7 * i, 17, 99, 3], max_tokens=12, temperature=0,
                                          logprobs=1 if i % 2 else None, extra_body={"ignore_eos": True})
            out[i] = r.choices[0].logprobs.tokens if i % 2 else ["n"] * r.usage.completion_tokens

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        return out

    one_out, two_out = serve(pair[0]), serve(pair[1])
    assert all(o is not None and len(o) == 12 for o in two_out)
    assert two_out == one_out


@pytest.mark.slow
def test_a_worker_that_dies_fails_the_session_at_once_and_close_cleans_up(pair):
    """SIGKILL one worker: the next step raises at once naming it (the watchdog aborts the
    collectives worker 0 would wait in), later steps too, and close() reaps the rest."""
    import os  # noqa: PLC0415
    import re  # noqa: PLC0415
    import signal  # noqa: PLC0415
    import time  # noqa: PLC0415

    from kiln.errors import KilnError  # noqa: PLC0415
    from kiln.runtime import load  # noqa: PLC0415

    two = load(pair[1], threads=1)
    proc = two._procs[1]
    assert two.logits([5, 17, 99]).shape == (3, 211)
    os.kill(proc.pid, signal.SIGKILL)
    t = time.perf_counter()
    with pytest.raises(KilnError, match=re.escape(f"worker 1 (pid {proc.pid}) exited")):
        two.logits([5, 17, 99])
    assert time.perf_counter() - t < 10
    with pytest.raises(KilnError, match="cannot continue"):
        two.generate([5, 17], max_new_tokens=2)
    two.close()
    assert proc.poll() is not None
